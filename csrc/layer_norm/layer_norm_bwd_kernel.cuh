// LayerNorm and RMSNorm backward kernels on rows of n = cols elements, and
// bwd_launches, which picks and orders them (layer_norm_bwd.cu launches them;
// host code can include this file: tests/cuda_emulation). Arithmetic in
// A = fp32 (fp64 for fp64 input). Layout of a row over threads: layer_norm_rows.cuh.
//
// Backward, with xhat = (x - mean) * rstd and g = dy * w (g = dy without w),
// x - mean taken as d - e, d = x - mean and e = sum(d) / n: the saved mean is
// rounded at the row's offset (an ulp of 3000 is 2.4e-4 in fp32), e is that
// rounding, and d - e is exact to the row's spread (the forward's correction):
//   dbias   = sum over rows of dy,   dweight = sum over rows of dy * xhat
//   LayerNorm  d xhat_i / d x_j = rstd * (delta_ij - 1/n - xhat_i * xhat_j / n), so
//              dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
//   RMSNorm    xhat = x * rstd,  d xhat_i / d x_j = rstd * (delta_ij - xhat_i * xhat_j / n):
//              dx = rstd * (g - xhat * mean(g * xhat))
//   Bytes: read x and dy, write dx, once each, plus the per-row statistics and
//   w; dweight/dbias cost one row of partial sums per block (written, then
//   read once by stage two), small next to x, dy and dx once rows >> blocks.
//
// dweight and dbias are reduced in two stages without atomics: each block of
// stage one keeps its columns' sums in registers over the rows it owns and
// writes one row of partials; stage two adds the partial rows in a fixed order.
// Same grid, same order, same bits on every run.
//
// Prefetch (16-byte vectors, where the device grants the shared memory): a
// block of 512 threads holds four row-sized arrays in ~100 registers, so one
// fits an SM, and its next row's loads would wait for this row's sums. So
// each thread copies its own vectors of the next row's x and dy into shared
// memory (cp.async) before this row's work, two buffers taking turns, and
// waits only for its own copies: two rows in flight an SM.
#pragma once

#include "layer_norm/layer_norm.h"

#include "common/float_math.cuh"
#include "common/grid.h"
#include "common/group_reduce.cuh"
#include "common/launch.h"
#include "common/mma.cuh"
#include "common/vec.cuh"
#include "common/vec_acc.cuh"
#include "layer_norm/layer_norm_rows.cuh"

namespace pyext {
namespace norm {

// One block's partial column sums -> its row of `partial` (A, (grid, cols)).
// Several row groups per block: summed through shared memory, groups in order.
template <int TPR, int VEC, int VPT, int ROWS, typename A>
__device__ __forceinline__ void write_partial(const A (&acc)[VPT][VEC], A* partial_row, A* combine,
                                              int lane, int group, int64_t cols) {
  if constexpr (ROWS == 1) {
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int64_t col = (int64_t(i) * TPR + lane) * VEC;
      if (col < cols) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) partial_row[col + j] = acc[i][j];
      }
    }
  } else {
    constexpr int kCap = TPR * VPT * VEC;  // the columns one group covers
#pragma unroll
    for (int i = 0; i < VPT; ++i)
#pragma unroll
      for (int j = 0; j < VEC; ++j) combine[group * kCap + (i * TPR + lane) * VEC + j] = acc[i][j];
    __syncthreads();
    const int limit = cols < kCap ? int(cols) : kCap;
    for (int c = threadIdx.x; c < limit; c += blockDim.x) {
      A s = combine[c];
      for (int r = 1; r < ROWS; ++r) s += combine[r * kCap + c];
      partial_row[c] = s;
    }
    __syncthreads();
  }
}

// Dynamic shared memory of the prefetching backward: two buffers of each
// thread's vectors of x and dy.
template <int TPR, int VPT>
constexpr int kBwdPrefetchBytes = 2 * 2 * VPT * kBwdThreads<TPR> * 16;

// Issues thread `tid`'s copies of its vectors of x and dy for rows base + group
// into buffer `buf` of `staged` ([2 buffers][x, dy][VPT][threads] vectors),
// and closes them as one group (empty past the last row).
template <typename T, int TPR, int VEC, int VPT>
__device__ __forceinline__ void prefetch_rows(Vec<T, VEC>* staged, int buf, const NormBwdParams& p, int64_t base,
                                              int group, int lane, int tid) {
  constexpr int kThreads = kBwdThreads<TPR>;
  const int64_t row = base + group;
  if (row < p.rows) {
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int64_t col = (int64_t(i) * TPR + lane) * VEC;
      if (col >= p.cols) continue;
      cp_async_16(&staged[((buf * 2 + 0) * VPT + i) * kThreads + tid], static_cast<const T*>(p.x) + row * p.cols + col,
                  true);
      cp_async_16(&staged[((buf * 2 + 1) * VPT + i) * kThreads + tid],
                  static_cast<const T*>(p.dy) + row * p.cols + col, true);
    }
  }
  cp_async_commit();
}

