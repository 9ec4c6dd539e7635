// Host launcher of the Stage 2 (sm_90a) FlashAttention backward for one dtype
// and head dim: dK/dV per 128 keys (flash_bwd_dkdv_sm90_kernel.cuh), then dQ
// per 128 queries (flash_bwd_dq_sm90_kernel.cuh); delta is computed before,
// by flash_bwd_delta. Included by the flash_bwd_sm90_hdim*.cu files.
#pragma once

#include "common/launch.h"
#include "flash_attention/flash_bwd_dkdv_sm90_kernel.cuh"
#include "flash_attention/flash_bwd_dq_sm90_kernel.cuh"

namespace pyext {

// Everything is checked before either launch, so false means nothing ran.
template <typename T, int kD>
bool flash_bwd_sm90(const FlashAttnParams& p, cudaStream_t stream) {
  using KV = FlashBwdDkDvSm90Traits<kD>;
  using Q = FlashBwdDqSm90Traits<kD>;
  auto dkdv = flash_bwd_dkdv_sm90_kernel<T, kD>;
  auto dq = flash_bwd_dq_sm90_kernel<T, kD>;
  if (!has_sm90a_body(dkdv) || !has_sm90a_body(dq)) return false;
  Sm90TensorMaps kv_maps, q_maps;
  if (!make_sm90_tensor_maps<T>(p, KV::kBlockM, KV::kBlockN, kv_maps) ||
      !make_sm90_tensor_maps<T>(p, Q::kBlockM, Q::kBlockN, q_maps))
    return false;
  // 65 / 129 KB of dynamic shared memory each: should a device refuse it, Stage 1 runs.
  if (!opt_in_smem(dkdv, KV::kSmemBytes) || !opt_in_smem(dq, Q::kSmemBytes)) return false;
  dkdv<<<KV::grid(p), KV::kThreads, KV::kSmemBytes, stream>>>(kv_maps.q, kv_maps.k, kv_maps.v, kv_maps.dout, p);
  dq<<<Q::grid(p), Q::kThreads, Q::kSmemBytes, stream>>>(q_maps.q, q_maps.k, q_maps.v, q_maps.dout, p);
  return true;
}

}  // namespace pyext
