// FlashAttention backward, dK and dV of one block of 64 keys of one key head,
// summed in registers over every query block and every query head of its
// GQA group (no atomics: the sum runs in a fixed order, so it is bitwise
// deterministic). With P recomputed from the forward's lse:
//   s^T = k q^T * scale * log2(e);  p^T = exp2(s^T - lse * log2(e))
//   dV += p^T dO;  dp^T = v dO^T;  ds^T = p^T * (dp^T - delta);  dK += scale ds^T q
// where delta = rowsum(dO * O) per query (flash_bwd_delta.cu). Everything is
// transposed (keys along rows) so that each warp owns 16 keys: the C
// fragments of p^T and ds^T are A fragments of the next products.
// kD > 128: 8 warps, two per 16 keys, each accumulating half of the head dim
// of dK and dV (both compute s^T and dp^T in full) to stay in registers.
// kAccumulateDq (the non-deterministic backward, FlashAttention-2's dQ; no
// dQ kernel then): each step's ds^T (64 keys x kM queries, rounded to T, as
// dK uses it) goes to shared memory; after a barrier the warps share the
// step's dQ = scale ds k (kM x kD) in 16 x 32 tiles, A = ds read transposed
// from that tile, B = k, and add each to p.dq_accum (fp32) with atomic adds.
// 5 products a step instead of 4 here and the dQ kernel's 3; the blocks' adds
// land in any order, so dQ's last bits vary run to run.
#pragma once

#include <cmath>

#include "flash_attention/flash_attention.h"
#include "flash_attention/flash_tile.cuh"

