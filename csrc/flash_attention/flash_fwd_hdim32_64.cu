// Forward kernels for head dims 32 and 64 (fp16, bf16); see flash_fwd_launch.cuh.
#include "flash_attention/flash_fwd_launch.cuh"

namespace pyext {
template bool flash_fwd<__half, 32>(const FlashAttnParams&, cudaStream_t);
template bool flash_fwd<__nv_bfloat16, 32>(const FlashAttnParams&, cudaStream_t);
template bool flash_fwd<__half, 64>(const FlashAttnParams&, cudaStream_t);
template bool flash_fwd<__nv_bfloat16, 64>(const FlashAttnParams&, cudaStream_t);
}  // namespace pyext
