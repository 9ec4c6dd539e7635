// Building blocks shared by the FlashAttention kernels: tiles copied into
// shared memory with cp.async, and one warp's tensor-core products over them.
//
// Shared tiles are row-major with rows of kD + 8 elements: the 16 padding
// bytes shift consecutive rows by 4 banks, so the 8 row addresses of an
// ldmatrix (16 bytes each) cover all 32 banks once (no bank conflict) for
// every kD that is a multiple of 32.
#pragma once

#include <cstdint>

#include "common/float_math.cuh"
#include "common/mma.cuh"
#include "common/red_add.cuh"
#include "flash_attention/flash_attention.h"

namespace pyext {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <int kD> constexpr int kSmemStride = kD + 8;

// The grids of the kernels that take one block each are (blocks along the
// sequence, heads, batch), as the Triton kernels' are: the block fastest.
// The CTAs running at once are then the blocks of a few heads, which read
// those heads' K and V (or Q and dO) from HBM once and from L2 after; with
// the head fastest, as these grids had it until session 46, they were as
// many heads, each reading its own from HBM (benchmarks/NOTES.md, "A head's
// blocks together"). Batch and heads: at most 65535 each (check_grid).
inline dim3 head_block_grid(int batch, int heads, int blocks) { return dim3(blocks, heads, batch); }

// The query block of step i of a dK/dV CTA, whose steps walk m_blocks query
// blocks for each query head of its group: each key block (blockIdx.x) starts
// at its own and wraps round. The key blocks of a head run at once (the
// grid's order), and walking from one start they would add into the same dQ
// rows at the same moments (the dQ-atomic backward). Both modes walk alike,
// so dK and dV come out the same bits in either.
__device__ __forceinline__ int dkdv_step_block(int i, int m_blocks) { return (i + blockIdx.x) % m_blocks; }

// Causal ranges of a block, from "query i sees key j iff j <= i + causal_offset":
// one past the last key any query row in [m0, m0 + rows) sees (keys from there
// on are masked for the whole block; Sk when not causal) ...
__device__ __forceinline__ int keys_end(const FlashAttnParams& p, int m0, int rows) {
  return p.causal ? max(0, min(p.seq_k, min(m0 + rows, p.seq_q) + p.causal_offset)) : p.seq_k;
}

// ... and the first query row, rounded down to a block of `rows`, that sees
// key n0: queries before n0 - causal_offset see none of the keys from n0 on.
__device__ __forceinline__ int queries_begin(const FlashAttnParams& p, int n0, int rows) {
  return p.causal ? max(n0 - p.causal_offset, 0) / rows * rows : 0;
}

// Rows row0 .. row0 + kRows - 1 of a (n_rows, d) matrix with row stride
// `row_stride` (elements, unit column stride) into a [kRows][kD + 8] shared
// tile, 16 bytes (8 elements) per cp.async; rows >= n_rows and columns >= d
// (d a multiple of 8) are zero-filled. `base` is row 0 of the matrix, a valid
// address that the zero-fill copies point at.
template <typename T, int kRows, int kD, int kThreads>
__device__ __forceinline__ void load_tile_async(T* smem, const T* base, int64_t row_stride, int row0, int n_rows,
                                                int d, int tid) {
  constexpr int kChunks = kD / 8;
  constexpr int kTotal = kRows * kChunks;
#pragma unroll 1  // unrolled, the per-copy addresses get hoisted out of the key loop and spill at kD >= 224
  for (int i = 0; i < (kTotal + kThreads - 1) / kThreads; ++i) {
    const int c = tid + i * kThreads;
    if (kTotal % kThreads != 0 && c >= kTotal) break;
    const int r = c / kChunks, col = (c % kChunks) * 8;
    const bool ok = row0 + r < n_rows && col < d;
    const T* src = ok ? base + int64_t(row0 + r) * row_stride + col : base;
    cp_async_16(smem + r * kSmemStride<kD> + col, src, ok);
  }
}

// Double buffering with cp.async, at the top of step i of `steps`: starts
// the copies of step i + 1 into the other buffer (load(i + 1, 1 - i % 2), one
// commit group), waits for step i's (all groups but the newest) and makes
// them visible to the whole block.
template <typename Load>
__device__ __forceinline__ void cp_async_prefetch_next(int i, int steps, const Load& load) {
  if (i + 1 < steps) {
    load(i + 1, 1 - i % 2);
    cp_async_commit();
    cp_async_wait<1>();
  } else {
    cp_async_wait<0>();
  }
  __syncthreads();
}

// acc (16 kMT x kN) += A B^T for one warp, both operands in shared memory
// with the reduction dim (kK) contiguous: A is kMT tiles of 16 rows, tile t
// at `a` + 16 t rows (row-major, stride kSmemStride<kD>), B is kN rows at `b`.
// acc[t][j] is the C fragment of tile t, columns 8j .. 8j + 7. Each B
// fragment read from shared memory feeds kMT products.
//   A, per 16-wide k step: ldmatrix_x4 with lane l on row l % 16, column
//     8 (l / 16): matrices (rows 0-7 | 8-15) x (cols 0-7 | 8-15) = a[0..3].
//   B, per pair of 8-column tiles: lane l on row 8 (l / 16) + l % 8, column
//     8 ((l / 8) % 2): r[0], r[1] = b0, b1 of tile 2p; r[2], r[3] of tile 2p+1.
template <typename T, int kMT, int kN, int kK, int kD>
__device__ __forceinline__ void warp_mma_nt_tiles(float (&acc)[kMT][kN / 8][4], const T* a, const T* b, int lane) {
  constexpr int kS = kSmemStride<kD>;
#pragma unroll
  for (int ks = 0; ks < kK / 16; ++ks) {
    uint32_t af[kMT][4];
#pragma unroll
    for (int t = 0; t < kMT; ++t) ldmatrix_x4(af[t], a + (16 * t + lane % 16) * kS + ks * 16 + (lane / 16) * 8);
#pragma unroll
    for (int p = 0; p < kN / 16; ++p) {
      uint32_t bf[4];
      ldmatrix_x4(bf, b + (p * 16 + (lane / 16) * 8 + lane % 8) * kS + ks * 16 + ((lane / 8) % 2) * 8);
#pragma unroll
      for (int t = 0; t < kMT; ++t) {
        mma_m16n8k16<T>(acc[t][2 * p], af[t], bf[0], bf[1]);
        mma_m16n8k16<T>(acc[t][2 * p + 1], af[t], bf[2], bf[3]);
      }
    }
  }
}

// The same for one 16-row tile: acc[j] is the C fragment of columns 8j .. 8j + 7.
template <typename T, int kN, int kK, int kD>
__device__ __forceinline__ void warp_mma_nt(float (&acc)[kN / 8][4], const T* a, const T* b, int lane) {
  warp_mma_nt_tiles<T, 1, kN, kK, kD>(reinterpret_cast<float(&)[1][kN / 8][4]>(acc), a, b, lane);
}

// acc (16 kMT x kN) += A B for one warp: A (16 kMT x kK) in registers as A
// fragments (af[t][s]: tile t, k = 16s .. 16s + 15), B (kK x kN) in shared
// memory with rows along k and columns contiguous (stride kSmemStride<kD>),
// read transposed, each fragment feeding kMT products:
//   ldmatrix_x4_trans with lane l on row 16s + l % 16, column 16p + 8 (l / 16):
//   matrices (k 0-7, n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15)
//   = b0, b1 of tile 2p and b0, b1 of tile 2p + 1.
template <typename T, int kMT, int kK, int kN, int kD>
__device__ __forceinline__ void warp_mma_rt_tiles(float (&acc)[kMT][kN / 8][4], const uint32_t (&af)[kMT][kK / 16][4],
                                                  const T* b, int lane) {
  constexpr int kS = kSmemStride<kD>;
#pragma unroll
  for (int ks = 0; ks < kK / 16; ++ks) {
#pragma unroll
    for (int p = 0; p < kN / 16; ++p) {
      uint32_t bf[4];
      ldmatrix_x4_trans(bf, b + (ks * 16 + lane % 16) * kS + p * 16 + (lane / 16) * 8);
#pragma unroll
      for (int t = 0; t < kMT; ++t) {
        mma_m16n8k16<T>(acc[t][2 * p], af[t][ks], bf[0], bf[1]);
        mma_m16n8k16<T>(acc[t][2 * p + 1], af[t][ks], bf[2], bf[3]);
      }
    }
  }
}

// The same for one 16-row tile of A fragments (af[s]: k = 16s .. 16s + 15).
template <typename T, int kK, int kN, int kD>
__device__ __forceinline__ void warp_mma_rt(float (&acc)[kN / 8][4], const uint32_t (&af)[kK / 16][4],
                                            const T* b, int lane) {
  warp_mma_rt_tiles<T, 1, kK, kN, kD>(reinterpret_cast<float(&)[1][kN / 8][4]>(acc),
                                      reinterpret_cast<const uint32_t(&)[1][kK / 16][4]>(af), b, lane);
}

// C fragments of a 16 x kN fp32 tile -> A fragments of the same tile in T, in
// registers: the C layout of columns 16s .. 16s + 15 (tiles 2s, 2s + 1) is the
// A layout of k step s, so a[s] = {c[2s][0,1], c[2s][2,3], c[2s+1][0,1], c[2s+1][2,3]}.
template <typename T, int kN>
__device__ __forceinline__ void acc_to_a(const float (&c)[kN / 8][4], uint32_t (&a)[kN / 16][4]) {
#pragma unroll
  for (int s = 0; s < kN / 16; ++s) {
    a[s][0] = pack2<T>(c[2 * s][0], c[2 * s][1]);
    a[s][1] = pack2<T>(c[2 * s][2], c[2 * s][3]);
    a[s][2] = pack2<T>(c[2 * s + 1][0], c[2 * s + 1][1]);
    a[s][3] = pack2<T>(c[2 * s + 1][2], c[2 * s + 1][3]);
  }
}

template <int kN>
__device__ __forceinline__ void zero(float (&acc)[kN][4]) {
#pragma unroll
  for (int j = 0; j < kN; ++j) acc[j][0] = acc[j][1] = acc[j][2] = acc[j][3] = 0.f;
}

// Stores rows `row` (C elements 0, 1) and `row` + 8 (elements 2, 3) of a
// 16 x 8 kN fragment tile, times `mul[0]` / `mul[1]`, into a contiguous
// (n_rows, d) matrix at columns col0 + 8j + 2t; rows >= n_rows and columns
// >= d are skipped.
template <typename T, int kN>
__device__ __forceinline__ void store_acc(T* out, const float (&acc)[kN][4], int row, int n_rows, int col0, int d,
                                          const float (&mul)[2], int lane) {
  const int col = col0 + 2 * (lane % 4);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (row + 8 * r >= n_rows) continue;
    T* dst = out + int64_t(row + 8 * r) * d + col;  // one 64-bit address per row, constant offsets after
#pragma unroll
    for (int j = 0; j < kN; ++j) {
      if (col + 8 * j < d)
        *reinterpret_cast<uint32_t*>(dst + 8 * j) = pack2<T>(acc[j][2 * r] * mul[r], acc[j][2 * r + 1] * mul[r]);
    }
  }
}

