// FlashAttention forward (FlashAttention-2 scheme, mma.sync for sm_80+).
//
// One CTA per (batch * query head, block of kBlockM queries); 4 warps, each
// owning kTilesM tiles of 16 query rows. Per tile of kBlockN keys, in
// registers: s = q k^T, then the online softmax of flash_softmax.cuh (its
// derivation is there) and o = o * alpha + p v; at the end out = o / l and lse.
//
// Shared memory holds q and one tile each of k and v, loaded with cp.async
// in a staggered order so that each copy runs under a product:
//   wait k(j) | copy v(j) | s = q k(j)^T, softmax | wait v(j) | copy k(j+1) | o += p v(j)
//
// Shared-memory reads per tile per warp, D = 128, kBlockN = 64, bf16: k and v
// 2 x 16 KB by ldmatrix, q 4 KB per 16 rows, for 2 * 16 kTilesM * 64 * 128 * 2
// FLOP: 14.6 FLOP per byte with one 16-row tile per warp, 26 with two. An SM
// reads 128 bytes of shared memory a cycle, and its mma.sync products need
// 16 (A100) to about 21 (H100) FLOP per byte of that to keep the tensor
// cores fed: two tiles per warp (as FlashAttention-2's 128-query blocks) up
// to D = 128, where o, s and p still fit in registers.
#pragma once

#include <cmath>

#include "flash_attention/flash_attention.h"
#include "flash_attention/flash_softmax.cuh"
#include "flash_attention/flash_tile.cuh"

namespace pyext {

template <int kD>
struct FlashFwdTraits {
  static constexpr int kWarps = 4;
  static constexpr int kTilesM = kD <= 128 ? 2 : 1;  // 16-row tiles per warp
  static constexpr int kBlockM = 16 * kTilesM * kWarps;
  static constexpr int kBlockN = kD <= 128 ? 64 : 32;  // keeps o, s in registers
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kSmemBytes = (kBlockM + 2 * kBlockN) * kSmemStride<kD> * 2;  // q, k, v
  static dim3 grid(const FlashAttnParams& p) {
    return head_block_grid(p.batch, p.heads_q, (p.seq_q + kBlockM - 1) / kBlockM);
  }
};

template <typename T, int kD>
__global__ void __launch_bounds__(FlashFwdTraits<kD>::kThreads) flash_fwd_kernel(const FlashAttnParams p) {
  using Tr = FlashFwdTraits<kD>;
  constexpr int kM = Tr::kBlockM, kN = Tr::kBlockN, kMT = Tr::kTilesM, kS = kSmemStride<kD>;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sq = reinterpret_cast<T*>(smem);
  T* sk = sq + kM * kS;  // [kN][kS]
  T* sv = sk + kN * kS;  // [kN][kS]

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int b = blockIdx.z, h = blockIdx.y, bh = b * p.heads_q + h;
  const int hk = h / (p.heads_q / p.heads_kv);
  const int m0 = (gridDim.x - 1 - blockIdx.x) * kM;  // a head's longest causal rows start first
  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;
  const int d = p.head_dim;

  // Keys past n_end are masked for every row of this block.
  const int n_end = keys_end(p, m0, kM);
  const int n_blocks = (n_end + kN - 1) / kN;
  load_tile_async<T, kM, kD, Tr::kThreads>(sq, q, p.q_row_stride, m0, p.seq_q, d, tid);
  if (n_blocks > 0) load_tile_async<T, kN, kD, Tr::kThreads>(sk, k, p.k_row_stride, 0, p.seq_k, d, tid);
  cp_async_commit();

  const float scale2 = p.scale * kLog2e;
  const T* sq_warp = sq + warp * 16 * kMT * kS;
  int row[kMT];  // this lane's rows of tile t: row[t], row[t] + 8
  float o[kMT][kD / 8][4], m[kMT][2], l[kMT][2];  // l: this lane's partial row sums
#pragma unroll
  for (int t = 0; t < kMT; ++t) {
    row[t] = m0 + (warp * kMT + t) * 16 + lane / 4;
    zero(o[t]);
    m[t][0] = m[t][1] = -INFINITY;
    l[t][0] = l[t][1] = 0.f;
  }

  for (int nb = 0; nb < n_blocks; ++nb) {
    cp_async_wait<0>();
    __syncthreads();  // k(nb) landed for all; every warp is done with v(nb - 1)
    load_tile_async<T, kN, kD, Tr::kThreads>(sv, v, p.v_row_stride, nb * kN, p.seq_k, d, tid);
    cp_async_commit();

    float s[kMT][kN / 8][4];
#pragma unroll
    for (int t = 0; t < kMT; ++t) zero(s[t]);
    warp_mma_nt_tiles<T, kMT, kN, kD, kD>(s, sq_warp, sk, lane);

    uint32_t pa[kMT][kN / 16][4];
#pragma unroll
    for (int t = 0; t < kMT; ++t) {
      scale_and_mask<kN>(s[t], p, scale2, nb * kN, m0, row[t], lane);
      online_softmax_step<kN>(s[t], m[t], l[t], [&](int r, float alpha) { rescale_row(o[t], r, alpha); });
      acc_to_a<T, kN>(s[t], pa[t]);
    }

    cp_async_wait<0>();
    __syncthreads();  // v(nb) landed for all; every warp is done with k(nb)
    if (nb + 1 < n_blocks)
      load_tile_async<T, kN, kD, Tr::kThreads>(sk, k, p.k_row_stride, (nb + 1) * kN, p.seq_k, d, tid);
    cp_async_commit();
    warp_mma_rt_tiles<T, kMT, kN, kD, kD>(o, pa, sv, lane);
  }
  cp_async_wait<0>();  // q's copies, when the block sees no key

  const int64_t row_base = int64_t(bh) * p.seq_q;
#pragma unroll
  for (int t = 0; t < kMT; ++t) {
    float inv[2];
    softmax_finish(m[t], l[t], inv, p.lse + row_base, row[t], p.seq_q, lane);
    store_out<T, kD / 8>(static_cast<T*>(p.out) + row_base * d,
                         p.out_lo ? static_cast<T*>(p.out_lo) + row_base * d : nullptr, o[t], row[t], p.seq_q, d,
                         inv, lane);
  }
}

}  // namespace pyext
