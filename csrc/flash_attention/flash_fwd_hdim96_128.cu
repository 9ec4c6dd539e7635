// Forward kernels for head dims 96 and 128 (fp16, bf16); see flash_fwd_launch.cuh.
#include "flash_attention/flash_fwd_launch.cuh"

namespace pyext {
template bool flash_fwd<__half, 96>(const FlashAttnParams&, cudaStream_t);
template bool flash_fwd<__nv_bfloat16, 96>(const FlashAttnParams&, cudaStream_t);
template bool flash_fwd<__half, 128>(const FlashAttnParams&, cudaStream_t);
template bool flash_fwd<__nv_bfloat16, 128>(const FlashAttnParams&, cudaStream_t);
}  // namespace pyext