// The forwards' epilogue: O / l (acc times `inv`) into `out` as store_acc
// stores it, and, where `low` is set (FlashAttnParams::out_lo), what that
// rounding to T left out, x - T(x) (exact in fp32), rounded to T at the same
// places: out + out_lo holds x to about 16 significant bits. A scale well
// above the default makes rows of P nearly one-hot, where the backward's
// D = rowsum(dO * O) from the rounded out alone costs dq and dk the rule
// (flash_bwd_delta_kernel.cuh; the Triton kernels' tiles._low_part).
template <typename T, int kN>
__device__ __forceinline__ void store_out(T* out, T* low, const float (&acc)[kN][4], int row, int n_rows, int d,
                                          const float (&inv)[2], int lane) {
  store_acc<T, kN>(out, acc, row, n_rows, 0, d, inv, lane);
  if (low == nullptr) return;
  const int col = 2 * (lane % 4);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (row + 8 * r >= n_rows) continue;
    T* dst = low + int64_t(row + 8 * r) * d + col;
#pragma unroll
    for (int j = 0; j < kN; ++j) {
      if (col + 8 * j >= d) continue;
      const float x0 = acc[j][2 * r] * inv[r], x1 = acc[j][2 * r + 1] * inv[r];
      *reinterpret_cast<uint32_t*>(dst + 8 * j) =
          pack2<T>(x0 - to_acc(from_acc<T>(x0)), x1 - to_acc(from_acc<T>(x1)));
    }
  }
}

// store_acc's atomic sibling: adds rows `row` (C elements 0, 1) and `row` + 8
// (elements 2, 3) of a 16 x 8 kN fp32 fragment tile, times `mul`, into a
// contiguous (n_rows, d) fp32 matrix at columns col0 + 8j + 2t, that other
// blocks add to as well; rows >= n_rows and columns >= d are skipped.
template <int kN>
__device__ __forceinline__ void red_add_acc(float* out, const float (&acc)[kN][4], int row, int n_rows, int col0,
                                            int d, float mul, int lane) {
  const int col = col0 + 2 * (lane % 4);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (row + 8 * r >= n_rows) continue;
    float* dst = out + int64_t(row + 8 * r) * d + col;
#pragma unroll
    for (int j = 0; j < kN; ++j)
      if (col + 8 * j < d) red_add_f32x2(dst + 8 * j, acc[j][2 * r] * mul, acc[j][2 * r + 1] * mul);
  }
}

}  // namespace pyext
