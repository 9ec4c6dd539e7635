// Backward kernels for head dims 32 and 64 (fp16, bf16); see flash_bwd_launch.cuh.
// flash_bwd_dq of head dim 64 also serves the sm_90a backward (flash_bwd_sm90_hdim64.cu).
#include "flash_attention/flash_bwd_launch.cuh"

namespace pyext {
template bool flash_bwd<__half, 32>(const FlashAttnParams&, cudaStream_t);
template bool flash_bwd<__nv_bfloat16, 32>(const FlashAttnParams&, cudaStream_t);
template bool flash_bwd<__half, 64>(const FlashAttnParams&, cudaStream_t);
template bool flash_bwd<__nv_bfloat16, 64>(const FlashAttnParams&, cudaStream_t);
template bool flash_bwd_dq<__half, 64>(const FlashAttnParams&, cudaStream_t);
template bool flash_bwd_dq<__nv_bfloat16, 64>(const FlashAttnParams&, cudaStream_t);
}  // namespace pyext
