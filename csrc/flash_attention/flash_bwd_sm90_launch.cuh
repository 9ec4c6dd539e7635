// Host launcher of the Stage 2 (sm_90a) FlashAttention backward for one dtype
// and head dim; delta is computed before, by flash_bwd_delta. Deterministic
// (p.dq_accum null): dK/dV per 128 keys (flash_bwd_dkdv_sm90_kernel.cuh),
// then dQ per 128 queries (flash_bwd_dq_sm90_kernel.cuh). Otherwise dK/dV
// also adds dQ into p.dq_accum, zeroed first, then rounded into dq
// (flash_bwd_dq_accum_launch.cuh). Included by the flash_bwd_sm90_hdim*.cu files.
#pragma once

#include "common/launch.h"
#include "flash_attention/flash_bwd_dkdv_sm90_kernel.cuh"
#include "flash_attention/flash_bwd_dq_accum_launch.cuh"
#include "flash_attention/flash_bwd_dq_sm90_kernel.cuh"

namespace pyext {

// Everything is checked before the first launch, so false means nothing ran.
template <typename T, int kD>
bool flash_bwd_sm90(const FlashAttnParams& p, cudaStream_t stream) {
  using KV = FlashBwdDkDvSm90Traits<kD>;
  using Q = FlashBwdDqSm90Traits<kD>;
  const bool accumulate = p.dq_accum != nullptr;
  auto dkdv = accumulate ? flash_bwd_dkdv_sm90_kernel<T, kD, true> : flash_bwd_dkdv_sm90_kernel<T, kD, false>;
  const int dkdv_smem = accumulate ? FlashBwdDkDvSm90Traits<kD, true>::kSmemBytes : KV::kSmemBytes;
  auto dq = flash_bwd_dq_sm90_kernel<T, kD>;
  if (!has_sm90a_body(dkdv) || (!accumulate && !has_sm90a_body(dq))) return false;
  Sm90TensorMaps kv_maps, q_maps;
  if (!make_sm90_tensor_maps<T>(p, KV::kBlockM, KV::kBlockN, kv_maps) ||
      (!accumulate && !make_sm90_tensor_maps<T>(p, Q::kBlockM, Q::kBlockN, q_maps)))
    return false;
  // 65 to 161 KB of dynamic shared memory: should a device refuse it, Stage 1 runs.
  if (!opt_in_smem(dkdv, dkdv_smem) || (!accumulate && !opt_in_smem(dq, Q::kSmemBytes))) return false;
  if (accumulate) zero_dq_accum(p, stream);
  dkdv<<<KV::grid(p), KV::kThreads, dkdv_smem, stream>>>(kv_maps.q, kv_maps.k, kv_maps.v, kv_maps.dout, p);
  if (accumulate)
    convert_dq_accum<T>(p, stream);
  else
    dq<<<Q::grid(p), Q::kThreads, Q::kSmemBytes, stream>>>(q_maps.q, q_maps.k, q_maps.v, q_maps.dout, p);
  return true;
}

}  // namespace pyext
