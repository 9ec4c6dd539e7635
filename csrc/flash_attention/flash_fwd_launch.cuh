// Host launcher of the FlashAttention forward (Stage 1) for one dtype and
// head dim. Included by the flash_fwd_hdim*.cu instantiation files; the
// kernel itself (flash_fwd_kernel.cuh) has no launch syntax, so host code
// can include it too (tests/cuda_emulation).
#pragma once

#include "common/launch.h"
#include "flash_attention/flash_fwd_kernel.cuh"

namespace pyext {

template <typename T, int kD>
bool flash_fwd(const FlashAttnParams& p, cudaStream_t stream) {
  using Tr = FlashFwdTraits<kD>;
  auto kernel = flash_fwd_kernel<T, kD>;
  if (!opt_in_smem(kernel, Tr::kSmemBytes)) return false;
  kernel<<<Tr::grid(p), Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
  return true;
}

}  // namespace pyext