template <typename T, typename W, int TPR, int VEC, int VPT, bool PREFETCH>
__global__ void __launch_bounds__(kBwdThreads<TPR>) norm_bwd_kernel(const NormBwdParams p) {
  using A = acc_t<T>;
  constexpr int kThreads = kBwdThreads<TPR>;
  constexpr int kRows = kThreads / TPR;
  static_assert(!PREFETCH || VEC * sizeof(T) == 16, "the prefetch copies 16-byte vectors");
  __shared__ A scratch[kThreads / 32 * 3];
  __shared__ A combine[kRows > 1 ? kThreads * VPT * VEC : 1];
  Vec<T, VEC>* staged = reinterpret_cast<Vec<T, VEC>*>(dynamic_smem());
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  const W* w = static_cast<const W*>(p.weight);
  T* dx = static_cast<T*>(p.dx);
  const int lane = threadIdx.x % TPR;
  const int group = threadIdx.x / TPR;
  const int64_t cols = p.cols;
  const A n = A(cols);
  const int64_t stride = int64_t(gridDim.x) * kRows;

  A dw[VPT][VEC], db[VPT][VEC];
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    fill(dw[i], A(0));
    fill(db[i], A(0));
  }
  if constexpr (PREFETCH)
    prefetch_rows<T, TPR, VEC, VPT>(staged, 0, p, int64_t(blockIdx.x) * kRows, group, lane, threadIdx.x);
  int buf = 0;
  for (int64_t base = int64_t(blockIdx.x) * kRows; base < p.rows; base += stride, buf ^= 1) {
    const int64_t row = base + group;
    const bool active = row < p.rows;
    const int64_t offset = row * cols;
    const A mean = active && !p.rms ? static_cast<const A*>(p.mean)[row] : A(0);
    const A rstd = active ? static_cast<const A*>(p.rstd)[row] : A(0);
    if constexpr (PREFETCH) {
      // The other buffer was last read on the row before, whose block
      // reduction (a barrier) followed every read of it.
      prefetch_rows<T, TPR, VEC, VPT>(staged, buf ^ 1, p, base + stride, group, lane, threadIdx.x);
      cp_async_wait<1>();  // this row's copies, the group before, have landed
    }
    // One pass for the sums, which need only d and g; a second for dx,
    // dweight and dbias, which need e. g is dy * w again there (w from cache),
    // the same product: mul_rn, so no fma makes g - mean(g) differ from it.
    A d[VPT][VEC], grad[VPT][VEC], param[VEC];
    bool valid[VPT];
    A sums[3] = {A(0), A(0), A(0)};  // sum(d), sum(g), sum(g * d)
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int64_t col = (int64_t(i) * TPR + lane) * VEC;
      valid[i] = active && col < cols;
      if (!valid[i]) {
        fill(d[i], A(0));
        fill(grad[i], A(0));
        continue;
      }
      if constexpr (PREFETCH) {
        const Vec<T, VEC> xv = staged[((buf * 2 + 0) * VPT + i) * kThreads + threadIdx.x];
        const Vec<T, VEC> dyv = staged[((buf * 2 + 1) * VPT + i) * kThreads + threadIdx.x];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          d[i][j] = to_acc(xv.v[j]);
          grad[i][j] = to_acc(dyv.v[j]);
        }
      } else {
        load_to_acc<T, VEC>(x + offset + col, d[i]);
        load_to_acc<T, VEC>(dy + offset + col, grad[i]);
      }
      if (w) load_to_acc<W, VEC>(w + col, param);
      else fill(param, A(1));
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        d[i][j] -= mean;
        const A g = mul_rn(grad[i][j], param[j]);
        sums[0] += d[i][j];
        sums[1] += g;
        sums[2] += g * d[i][j];
      }
    }
    group_sum<TPR>(sums, scratch);
    const A e = p.rms ? A(0) : sums[0] / n;
    const A mean_g = p.rms ? A(0) : sums[1] / n;
    const A mean_gx = rstd * (sums[2] / n - e * mean_g);  // mean(g * (d - e)) * rstd
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      if (!valid[i]) continue;
      const int64_t col = (int64_t(i) * TPR + lane) * VEC;
      A out[VEC];
      if (w) load_to_acc<W, VEC>(w + col, param);
      else fill(param, A(1));
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const A xhat = (d[i][j] - e) * rstd;
        out[j] = rstd * (mul_rn(grad[i][j], param[j]) - mean_g - xhat * mean_gx);
        dw[i][j] += grad[i][j] * xhat;
        db[i][j] += grad[i][j];
      }
      store_from_acc<T, VEC>(dx + offset + col, out);
    }
  }
  if (p.dweight_partial)
    write_partial<TPR, VEC, VPT, kRows>(dw, static_cast<A*>(p.dweight_partial) + blockIdx.x * cols,
                                        combine, lane, group, cols);
  if (p.dbias_partial)
    write_partial<TPR, VEC, VPT, kRows>(db, static_cast<A*>(p.dbias_partial) + blockIdx.x * cols,
                                        combine, lane, group, cols);
}

