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
#pragma once

#include <cmath>

#include "flash_attention/flash_attention.h"
#include "flash_attention/flash_tile.cuh"

namespace pyext {

template <int kD>
struct FlashBwdDkDvTraits {
  static constexpr int kBlockN = 64;                    // keys per CTA
  static constexpr int kBlockM = kD <= 32 ? 64 : 32;   // queries per step (64 at kD = 64 spills on sm_90a)
  static constexpr int kSplit = kD <= 128 ? 1 : 2;     // warps per 16 keys
  static constexpr int kDw = kD / kSplit;              // head-dim columns of dK, dV per warp
  static constexpr int kThreads = 128 * kSplit;
  // k, v; 2 x (q, dO) in T; 2 x (lse2, delta) in fp32
  static constexpr int kSmemBytes = (2 * kBlockN + 4 * kBlockM) * kSmemStride<kD> * 2 + 4 * kBlockM * 4;
  static dim3 grid(const FlashAttnParams& p) { return dim3(p.batch * p.heads_kv, (p.seq_k + kBlockN - 1) / kBlockN); }
};

template <typename T, int kD>
__global__ void __launch_bounds__(FlashBwdDkDvTraits<kD>::kThreads) flash_bwd_dkdv_kernel(const FlashAttnParams p) {
  using Tr = FlashBwdDkDvTraits<kD>;
  constexpr int kN = Tr::kBlockN, kM = Tr::kBlockM, kS = kSmemStride<kD>;
  extern __shared__ __align__(16) unsigned char smem[];
  T* sk = reinterpret_cast<T*>(smem);
  T* sv = sk + kN * kS;
  T* sq = sv + kN * kS;       // [2][kM][kS]
  T* sdo = sq + 2 * kM * kS;  // [2][kM][kS]
  float* slse = reinterpret_cast<float*>(sdo + 2 * kM * kS);  // [2][kM], lse * log2(e), +inf for no key
  float* sdelta = slse + 2 * kM;                              // [2][kM]

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int kw = warp % 4, d0 = (warp / 4) * Tr::kDw;  // this warp's 16 keys and dK/dV columns
  const int bhk = blockIdx.x, b = bhk / p.heads_kv, hk = bhk % p.heads_kv;
  const int group = p.heads_q / p.heads_kv;
  const int n0 = blockIdx.y * kN;
  const int d = p.head_dim;
  const T* k = static_cast<const T*>(p.k) + b * p.k_batch_stride + hk * p.k_head_stride;
  const T* v = static_cast<const T*>(p.v) + b * p.v_batch_stride + hk * p.v_head_stride;
  load_tile_async<T, kN, kD, Tr::kThreads>(sk, k, p.k_row_stride, n0, p.seq_k, d, tid);
  load_tile_async<T, kN, kD, Tr::kThreads>(sv, v, p.v_row_stride, n0, p.seq_k, d, tid);

  const int m_lo = queries_begin(p, n0, kM);
  const int m_blocks = m_lo < p.seq_q ? (p.seq_q - m_lo + kM - 1) / kM : 0;
  const int steps = group * m_blocks;  // step i: query head hk * group + i / m_blocks, block i % m_blocks
  auto load_step = [&](int i, int buf) {
    const int h = hk * group + i / m_blocks, m0 = m_lo + (i % m_blocks) * kM;
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
    const int m0 = m_lo + (i % m_blocks) * kM;

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
    __syncthreads();  // every warp is done with this buffer before it is refilled
  }
  cp_async_wait<0>();

  const int64_t row_base = int64_t(bhk) * p.seq_k;
  const float one[2] = {1.f, 1.f}, scale[2] = {p.scale, p.scale};
  store_acc<T, Tr::kDw / 8>(static_cast<T*>(p.dv) + row_base * d, dv, key, p.seq_k, d0, d, one, lane);
  store_acc<T, Tr::kDw / 8>(static_cast<T*>(p.dk) + row_base * d, dk, key, p.seq_k, d0, d, scale, lane);
}

}  // namespace pyext
