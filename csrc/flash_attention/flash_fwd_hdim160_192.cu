// Forward kernels for head dims 160 and 192 (fp16, bf16); see flash_fwd_launch.cuh.
#include "flash_attention/flash_fwd_launch.cuh"

namespace pyext {
template bool flash_fwd<__half, 160>(const FlashAttnParams&, cudaStream_t);
template bool flash_fwd<__nv_bfloat16, 160>(const FlashAttnParams&, cudaStream_t);
template bool flash_fwd<__half, 192>(const FlashAttnParams&, cudaStream_t);
template bool flash_fwd<__nv_bfloat16, 192>(const FlashAttnParams&, cudaStream_t);
}  // namespace pyext
