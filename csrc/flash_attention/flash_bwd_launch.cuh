// Host launcher of the Stage 1 FlashAttention backward for one dtype and head
// dim (delta is computed before, by flash_bwd_delta). Deterministic
// (p.dq_accum null): dK/dV per key block, then dQ per query block. Otherwise
// dK/dV also adds dQ into p.dq_accum, zeroed first, then rounded into dq
// (flash_bwd_dq_accum_launch.cuh). Included by the flash_bwd_hdim*.cu
// instantiation files.
#pragma once

#include "common/launch.h"
#include "flash_attention/flash_bwd_dkdv_kernel.cuh"
#include "flash_attention/flash_bwd_dq_accum_launch.cuh"
#include "flash_attention/flash_bwd_dq_kernel.cuh"

namespace pyext {

template <typename T, int kD>
bool flash_bwd(const FlashAttnParams& p, cudaStream_t stream) {
  using KV = FlashBwdDkDvTraits<kD>;
  using Q = FlashBwdDqTraits<kD>;
  const bool accumulate = p.dq_accum != nullptr;
  auto dkdv = accumulate ? flash_bwd_dkdv_kernel<T, kD, true> : flash_bwd_dkdv_kernel<T, kD, false>;
  const int dkdv_smem = accumulate ? FlashBwdDkDvTraits<kD, true>::kSmemBytes : KV::kSmemBytes;
  auto dq = flash_bwd_dq_kernel<T, kD>;
  if (!opt_in_smem(dkdv, dkdv_smem) || (!accumulate && !opt_in_smem(dq, Q::kSmemBytes))) return false;
  if (accumulate) zero_dq_accum(p, stream);
  dkdv<<<KV::grid(p), KV::kThreads, dkdv_smem, stream>>>(p);
  if (accumulate)
    convert_dq_accum<T>(p, stream);
  else
    dq<<<Q::grid(p), Q::kThreads, Q::kSmemBytes, stream>>>(p);
  return true;
}

}  // namespace pyext
