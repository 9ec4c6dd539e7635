// LayerNorm and RMSNorm forward on rows of n = cols elements.
// Statistics and all arithmetic in A = fp32 (fp64 for fp64 input). Layout of
// a row over threads: layer_norm_rows.cuh.
//
// Forward:
//   LayerNorm  mean = sum(x) / n,  var = sum((x - mean)^2) / n  (two passes over
//              the row while it sits in registers: no cancellation),
//              rstd = 1 / sqrt(var + eps),  y = (x - mean) * rstd * w + b
//   RMSNorm    mean = 0,  rstd = 1 / sqrt(sum(x^2) / n + eps),  y = x * rstd * w
//   Bytes: read x, write y, once each, plus w and b (cached: read by every
//   block, from L2) and 8 (LayerNorm) or 4 bytes of statistics per row.
#include "layer_norm/layer_norm.h"

#include "common/float_math.cuh"
#include "common/grid.h"
#include "common/group_reduce.cuh"
#include "common/vec.cuh"
#include "common/vec_acc.cuh"
#include "layer_norm/layer_norm_rows.cuh"

namespace pyext {
namespace {

using namespace norm;

template <typename T, typename W, int TPR, int VEC, int VPT>
__global__ void __launch_bounds__(kFwdThreads<TPR>) norm_fwd_kernel(const NormFwdParams p) {
  using A = acc_t<T>;
  constexpr int kRows = kFwdThreads<TPR> / TPR;
  __shared__ A scratch[kFwdThreads<TPR> / 32];
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
    A stat[1] = {A(0)};
    A mean = A(0);
    if (!p.rms) {
#pragma unroll
      for (int i = 0; i < VPT; ++i)
#pragma unroll
        for (int j = 0; j < VEC; ++j) stat[0] += v[i][j];
      group_sum<TPR>(stat, scratch);
      mean = stat[0] / n;
      stat[0] = A(0);
    }
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      if (!valid[i]) continue;
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const A d = v[i][j] - mean;
        stat[0] += d * d;
      }
    }
    group_sum<TPR>(stat, scratch);
    const A rstd = rsqrt(stat[0] / n + A(p.eps));
    if (active && lane == 0) {
      if (!p.rms) static_cast<A*>(p.mean)[row] = mean;
      static_cast<A*>(p.rstd)[row] = rstd;
    }
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      if (!valid[i]) continue;
      const int64_t col = (int64_t(i) * TPR + lane) * VEC;
      A out[VEC], param[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) out[j] = (v[i][j] - mean) * rstd;
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
  __shared__ A scratch[kChunkThreads / 32];
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
    A stat[1] = {A(0)};
    A mean = A(0);
    if (!p.rms) {
      for (int64_t col = first; col < cols; col += kStep) {
        load_to_acc<T, VEC>(x + col, v);
#pragma unroll
        for (int j = 0; j < VEC; ++j) stat[0] += v[j];
      }
      group_sum<kChunkThreads>(stat, scratch);
      mean = stat[0] / n;
      stat[0] = A(0);
    }
    for (int64_t col = first; col < cols; col += kStep) {
      load_to_acc<T, VEC>(x + col, v);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const A d = v[j] - mean;
        stat[0] += d * d;
      }
    }
    group_sum<kChunkThreads>(stat, scratch);
    const A rstd = rsqrt(stat[0] / n + A(p.eps));
    if (threadIdx.x == 0) {
      if (!p.rms) static_cast<A*>(p.mean)[row] = mean;
      static_cast<A*>(p.rstd)[row] = rstd;
    }
    for (int64_t col = first; col < cols; col += kStep) {
      A param[VEC];
      load_to_acc<T, VEC>(x + col, v);
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] = (v[j] - mean) * rstd;
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

template <typename T, typename W, int VEC>
void launch_fwd(const NormFwdParams& p, cudaStream_t stream) {
  with_row_config<VEC, kElemsPerThread<acc_t<T>>, kFwdMaxTpr>(p.cols, [&](auto tpr, auto vpt) {
    constexpr int TPR = decltype(tpr)::value;
    constexpr int VPT = decltype(vpt)::value;
    if constexpr (TPR == 0) {
      norm_fwd_chunked_kernel<T, W, VEC><<<grid_limit(p.rows), kChunkThreads, 0, stream>>>(p);
    } else {
      constexpr int threads = kFwdThreads<TPR>;
      const int64_t blocks = ceil_div(p.rows, threads / TPR);
      norm_fwd_kernel<T, W, TPR, VEC, VPT><<<grid_limit(blocks), threads, 0, stream>>>(p);
    }
  });
}

}  // namespace

template <typename T, typename W>
void norm_fwd(const NormFwdParams& p, cudaStream_t stream) {
  if (vectorizable<T>(p.cols, p.x, p.y, p.weight, p.bias)) launch_fwd<T, W, kVec16<T>>(p, stream);
  else launch_fwd<T, W, 1>(p, stream);
}

#define PYEXT_INSTANTIATE_NORM_FWD(T, W) template void norm_fwd<T, W>(const NormFwdParams&, cudaStream_t);
PYEXT_INSTANTIATE_NORM_FWD(float, float)
PYEXT_INSTANTIATE_NORM_FWD(double, double)
PYEXT_INSTANTIATE_NORM_FWD(__half, __half)
PYEXT_INSTANTIATE_NORM_FWD(__half, float)
PYEXT_INSTANTIATE_NORM_FWD(__nv_bfloat16, __nv_bfloat16)
PYEXT_INSTANTIATE_NORM_FWD(__nv_bfloat16, float)

}  // namespace pyext
