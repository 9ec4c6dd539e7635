// Host launcher of the backward's first pass, delta = rowsum(dO * O)
// (flash_bwd_delta_kernel.cuh), for fp16 and bf16.
#include "flash_attention/flash_bwd_delta_kernel.cuh"

namespace pyext {

template <typename T>
void flash_bwd_delta(const FlashAttnParams& p, cudaStream_t stream) {
  using Tr = FlashBwdDeltaTraits;
  flash_bwd_delta_kernel<T><<<Tr::grid(p), Tr::kThreads, 0, stream>>>(p, Tr::rows(p));
}

template void flash_bwd_delta<__half>(const FlashAttnParams&, cudaStream_t);
template void flash_bwd_delta<__nv_bfloat16>(const FlashAttnParams&, cudaStream_t);

}  // namespace pyext
