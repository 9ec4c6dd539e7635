// LayerNorm and RMSNorm forward kernels on rows of n = cols elements, and
// with_fwd_kernel, which picks the one for a row length (layer_norm_fwd.cu
// launches it; host code can include this file: tests/cuda_emulation).
// Statistics and all arithmetic in A = fp32 (fp64 for fp64 input). Layout of
// a row over threads: layer_norm_rows.cuh.
//
// Forward:
//   LayerNorm  mean = sum(x) / n,  var = sum((x - mean)^2) / n  (two passes over
//              the row while it sits in registers: no cancellation), both
//              corrected for the first sum's rounding (corrected_variance below),
//              rstd = 1 / sqrt(var + eps),  y = (x - mean - c) * rstd * w + b,
//              x - mean taken before the correction c: exact where x is near
//              the mean, so y is exact to the row's spread, not its offset.
//   RMSNorm    mean = 0,  rstd = 1 / sqrt(sum(x^2) / n + eps),  y = x * rstd * w
//   Bytes: read x, write y, once each, plus w and b (cached: read by every
//   block, from L2) and 8 (LayerNorm) or 4 bytes of statistics per row.
#pragma once

#include "layer_norm/layer_norm.h"

#include "common/float_math.cuh"
#include "common/group_reduce.cuh"
#include "common/vec.cuh"
#include "common/vec_acc.cuh"
#include "layer_norm/layer_norm_rows.cuh"

namespace pyext {
namespace norm {

// The corrected two-pass statistics. With dev = (sum d, sum d^2) over the
// row, d = x - mean, the first mean's rounding leaves c = sum(d) / n (0 in
// exact arithmetic): the mean is mean + c (saved so), x - mean is d - c, the
// variance sum(d^2) / n - c^2. A row of one value has d = c, so x - mean = 0
// and variance 0, exactly (y = b, as torch's Welford update gives). RMSNorm:
// mean 0 and c = 0, var = sum(x^2) / n.
// Returns the variance and sets `correction` to c.
template <typename A>
__device__ __forceinline__ A corrected_variance(const A (&dev)[2], A n, bool rms, A& correction) {
  correction = A(0);
  if (rms) return dev[1] / n;
  const A c = dev[0] / n;
  correction = c;
  const A var = dev[1] / n - c * c;
  return var > A(0) ? var : A(0);
}

template <typename T, typename W, int TPR, int VEC, int VPT>
__global__ void __launch_bounds__(kFwdThreads<TPR>) norm_fwd_kernel(const NormFwdParams p) {
  using A = acc_t<T>;
  constexpr int kRows = kFwdThreads<TPR> / TPR;
  __shared__ A scratch[kFwdThreads<TPR> / 32 * 2];
  const T* x = static_cast<const T*>(p.x);
  const W* w = static_cast<const W*>(p.weight);
  const W* b = static_cast<const W*>(p.bias);
  T* y = static_cast<T*>(p.y);
  const int lane = threadIdx.x % TPR;
  const int group = threadIdx.x / TPR;
  const int64_t cols = p.cols;
  const A n = A(cols);

  // The trip count is the same for every thread of the block (group_sum syncs).
  for (int64_t base = int64_t(blockIdx.x) * kRows; base < p.rows; base += int64_t(gridDim.x) * kRows) {
    const int64_t row = base + group;
    const bool active = row < p.rows;
    const int64_t offset = row * cols;
    A v[VPT][VEC];
    bool valid[VPT];
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int64_t col = (int64_t(i) * TPR + lane) * VEC;
      valid[i] = active && col < cols;
      if (valid[i]) load_to_acc<T, VEC>(x + offset + col, v[i]);
      else fill(v[i], A(0));
    }
    A mean = A(0);
    if (!p.rms) {
      A sum[1] = {A(0)};
#pragma unroll
      for (int i = 0; i < VPT; ++i)
#pragma unroll
        for (int j = 0; j < VEC; ++j) sum[0] += v[i][j];
      group_sum<TPR>(sum, scratch);
      mean = sum[0] / n;
    }
    A dev[2] = {A(0), A(0)};  // sums of d = x - mean and of d^2; v becomes d
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        v[i][j] = valid[i] ? v[i][j] - mean : A(0);
        dev[0] += v[i][j];
        dev[1] += v[i][j] * v[i][j];
      }
    }
    group_sum<TPR>(dev, scratch);
    A c;
    const A rstd = rsqrt(corrected_variance(dev, n, p.rms, c) + A(p.eps));
    if (active && lane == 0) {
      if (!p.rms) static_cast<A*>(p.mean)[row] = mean + c;
      static_cast<A*>(p.rstd)[row] = rstd;
    }
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      if (!valid[i]) continue;
      const int64_t col = (int64_t(i) * TPR + lane) * VEC;
      A out[VEC], param[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) out[j] = (v[i][j] - c) * rstd;
      if (w) {
        load_to_acc<W, VEC>(w + col, param);
#pragma unroll
        for (int j = 0; j < VEC; ++j) out[j] *= param[j];
      }
      if (b) {
        load_to_acc<W, VEC>(b + col, param);
#pragma unroll
        for (int j = 0; j < VEC; ++j) out[j] += param[j];
      }
      store_from_acc<T, VEC>(y + offset + col, out);
    }
  }
}

