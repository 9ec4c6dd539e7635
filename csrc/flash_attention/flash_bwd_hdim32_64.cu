// Backward kernels for head dims 32 and 64 (fp16, bf16); see flash_bwd_launch.cuh.
#include "flash_attention/flash_bwd_launch.cuh"

namespace pyext {
template bool flash_bwd<__half, 32>(const FlashAttnParams&, cudaStream_t);
template bool flash_bwd<__nv_bfloat16, 32>(const FlashAttnParams&, cudaStream_t);
template bool flash_bwd<__half, 64>(const FlashAttnParams&, cudaStream_t);
template bool flash_bwd<__nv_bfloat16, 64>(const FlashAttnParams&, cudaStream_t);
}  // namespace pyext