namespace pyext {

template <int kD, bool kAccumulateDq = false>
struct FlashBwdDkDvTraits {
  static constexpr int kBlockN = 64;                    // keys per CTA
  static constexpr int kBlockM = kD <= 32 ? 64 : 32;   // queries per step (64 at kD = 64 spills on sm_90a)
  static constexpr int kSplit = kD <= 128 ? 1 : 2;     // warps per 16 keys
  static constexpr int kDw = kD / kSplit;              // head-dim columns of dK, dV per warp
  static constexpr int kThreads = 128 * kSplit;
  // CTAs an SM for __launch_bounds__, the deterministic kernel at D 32 and
  // 64: 4 and 3, what they ran at (128 and 133 registers, sm_80) before the
  // grid of session 46. Left to itself, ptxas 13.0 now gives D 32 149
  // registers (3 CTAs) and squeezes D 64 into 128 with a spill.
  static constexpr int kMinBlocks = kAccumulateDq ? 1 : kD == 32 ? 4 : kD == 64 ? 3 : 1;
  // kAccumulateDq: ds^T as [kBlockN][kBlockM + 8] in T, padded as the other
  // tiles: its rows are 80 or 144 bytes apart, so neither the stores nor the
  // transposing ldmatrix of 8 rows meets a bank twice.
  static constexpr int kDsStride = kBlockM + 8;
  static constexpr int kDsBytes = kAccumulateDq ? kBlockN * kDsStride * 2 : 0;
  static constexpr int kDqTiles = kBlockM / 16 * (kD / 32);  // 16 x 32 tiles of a step's dQ
  // k, v; 2 x (q, dO) in T; 2 x (lse2, delta) in fp32; [ds^T]
  static constexpr int kSmemBytes =
      (2 * kBlockN + 4 * kBlockM) * kSmemStride<kD> * 2 + 4 * kBlockM * 4 + kDsBytes;
  static dim3 grid(const FlashAttnParams& p) {
    return head_block_grid(p.batch, p.heads_kv, (p.seq_k + kBlockN - 1) / kBlockN);
  }
};

// kAccumulateDq's step: af holds this warp's 16 keys of ds^T (A fragments,
// rows keys); the step is query head bh % Hq of batch bh / Hq, rows m0 ...
// Stores them (one warp per 16 keys), waits for every warp's, then deals the
// step's 16 x 32 dQ tiles to the warps: A (16 queries x 64 keys) by
// ldmatrix .trans from the [key][query] tile (lane l: key 16 ks + 8 (l / 16)
// + l % 8, queries + 8 ((l / 8) % 2)), B = k (keys x head dim, as v in the
// forward's P V), then red_add_acc of the tile times scale.
template <typename T, int kD>
__device__ __forceinline__ void add_dq(const FlashAttnParams& p,
                                       const uint32_t (&af)[FlashBwdDkDvTraits<kD>::kBlockM / 16][4], T* sds,
                                       const T* sk, int bh, int m0, int warp, int lane) {
  using Tr = FlashBwdDkDvTraits<kD, true>;
  constexpr int kN = Tr::kBlockN, kM = Tr::kBlockM, kDs = Tr::kDsStride;
  if (warp < 4) {  // at kD > 128 warps w and w + 4 hold the same ds^T
    T* rows = sds + (warp % 4 * 16 + lane / 4) * kDs + 2 * (lane % 4);
#pragma unroll
    for (int ks = 0; ks < kM / 16; ++ks)
#pragma unroll
      for (int r = 0; r < 4; ++r)
        *reinterpret_cast<uint32_t*>(rows + (r % 2) * 8 * kDs + 16 * ks + 8 * (r / 2)) = af[ks][r];
  }
  __syncthreads();
  float* dq_rows = p.dq_accum + (int64_t(bh) * p.seq_q + m0) * p.head_dim;
  for (int tile = warp; tile < Tr::kDqTiles; tile += Tr::kThreads / 32) {
    const int r0 = tile % (kM / 16) * 16, c0 = tile / (kM / 16) * 32;
    if (c0 >= p.head_dim) continue;  // k is zero there: nothing to add
    uint32_t ds[kN / 16][4];
#pragma unroll
    for (int ks = 0; ks < kN / 16; ++ks)
      ldmatrix_x4_trans(ds[ks], sds + (16 * ks + 8 * (lane / 16) + lane % 8) * kDs + r0 + 8 * ((lane / 8) % 2));
    float acc[4][4];
    zero(acc);
    warp_mma_rt<T, kN, 32, kD>(acc, ds, sk + c0, lane);
    red_add_acc<4>(dq_rows, acc, r0 + lane / 4, p.seq_q - m0, c0, p.head_dim, p.scale, lane);
  }
}

template <typename T, int kD, bool kAccumulateDq>
__global__ void __launch_bounds__(FlashBwdDkDvTraits<kD>::kThreads, FlashBwdDkDvTraits<kD, kAccumulateDq>::kMinBlocks)
    flash_bwd_dkdv_kernel(const FlashAttnParams p) {
  using Tr = FlashBwdDkDvTraits<kD, kAccumulateDq>;
  constexpr int kN = Tr::kBlockN, kM = Tr::kBlockM, kS = kSmemStride<kD>;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sk = reinterpret_cast<T*>(smem);
  T* sv = sk + kN * kS;
  T* sq = sv + kN * kS;       // [2][kM][kS]
  T* sdo = sq + 2 * kM * kS;  // [2][kM][kS]
  float* slse = reinterpret_cast<float*>(sdo + 2 * kM * kS);  // [2][kM], lse * log2(e), +inf for no key
  float* sdelta = slse + 2 * kM;                              // [2][kM]
  T* sds = reinterpret_cast<T*>(sdelta + 2 * kM);             // kAccumulateDq: [kN][kM + 8], ds^T

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int kw = warp % 4, d0 = (warp / 4) * Tr::kDw;  // this warp's 16 keys and dK/dV columns
  const int b = blockIdx.z, hk = blockIdx.y;
  const int group = p.heads_q / p.heads_kv;
  const int n0 = blockIdx.x * kN;  // causal: a head's first keys, seen by the most queries, start first
  const int d = p.head_dim;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;
  load_tile_async<T, kN, kD, Tr::kThreads>(sk, k, p.k_row_stride, n0, p.seq_k, d, tid);
  load_tile_async<T, kN, kD, Tr::kThreads>(sv, v, p.v_row_stride, n0, p.seq_k, d, tid);

  const int m_lo = queries_begin(p, n0, kM);
  const int m_blocks = m_lo < p.seq_q ? (p.seq_q - m_lo + kM - 1) / kM : 0;
  // step i: query head hk * group + i / m_blocks, block dkdv_step_block(i, m_blocks)
  const int steps = group * m_blocks;
  auto load_step = [&](int i, int buf) {
    const int h = hk * group + i / m_blocks, m0 = m_lo + dkdv_step_block(i, m_blocks) * kM;
    const int64_t bh = int64_t(b) * p.heads_q + h;
    const T* q = static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride;
    const T* dout = static_cast<const T*>(p.dout) + bh * p.seq_q * d;
    load_tile_async<T, kM, kD, Tr::kThreads>(sq + buf * kM * kS, q, p.q_row_stride, m0, p.seq_q, d, tid);
    load_tile_async<T, kM, kD, Tr::kThreads>(sdo + buf * kM * kS, dout, d, m0, p.seq_q, d, tid);
    static_assert(kM <= Tr::kThreads, "one thread per query row");
    if (const int r = tid; r < kM) {
      const bool ok = m0 + r < p.seq_q;
      const float lse = ok ? p.lse[bh * p.seq_q + m0 + r] : -INFINITY;
      slse[buf * kM + r] = lse == -INFINITY ? INFINITY : lse * kLog2e;
      sdelta[buf * kM + r] = ok ? p.delta[bh * p.seq_q + m0 + r] : 0.f;
    }
  };
  if (steps > 0) load_step(0, 0);
  cp_async_commit();

  const float scale2 = p.scale * kLog2e;
  const int key = n0 + kw * 16 + lane / 4;  // this lane's keys: key, key + 8
  float dk[Tr::kDw / 8][4], dv[Tr::kDw / 8][4];
  zero(dk);
  zero(dv);

  for (int i = 0; i < steps; ++i) {
    const int buf = i % 2;
    cp_async_prefetch_next(i, steps, load_step);
    const T* q_tile = sq + buf * kM * kS;
    const T* do_tile = sdo + buf * kM * kS;
    const int m0 = m_lo + dkdv_step_block(i, m_blocks) * kM;

    float pt[kM / 8][4];  // p^T: rows keys, columns queries
    zero(pt);
    warp_mma_nt<T, kM, kD, kD>(pt, sk + kw * 16 * kS, q_tile, lane);
#pragma unroll
    for (int j = 0; j < kM / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int qc = 8 * j + 2 * (lane % 4) + e % 2, qi = m0 + qc, kj = key + 8 * (e / 2);
        const bool visible = qi < p.seq_q && kj < p.seq_k && (!p.causal || kj <= qi + p.causal_offset);
        pt[j][e] = visible ? exp2f(pt[j][e] * scale2 - slse[buf * kM + qc]) : 0.f;
      }
    }
    uint32_t af[kM / 16][4];
    acc_to_a<T, kM>(pt, af);
    warp_mma_rt<T, kM, Tr::kDw, kD>(dv, af, do_tile + d0, lane);

    float dst[kM / 8][4];  // dp^T, then ds^T
    zero(dst);
    warp_mma_nt<T, kM, kD, kD>(dst, sv + kw * 16 * kS, do_tile, lane);
#pragma unroll
    for (int j = 0; j < kM / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e)
        dst[j][e] = pt[j][e] * (dst[j][e] - sdelta[buf * kM + 8 * j + 2 * (lane % 4) + e % 2]);
    }
    acc_to_a<T, kM>(dst, af);
    warp_mma_rt<T, kM, Tr::kDw, kD>(dk, af, q_tile + d0, lane);
    if constexpr (kAccumulateDq)
      add_dq<T, kD>(p, af, sds, sk, b * p.heads_q + hk * group + i / m_blocks, m0, warp, lane);
    __syncthreads();  // every warp is done with this buffer (and ds^T) before it is refilled
  }
  cp_async_wait<0>();

  const int64_t row_base = (int64_t(blockIdx.z) * p.heads_kv + blockIdx.y) * p.seq_k;
  const float one[2] = {1.f, 1.f}, scale[2] = {p.scale, p.scale};
  store_acc<T, Tr::kDw / 8>(static_cast<T*>(p.dv) + row_base * d, dv, key, p.seq_k, d0, d, one, lane);
  store_acc<T, Tr::kDw / 8>(static_cast<T*>(p.dk) + row_base * d, dk, key, p.seq_k, d0, d, scale, lane);
}

}  // namespace pyext