// One row per block at a time, looping over it: x and dy read twice (the
// sums, then dx). Each thread owns the same columns on every row, so it adds
// into its block's row of partials in global memory with no race.
template <typename T, typename W, int VEC>
__global__ void __launch_bounds__(kChunkThreads) norm_bwd_chunked_kernel(const NormBwdParams p) {
  using A = acc_t<T>;
  __shared__ A scratch[kChunkThreads / 32 * 3];
  const W* w = static_cast<const W*>(p.weight);
  const int64_t cols = p.cols;
  const A n = A(cols);
  const int64_t first = int64_t(threadIdx.x) * VEC;
  constexpr int64_t kStep = int64_t(kChunkThreads) * VEC;
  A* dw = p.dweight_partial ? static_cast<A*>(p.dweight_partial) + blockIdx.x * cols : nullptr;
  A* db = p.dbias_partial ? static_cast<A*>(p.dbias_partial) + blockIdx.x * cols : nullptr;

  bool first_row = true;
  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x, first_row = false) {
    const T* x = static_cast<const T*>(p.x) + row * cols;
    const T* dy = static_cast<const T*>(p.dy) + row * cols;
    T* dx = static_cast<T*>(p.dx) + row * cols;
    const A mean = p.rms ? A(0) : static_cast<const A*>(p.mean)[row];
    const A rstd = static_cast<const A*>(p.rstd)[row];
    A xhat[VEC], grad[VEC], param[VEC];
    A sums[3] = {A(0), A(0), A(0)};  // sum(d), sum(g), sum(g * d), d = x - mean
    for (int64_t col = first; col < cols; col += kStep) {
      load_to_acc<T, VEC>(x + col, xhat);
      load_to_acc<T, VEC>(dy + col, grad);
      if (w) load_to_acc<W, VEC>(w + col, param);
      else fill(param, A(1));
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const A d = xhat[j] - mean;
        const A g = mul_rn(grad[j], param[j]);
        sums[0] += d;
        sums[1] += g;
        sums[2] += g * d;
      }
    }
    group_sum<kChunkThreads>(sums, scratch);
    const A e = p.rms ? A(0) : sums[0] / n;
    const A mean_g = p.rms ? A(0) : sums[1] / n;
    const A mean_gx = rstd * (sums[2] / n - e * mean_g);  // mean(g * (d - e)) * rstd
    for (int64_t col = first; col < cols; col += kStep) {
      load_to_acc<T, VEC>(x + col, xhat);
      load_to_acc<T, VEC>(dy + col, grad);
      if (w) load_to_acc<W, VEC>(w + col, param);
      else fill(param, A(1));
      A out[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        xhat[j] = (xhat[j] - mean - e) * rstd;
        out[j] = rstd * (mul_rn(grad[j], param[j]) - mean_g - xhat[j] * mean_gx);
        if (dw) dw[col + j] = (first_row ? A(0) : dw[col + j]) + grad[j] * xhat[j];
        if (db) db[col + j] = (first_row ? A(0) : db[col + j]) + grad[j];
      }
      store_from_acc<T, VEC>(dx + col, out);
    }
  }
}

// Stage two: out[c] = sum over g of partial[g][c], g in a fixed order per
// (column, slice), slices added in order. Blocks of 32 columns x 16 slices;
// blockIdx.y picks the pair, (partial, out) then (partial2, out2): dweight
// and dbias in one launch.
constexpr int kSumCols = 32;
constexpr int kSumSlices = 16;

