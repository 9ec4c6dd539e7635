// FlashAttention backward, dQ of one block of 64 queries of one query head,
// over every key block it sees, accumulated in registers (deterministic). With
// P recomputed from the forward's lse and delta = rowsum(dO * O):
//   s = q k^T * scale * log2(e);  p = exp2(s - lse * log2(e))
//   dp = dO v^T;  ds = p * (dp - delta);  dQ += scale ds k
// 4 warps of 16 query rows; K/V tiles double-buffered with cp.async as in
// the forward. The C fragment of ds is the A fragment of ds k.
#pragma once

#include <cmath>

#include "flash_attention/flash_attention.h"
#include "flash_attention/flash_tile.cuh"

namespace pyext {

template <int kD>
struct FlashBwdDqTraits {
  static constexpr int kBlockM = 64;
  static constexpr int kBlockN = kD <= 128 ? 64 : kD <= 192 ? 32 : 16;  // dq, s, dp stay in registers
  static constexpr int kThreads = 128;
  static constexpr int kSmemBytes = (2 * kBlockM + 4 * kBlockN) * kSmemStride<kD> * 2;  // q, dO, 2 x (k, v)
  static dim3 grid(const FlashAttnParams& p) {
    return head_block_grid(p.batch, p.heads_q, (p.seq_q + kBlockM - 1) / kBlockM);
  }
};

template <typename T, int kD>
__global__ void __launch_bounds__(FlashBwdDqTraits<kD>::kThreads) flash_bwd_dq_kernel(const FlashAttnParams p) {
  using Tr = FlashBwdDqTraits<kD>;
  constexpr int kM = Tr::kBlockM, kN = Tr::kBlockN, kS = kSmemStride<kD>;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sq = reinterpret_cast<T*>(smem);
  T* sdo = sq + kM * kS;
  T* sk = sdo + kM * kS;     // [2][kN][kS]
  T* sv = sk + 2 * kN * kS;  // [2][kN][kS]

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int b = blockIdx.z, h = blockIdx.y, bh = b * p.heads_q + h;
  const int hk = h / (p.heads_q / p.heads_kv);
  const int m0 = (gridDim.x - 1 - blockIdx.x) * kM;  // a head's longest causal rows start first
  const int d = p.head_dim;
  const int64_t row_base = int64_t(bh) * p.seq_q;
  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;

  const int n_end = keys_end(p, m0, kM);
  const int n_blocks = (n_end + kN - 1) / kN;
  auto load_kv = [&](int nb, int buf) {
    load_tile_async<T, kN, kD, Tr::kThreads>(sk + buf * kN * kS, k, p.k_row_stride, nb * kN, p.seq_k, d, tid);
    load_tile_async<T, kN, kD, Tr::kThreads>(sv + buf * kN * kS, v, p.v_row_stride, nb * kN, p.seq_k, d, tid);
  };
  load_tile_async<T, kM, kD, Tr::kThreads>(sq, q, p.q_row_stride, m0, p.seq_q, d, tid);
  load_tile_async<T, kM, kD, Tr::kThreads>(sdo, static_cast<const T*>(p.dout) + row_base * d, d, m0, p.seq_q, d,
                                           tid);
  if (n_blocks > 0) load_kv(0, 0);
  cp_async_commit();

  const float scale2 = p.scale * kLog2e;
  const int row = m0 + warp * 16 + lane / 4;  // this lane's rows: row, row + 8
  float lse2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const bool ok = row + 8 * r < p.seq_q;
    const float lse = ok ? p.lse[row_base + row + 8 * r] : -INFINITY;
    lse2[r] = lse == -INFINITY ? INFINITY : lse * kLog2e;  // a row with no key gets p = 0
    delta[r] = ok ? p.delta[row_base + row + 8 * r] : 0.f;
  }
  float dq[kD / 8][4];
  zero(dq);

  for (int nb = 0; nb < n_blocks; ++nb) {
    const int buf = nb % 2;
    cp_async_prefetch_next(nb, n_blocks, load_kv);
    const T* k_tile = sk + buf * kN * kS;

    float s[kN / 8][4];
    zero(s);
    warp_mma_nt<T, kN, kD, kD>(s, sq + warp * 16 * kS, k_tile, lane);
    const int n0 = nb * kN;
#pragma unroll
    for (int j = 0; j < kN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = n0 + 8 * j + 2 * (lane % 4) + e % 2, r = row + 8 * (e / 2);
        const bool visible = col < p.seq_k && (!p.causal || col <= r + p.causal_offset);
        s[j][e] = visible ? exp2f(s[j][e] * scale2 - lse2[e / 2]) : 0.f;
      }
    }
    float ds[kN / 8][4];  // dp, then ds
    zero(ds);
    warp_mma_nt<T, kN, kD, kD>(ds, sdo + warp * 16 * kS, sv + buf * kN * kS, lane);
#pragma unroll
    for (int j = 0; j < kN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) ds[j][e] = s[j][e] * (ds[j][e] - delta[e / 2]);
    }
    uint32_t af[kN / 16][4];
    acc_to_a<T, kN>(ds, af);
    warp_mma_rt<T, kN, kD, kD>(dq, af, k_tile, lane);
    __syncthreads();  // every warp is done with this buffer before it is refilled
  }
  cp_async_wait<0>();

  const float scale[2] = {p.scale, p.scale};
  // From the block's index again rather than row_base kept over the loop,
  // which ptxas spilled (at D 64, sm_80).
  const int64_t dq_base = (int64_t(blockIdx.z) * p.heads_q + blockIdx.y) * p.seq_q * d;
  store_acc<T, kD / 8>(static_cast<T*>(p.dq) + dq_base, dq, row, p.seq_q, 0, d, scale, lane);
}

}  // namespace pyext