// One row per block, looping over it: three reads of x (mean, variance, output).
template <typename T, typename W, int VEC>
__global__ void __launch_bounds__(kChunkThreads) norm_fwd_chunked_kernel(const NormFwdParams p) {
  using A = acc_t<T>;
  __shared__ A scratch[kChunkThreads / 32 * 2];
  const W* w = static_cast<const W*>(p.weight);
  const W* b = static_cast<const W*>(p.bias);
  const int64_t cols = p.cols;
  const A n = A(cols);
  const int64_t first = int64_t(threadIdx.x) * VEC;
  constexpr int64_t kStep = int64_t(kChunkThreads) * VEC;

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const T* x = static_cast<const T*>(p.x) + row * cols;
    T* y = static_cast<T*>(p.y) + row * cols;
    A v[VEC];
    A mean = A(0);
    if (!p.rms) {
      A sum[1] = {A(0)};
      for (int64_t col = first; col < cols; col += kStep) {
        load_to_acc<T, VEC>(x + col, v);
#pragma unroll
        for (int j = 0; j < VEC; ++j) sum[0] += v[j];
      }
      group_sum<kChunkThreads>(sum, scratch);
      mean = sum[0] / n;
    }
    A dev[2] = {A(0), A(0)};
    for (int64_t col = first; col < cols; col += kStep) {
      load_to_acc<T, VEC>(x + col, v);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const A d = v[j] - mean;
        dev[0] += d;
        dev[1] += d * d;
      }
    }
    group_sum<kChunkThreads>(dev, scratch);
    A c;
    const A rstd = rsqrt(corrected_variance(dev, n, p.rms, c) + A(p.eps));
    if (threadIdx.x == 0) {
      if (!p.rms) static_cast<A*>(p.mean)[row] = mean + c;
      static_cast<A*>(p.rstd)[row] = rstd;
    }
    for (int64_t col = first; col < cols; col += kStep) {
      A param[VEC];
      load_to_acc<T, VEC>(x + col, v);
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] = (v[j] - mean - c) * rstd;
      if (w) {
        load_to_acc<W, VEC>(w + col, param);
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[j] *= param[j];
      }
      if (b) {
        load_to_acc<W, VEC>(b + col, param);
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[j] += param[j];
      }
      store_from_acc<T, VEC>(y + col, v);
    }
  }
}

// Calls f(kernel, threads, blocks) with the forward kernel that fits p's rows
// and its launch: one block per row (chunked), else rows of TPR threads.
template <typename T, typename W, int VEC, typename F>
void with_fwd_kernel(const NormFwdParams& p, F&& f) {
  with_row_config<VEC, kFwdElemsPerThread<T, VEC>, kFwdMaxTpr<T, VEC>>(p.cols, [&](auto tpr, auto vpt) {
    constexpr int TPR = decltype(tpr)::value;
    constexpr int VPT = decltype(vpt)::value;
    if constexpr (TPR == 0) {
      f(norm_fwd_chunked_kernel<T, W, VEC>, kChunkThreads, grid_limit(p.rows));
    } else {
      constexpr int threads = kFwdThreads<TPR>;
      f(norm_fwd_kernel<T, W, TPR, VEC, VPT>, threads, grid_limit(ceil_div(p.rows, threads / TPR)));
    }
  });
}

}  // namespace norm
}  // namespace pyext