template <typename A, typename W>
__global__ void __launch_bounds__(kSumCols * kSumSlices)
    sum_partials_kernel(const A* partial, W* out, const A* partial2, W* out2, int parts, int64_t cols) {
  if (blockIdx.y == 1) {
    partial = partial2;
    out = out2;
  }
  __shared__ A slice_sums[kSumSlices][kSumCols + 1];
  const int64_t col = int64_t(blockIdx.x) * kSumCols + threadIdx.x;
  A s = A(0);
  if (col < cols)
    for (int g = threadIdx.y; g < parts; g += kSumSlices) s += partial[int64_t(g) * cols + col];
  slice_sums[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && col < cols) {
    A total = slice_sums[0][threadIdx.x];
    for (int y = 1; y < kSumSlices; ++y) total += slice_sums[y][threadIdx.x];
    out[col] = from_acc<W>(total);
  }
}

// Calls f(kernel, threads, blocks needed, dynamic shared memory) for the
// backward that fits p: with 16-byte vectors the prefetching kernel, where
// the device lets it have its shared memory (not past 99 KB, sm_86/sm_89).
template <typename T, typename W, int VEC, typename F>
void with_bwd_kernel(const NormBwdParams& p, F&& f) {
  with_row_config<VEC, kElemsPerThread<acc_t<T>>, kBwdMaxTpr>(p.cols, [&](auto tpr, auto vpt) {
    constexpr int TPR = decltype(tpr)::value;
    constexpr int VPT = decltype(vpt)::value;
    if constexpr (TPR == 0) {
      f(norm_bwd_chunked_kernel<T, W, VEC>, kChunkThreads, p.rows, 0);
    } else {
      constexpr int threads = kBwdThreads<TPR>;
      const int64_t blocks = ceil_div(p.rows, threads / TPR);
      if constexpr (VEC > 1) {
        constexpr int bytes = kBwdPrefetchBytes<TPR, VPT>;
        if (opt_in_smem(norm_bwd_kernel<T, W, TPR, VEC, VPT, true>, bytes)) {
          f(norm_bwd_kernel<T, W, TPR, VEC, VPT, true>, threads, blocks, bytes);
          return;
        }
      }
      f(norm_bwd_kernel<T, W, TPR, VEC, VPT, false>, threads, blocks, 0);
    }
  });
}

template <typename T>
bool bwd_vectorizable(const NormBwdParams& p) {
  return vectorizable<T>(p.cols, p.x, p.dy, p.dx, p.weight);
}

// Rows of partial sums the backward needs: its stage-one grid, as many blocks
// as are resident at once, at most the blocks its rows fill.
template <typename T, typename W>
int bwd_partial_rows(const NormBwdParams& p) {
  int grid = 0;
  auto plan = [&](auto kernel, int threads, int64_t blocks, int smem) {
    grid = resident_blocks(kernel, threads, blocks, smem);
  };
  if (bwd_vectorizable<T>(p)) with_bwd_kernel<T, W, kVec16<T>>(p, plan);
  else with_bwd_kernel<T, W, 1>(p, plan);
  return grid;
}

// Calls launch(kernel, grid, block, dynamic shared memory, args...) for each
// launch of the backward, in order: stage one on exactly p.partial_rows
// blocks (stage two reads every partial row), then stage two, one launch for
// dweight and dbias, where either is wanted.
template <typename T, typename W, typename F>
void bwd_launches(const NormBwdParams& p, F&& launch) {
  using A = acc_t<T>;
  auto stage_one = [&](auto kernel, int threads, int64_t, int smem) {
    launch(kernel, dim3(p.partial_rows), dim3(threads), smem, p);
  };
  if (bwd_vectorizable<T>(p)) with_bwd_kernel<T, W, kVec16<T>>(p, stage_one);
  else with_bwd_kernel<T, W, 1>(p, stage_one);
  const A* partials[2];
  W* sums[2];
  int wanted = 0;
  if (p.dweight) {
    partials[wanted] = static_cast<const A*>(p.dweight_partial);
    sums[wanted++] = static_cast<W*>(p.dweight);
  }
  if (p.dbias) {
    partials[wanted] = static_cast<const A*>(p.dbias_partial);
    sums[wanted++] = static_cast<W*>(p.dbias);
  }
  if (wanted == 0) return;
  const dim3 grid(grid_limit(ceil_div(p.cols, kSumCols)), wanted);
  launch(sum_partials_kernel<A, W>, grid, dim3(kSumCols, kSumSlices), 0, partials[0], sums[0],
         partials[wanted - 1], sums[wanted - 1], p.partial_rows, p.cols);
}

}  // namespace norm
}  // namespace pyext
