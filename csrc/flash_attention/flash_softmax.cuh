// The online softmax of the FlashAttention forward kernels (Stage 1 and
// Stage 2), on one lane's share of a 16 x kN tile of scores in the mma C
// fragment layout: rows `row` (elements 0, 1) and `row` + 8 (elements 2, 3),
// columns 8j + 2 (lane % 4) + e % 2 of fragment j. Per tile, base 2:
//   s = q k^T * scale * log2(e)     (masked keys -> -inf)
//   m' = max(m, rowmax s);  p = exp2(s - m');  alpha = exp2(m - m')
//   l' = l * alpha + rowsum p;  o' = o * alpha + p v
// and at the end out = o / l, lse = (m + log2 l) / log2(e). A row with no
// visible key keeps m = -inf: exponents use m' = 0 then, so exp2(-inf) = 0,
// never exp2(-inf - -inf); it ends with l = 0, out = 0 and lse = -inf.
// A row's 4 lanes (lane bits 0, 1) combine their maxima by shuffles; l stays
// a per-lane partial sum until the end.
#pragma once

#include <cmath>

#include "flash_attention/flash_tile.cuh"  // kLn2

namespace pyext {

// s *= scale2 (scale * log2(e)); then, on a tile that reaches past Sk or (causal)
// past the last key that row m0, the block's first, sees, keys past Sk and keys
// after the row's last visible one -> -inf. n0: the tile's first key.
// p by value: a reference to the kernel's parameter takes its address, and
// ptxas then kept a copy of it on the stack (Stage 1, D = 160).
template <int kN>
__device__ __forceinline__ void scale_and_mask(float (&s)[kN / 8][4], const FlashAttnParams p, float scale2, int n0,
                                               int m0, int row, int lane) {
  const bool edge = n0 + kN > p.seq_k || (p.causal && n0 + kN - 1 > m0 + p.causal_offset);
#pragma unroll
  for (int j = 0; j < kN / 8; ++j) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[j][e] *= scale2;
      if (edge) {
        const int col = n0 + 8 * j + 2 * (lane % 4) + e % 2, r = row + 8 * (e / 2);
        if (col >= p.seq_k || (p.causal && col > r + p.causal_offset)) s[j][e] = -INFINITY;
      }
    }
  }
}

// One tile's update of m and l (above); s becomes p = exp2(s - m'), and
// rescale(r, alpha) is called with row r's alpha = exp2(m - m') for the
// caller's o (rescale_row now, or kept for later).
template <int kN, typename Rescale>
__device__ __forceinline__ void online_softmax_step(float (&s)[kN / 8][4], float (&m)[2], float (&l)[2],
                                                    const Rescale& rescale) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float mx = m[r];
#pragma unroll
    for (int j = 0; j < kN / 8; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
    const float m_use = mx == -INFINITY ? 0.f : mx;
    const float alpha = exp2f(m[r] - m_use);
    m[r] = mx;
    l[r] *= alpha;
    rescale(r, alpha);
#pragma unroll
    for (int j = 0; j < kN / 8; ++j) {
      s[j][2 * r] = exp2f(s[j][2 * r] - m_use);
      s[j][2 * r + 1] = exp2f(s[j][2 * r + 1] - m_use);
      l[r] += s[j][2 * r] + s[j][2 * r + 1];
    }
  }
}

// Row r of this lane's share of o (r = 0: elements 0, 1; r = 1: 2, 3) *= alpha.
template <int kJ>
__device__ __forceinline__ void rescale_row(float (&o)[kJ][4], int r, float alpha) {
#pragma unroll
  for (int j = 0; j < kJ; ++j) {
    o[j][2 * r] *= alpha;
    o[j][2 * r + 1] *= alpha;
  }
}

// The end of the forward: out = o / l (0 for a row with l = 0) and lse =
// (m + log2 l) / log2(e) (-inf for it), for the rows of this lane below Sq.
// inv receives 1 / l per row for the caller's store of o.
__device__ __forceinline__ void softmax_finish(const float (&m)[2], const float (&l)[2], float (&inv)[2],
                                               float* lse_rows, int row, int seq_q, int lane) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float sum = l[r];
    sum += __shfl_xor_sync(0xffffffffu, sum, 1);
    sum += __shfl_xor_sync(0xffffffffu, sum, 2);
    inv[r] = sum > 0.f ? 1.f / sum : 0.f;
    if (lane % 4 == 0 && row + 8 * r < seq_q)
      lse_rows[row + 8 * r] = sum > 0.f ? (m[r] + log2f(sum)) * kLn2 : -INFINITY;
  }
}

}  // namespace pyext
