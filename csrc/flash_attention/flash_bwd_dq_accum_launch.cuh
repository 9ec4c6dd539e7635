// Host side of the non-deterministic backward's dQ, shared by both stages'
// launchers (flash_bwd_launch.cuh, flash_bwd_sm90_launch.cuh): p.dq_accum is
// zeroed before the dK/dV kernel adds dQ into it, and rounded into p.dq after.
#pragma once

#include "flash_attention/flash_bwd_dq_convert_kernel.cuh"

namespace pyext {

inline void zero_dq_accum(const FlashAttnParams& p, cudaStream_t stream) {
  cudaMemsetAsync(p.dq_accum, 0, FlashBwdDqConvertTraits::groups(p) * 8 * sizeof(float), stream);
}

template <typename T>
void convert_dq_accum(const FlashAttnParams& p, cudaStream_t stream) {
  using C = FlashBwdDqConvertTraits;
  flash_bwd_dq_convert_kernel<T><<<C::grid(p), C::kThreads, 0, stream>>>(p, C::groups(p));
}

}  // namespace pyext
