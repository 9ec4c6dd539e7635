// Host launcher of the Stage 2 (sm_90a) FlashAttention backward for one dtype
// and head dim: dK/dV per 128 keys (flash_bwd_dkdv_sm90_kernel.cuh), then dQ
// per 128 queries (flash_bwd_dq_sm90_kernel.cuh); delta is computed before,
// by flash_bwd_delta. Included by the flash_bwd_sm90_hdim*.cu files.
#pragma once

#include <type_traits>

#include "common/launch.h"
#include "common/tma_host.h"
#include "flash_attention/flash_bwd_dkdv_sm90_kernel.cuh"
#include "flash_attention/flash_bwd_dq_sm90_kernel.cuh"

namespace pyext {

// Tensor maps over q, k, v and dout as (D, S, H, B), boxes of 64 head-dim
// elements x q_rows (q, dout) or kv_rows (k, v); dout is contiguous
// (B, Hq, Sq, D). False when the driver refuses one.
template <typename T>
bool make_bwd_tensor_maps(const FlashAttnParams& p, int q_rows, int kv_rows, CUtensorMap (&m)[4]) {
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  const uint64_t d = p.head_dim, sq = p.seq_q, sk = p.seq_k, hq = p.heads_q, hkv = p.heads_kv, bs = p.batch;
  const int64_t do_row = p.head_dim, do_head = int64_t(p.seq_q) * p.head_dim, do_batch = p.heads_q * do_head;
  return make_tensor_map_4d_16bit(&m[0], kBf16, p.q, {d, sq, hq, bs}, {p.q_row_stride, p.q_head_stride, p.q_batch_stride},
                                  64, q_rows) &&
         make_tensor_map_4d_16bit(&m[1], kBf16, p.k, {d, sk, hkv, bs}, {p.k_row_stride, p.k_head_stride, p.k_batch_stride},
                                  64, kv_rows) &&
         make_tensor_map_4d_16bit(&m[2], kBf16, p.v, {d, sk, hkv, bs}, {p.v_row_stride, p.v_head_stride, p.v_batch_stride},
                                  64, kv_rows) &&
         make_tensor_map_4d_16bit(&m[3], kBf16, p.dout, {d, sq, hq, bs}, {do_row, do_head, do_batch}, 64, q_rows);
}

// Everything is checked before either launch, so false means nothing ran.
template <typename T, int kD>
bool flash_bwd_sm90(const FlashAttnParams& p, cudaStream_t stream) {
  using KV = FlashBwdDkDvSm90Traits<kD>;
  using Q = FlashBwdDqSm90Traits<kD>;
  auto dkdv = flash_bwd_dkdv_sm90_kernel<T, kD>;
  auto dq = flash_bwd_dq_sm90_kernel<T, kD>;
  if (!has_sm90a_body(dkdv) || !has_sm90a_body(dq)) return false;
  CUtensorMap kv_maps[4], q_maps[4];
  if (!make_bwd_tensor_maps<T>(p, KV::kBlockM, KV::kBlockN, kv_maps) ||
      !make_bwd_tensor_maps<T>(p, Q::kBlockM, Q::kBlockN, q_maps))
    return false;
  // 65 / 129 KB of dynamic shared memory each: should a device refuse it, Stage 1 runs.
  if (!opt_in_smem(dkdv, KV::kSmemBytes) || !opt_in_smem(dq, Q::kSmemBytes)) return false;
  const dim3 grid_kv(p.batch * p.heads_kv, (p.seq_k + KV::kBlockN - 1) / KV::kBlockN);
  dkdv<<<grid_kv, KV::kThreads, KV::kSmemBytes, stream>>>(kv_maps[0], kv_maps[1], kv_maps[2], kv_maps[3], p);
  const dim3 grid_q(p.batch * p.heads_q, (p.seq_q + Q::kBlockM - 1) / Q::kBlockM);
  dq<<<grid_q, Q::kThreads, Q::kSmemBytes, stream>>>(q_maps[0], q_maps[1], q_maps[2], q_maps[3], p);
  return true;
}

}  // namespace pyext
