// Forward kernels for head dims 224 and 256 (fp16, bf16); see flash_fwd_launch.cuh.
#include "flash_attention/flash_fwd_launch.cuh"

namespace pyext {
template bool flash_fwd<__half, 224>(const FlashAttnParams&, cudaStream_t);
template bool flash_fwd<__nv_bfloat16, 224>(const FlashAttnParams&, cudaStream_t);
template bool flash_fwd<__half, 256>(const FlashAttnParams&, cudaStream_t);
template bool flash_fwd<__nv_bfloat16, 256>(const FlashAttnParams&, cudaStream_t);
}  // namespace pyext
