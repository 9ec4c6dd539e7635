// FlashAttention forward (FlashAttention-2 scheme, mma.sync for sm_80+).
//
// One CTA per (batch * query head, block of 64 queries); 4 warps, each owning
// 16 query rows. K/V tiles of kBlockN keys are double-buffered with cp.async:
// the copy of tile j + 1 runs while tile j is used. Per tile, in registers:
// s = q k^T, then the online softmax of flash_softmax.cuh (its derivation is
// there) and o = o * alpha + p v; at the end out = o / l and lse.
#pragma once

#include <cmath>

#include "flash_attention/flash_attention.h"
#include "flash_attention/flash_softmax.cuh"
#include "flash_attention/flash_tile.cuh"

namespace pyext {

template <int kD>
struct FlashFwdTraits {
  static constexpr int kBlockM = 64;
  static constexpr int kBlockN = kD <= 128 ? 64 : 32;  // keeps o, s in registers and smem under 100 KB
  static constexpr int kThreads = 128;
  static constexpr int kSmemBytes = (kBlockM + 4 * kBlockN) * kSmemStride<kD> * 2;  // q, 2 x (k, v)
  static dim3 grid(const FlashAttnParams& p) { return dim3(p.batch * p.heads_q, (p.seq_q + kBlockM - 1) / kBlockM); }
};

template <typename T, int kD>
__global__ void __launch_bounds__(FlashFwdTraits<kD>::kThreads) flash_fwd_kernel(const FlashAttnParams p) {
  using Tr = FlashFwdTraits<kD>;
  constexpr int kM = Tr::kBlockM, kN = Tr::kBlockN, kS = kSmemStride<kD>;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sq = reinterpret_cast<T*>(smem);
  T* sk = sq + kM * kS;      // [2][kN][kS]
  T* sv = sk + 2 * kN * kS;  // [2][kN][kS]

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int bh = blockIdx.x, b = bh / p.heads_q, h = bh % p.heads_q;
  const int hk = h / (p.heads_q / p.heads_kv);
  const int m0 = blockIdx.y * kM;
  const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;
  const int d = p.head_dim;

  // Keys past n_end are masked for every row of this block.
  const int n_end = keys_end(p, m0, kM);
  const int n_blocks = (n_end + kN - 1) / kN;
  auto load_kv = [&](int nb, int buf) {
    load_tile_async<T, kN, kD, Tr::kThreads>(sk + buf * kN * kS, k, p.k_row_stride, nb * kN, p.seq_k, d, tid);
    load_tile_async<T, kN, kD, Tr::kThreads>(sv + buf * kN * kS, v, p.v_row_stride, nb * kN, p.seq_k, d, tid);
  };
  load_tile_async<T, kM, kD, Tr::kThreads>(sq, q, p.q_row_stride, m0, p.seq_q, d, tid);
  if (n_blocks > 0) load_kv(0, 0);
  cp_async_commit();

  const float scale2 = p.scale * kLog2e;
  const int row = m0 + warp * 16 + lane / 4;  // this lane's rows: row, row + 8
  float o[kD / 8][4];
  zero(o);
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // l: this lane's partial row sums

  for (int nb = 0; nb < n_blocks; ++nb) {
    const int buf = nb % 2;
    cp_async_prefetch_next(nb, n_blocks, load_kv);

    float s[kN / 8][4];
    zero(s);
    warp_mma_nt<T, kN, kD, kD>(s, sq + warp * 16 * kS, sk + buf * kN * kS, lane);

    scale_and_mask<kN>(s, p, scale2, nb * kN, m0, row, lane);
    online_softmax_step<kN>(s, m, l, [&](int r, float alpha) { rescale_row(o, r, alpha); });

    uint32_t pa[kN / 16][4];
    acc_to_a<T, kN>(s, pa);
    warp_mma_rt<T, kN, kD, kD>(o, pa, sv + buf * kN * kS, lane);
    __syncthreads();  // every warp is done with this buffer before it is refilled
  }
  cp_async_wait<0>();

  float inv[2];
  const int64_t row_base = int64_t(bh) * p.seq_q;
  softmax_finish(m, l, inv, p.lse + row_base, row, p.seq_q, lane);
  store_acc<T, kD / 8>(static_cast<T*>(p.out) + row_base * d, o, row, p.seq_q, 0, d, inv, lane);
}

}  // namespace pyext
