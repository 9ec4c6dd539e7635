// Stage 2 forward kernels (sm_90a) for head dim 64 (fp16, bf16); see flash_fwd_sm90_launch.cuh.
#include "flash_attention/flash_fwd_sm90_launch.cuh"

namespace pyext {
template bool flash_fwd_sm90<__half, 64>(const FlashAttnParams&, cudaStream_t);
template bool flash_fwd_sm90<__nv_bfloat16, 64>(const FlashAttnParams&, cudaStream_t);
}  // namespace pyext
