// Host launcher of the FlashAttention backward for one dtype and head dim:
// dK/dV per key block, then dQ per query block (delta is computed before, by
// flash_bwd_delta). Included by the flash_bwd_hdim*.cu instantiation files.
#pragma once

#include "common/launch.h"
#include "flash_attention/flash_bwd_dkdv_kernel.cuh"
#include "flash_attention/flash_bwd_dq_kernel.cuh"

namespace pyext {

template <typename T, int kD>
bool flash_bwd(const FlashAttnParams& p, cudaStream_t stream) {
  using KV = FlashBwdDkDvTraits<kD>;
  using Q = FlashBwdDqTraits<kD>;
  auto dkdv = flash_bwd_dkdv_kernel<T, kD>;
  auto dq = flash_bwd_dq_kernel<T, kD>;
  if (!opt_in_smem(dkdv, KV::kSmemBytes) || !opt_in_smem(dq, Q::kSmemBytes)) return false;
  dkdv<<<KV::grid(p), KV::kThreads, KV::kSmemBytes, stream>>>(p);
  dq<<<Q::grid(p), Q::kThreads, Q::kSmemBytes, stream>>>(p);
  return true;
}

}  // namespace pyext
