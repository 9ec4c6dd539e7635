// LayerNorm and RMSNorm, forward and backward, on rows of n = cols elements.
// Statistics and all arithmetic in A = fp32 (fp64 for fp64 input).
//
// Forward:
//   LayerNorm  mean = sum(x) / n,  var = sum((x - mean)^2) / n  (two passes over
//              the row while it sits in registers: no cancellation),
//              rstd = 1 / sqrt(var + eps),  y = (x - mean) * rstd * w + b
//   RMSNorm    mean = 0,  rstd = 1 / sqrt(sum(x^2) / n + eps),  y = x * rstd * w
//   Bytes: read x, write y, once each, plus w and b (cached: read by every
//   block, from L2) and 8 (LayerNorm) or 4 bytes of statistics per row.
//
// Backward, with xhat = (x - mean) * rstd and g = dy * w (g = dy without w):
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
// Layout: a group of TPR threads (a warp or several) owns a row; thread `lane`
// of the group holds VPT vectors of VEC elements at columns
// (i * TPR + lane) * VEC, so each access is a 16-byte vector (VEC > 1, when
// cols is a multiple of VEC and the pointers are 16-byte aligned) or a
// coalesced scalar (VEC = 1). The row is read once. Rows too long for the
// registers go through the chunked kernels, which loop over the row: the
// forward reads it three times (twice for RMSNorm), the backward twice, the
// repeats mostly from L2.
#include "layer_norm/layer_norm.h"

#include <climits>
#include <type_traits>

#include "common/float_math.cuh"
#include "common/grid.h"
#include "common/group_reduce.cuh"
#include "common/vec.cuh"
#include "common/vec_acc.cuh"

namespace pyext {
namespace {

// Elements of one row-sized array each thread keeps in registers on the fast
// path: 16 fp32 or 8 fp64 values. The backward keeps four such arrays.
template <typename A> constexpr int kElemsPerThread = int(64 / sizeof(A));

// Block sizes. The forward packs rows shorter than 128 threads several to a
// block. The backward uses blocks of at least 512 threads: fewer blocks fill
// the GPU, so fewer rows of partial sums; and it stops at 512 threads per row
// because four arrays of 16 would not fit the 64 registers a 1024-thread block
// allows.
template <int TPR> constexpr int kFwdThreads = TPR < 128 ? 128 : TPR;
template <int TPR> constexpr int kBwdThreads = TPR < 512 ? 512 : TPR;
constexpr int kFwdMaxTpr = 1024;
constexpr int kBwdMaxTpr = 512;
constexpr int kChunkThreads = 512;

template <int V> using Int = std::integral_constant<int, V>;

// Calls f(Int<TPR>, Int<VPT>) for the fast-path configuration whose rows hold
// `cols` elements (K per thread, VEC per access), or f(Int<0>, Int<0>) when
// the row is too long for MAX_TPR threads: the chunked kernels.
template <int VEC, int K, int MAX_TPR, typename F>
void with_row_config(int64_t cols, F&& f) {
  constexpr int V = K / VEC;
  if (cols <= 32 * VEC) f(Int<32>{}, Int<1>{});
  else if (cols <= 32 * K) f(Int<32>{}, Int<V>{});
  else if (cols <= 64 * K) f(Int<64>{}, Int<V>{});
  else if (cols <= 128 * K) f(Int<128>{}, Int<V>{});
  else if (cols <= 256 * K) f(Int<256>{}, Int<V>{});
  else if (cols <= 512 * K) f(Int<512>{}, Int<V>{});
  else if constexpr (MAX_TPR == 1024) {
    if (cols <= 1024 * K) f(Int<1024>{}, Int<V>{});
    else f(Int<0>{}, Int<0>{});
  } else {
    f(Int<0>{}, Int<0>{});
  }
}

template <typename A, int N>
__device__ __forceinline__ void fill(A (&v)[N], A value) {
#pragma unroll
  for (int j = 0; j < N; ++j) v[j] = value;
}

// ---------------------------------------------------------------- forward

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

// ---------------------------------------------------------------- backward

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

template <typename T, typename W, int TPR, int VEC, int VPT>
__global__ void __launch_bounds__(kBwdThreads<TPR>) norm_bwd_kernel(const NormBwdParams p) {
  using A = acc_t<T>;
  constexpr int kThreads = kBwdThreads<TPR>;
  constexpr int kRows = kThreads / TPR;
  __shared__ A scratch[kThreads / 32 * 2];
  __shared__ A combine[kRows > 1 ? kThreads * VPT * VEC : 1];
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  const W* w = static_cast<const W*>(p.weight);
  T* dx = static_cast<T*>(p.dx);
  const int lane = threadIdx.x % TPR;
  const int group = threadIdx.x / TPR;
  const int64_t cols = p.cols;
  const A n = A(cols);

  A dw[VPT][VEC], db[VPT][VEC];
#pragma unroll
  for (int i = 0; i < VPT; ++i) {
    fill(dw[i], A(0));
    fill(db[i], A(0));
  }
  for (int64_t base = int64_t(blockIdx.x) * kRows; base < p.rows; base += int64_t(gridDim.x) * kRows) {
    const int64_t row = base + group;
    const bool active = row < p.rows;
    const int64_t offset = row * cols;
    const A mean = active && !p.rms ? static_cast<const A*>(p.mean)[row] : A(0);
    const A rstd = active ? static_cast<const A*>(p.rstd)[row] : A(0);
    A xhat[VPT][VEC], g[VPT][VEC];
    bool valid[VPT];
    A sums[2] = {A(0), A(0)};  // sum(g), sum(g * xhat)
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      const int64_t col = (int64_t(i) * TPR + lane) * VEC;
      valid[i] = active && col < cols;
      if (!valid[i]) {
        fill(xhat[i], A(0));
        fill(g[i], A(0));
        continue;
      }
      A grad[VEC], param[VEC];
      load_to_acc<T, VEC>(x + offset + col, xhat[i]);
      load_to_acc<T, VEC>(dy + offset + col, grad);
      if (w) load_to_acc<W, VEC>(w + col, param);
      else fill(param, A(1));
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        xhat[i][j] = (xhat[i][j] - mean) * rstd;
        g[i][j] = grad[j] * param[j];
        dw[i][j] += grad[j] * xhat[i][j];
        db[i][j] += grad[j];
        sums[0] += g[i][j];
        sums[1] += g[i][j] * xhat[i][j];
      }
    }
    group_sum<TPR>(sums, scratch);
    const A mean_g = p.rms ? A(0) : sums[0] / n;
    const A mean_gx = sums[1] / n;
#pragma unroll
    for (int i = 0; i < VPT; ++i) {
      if (!valid[i]) continue;
      const int64_t col = (int64_t(i) * TPR + lane) * VEC;
      A out[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) out[j] = rstd * (g[i][j] - mean_g - xhat[i][j] * mean_gx);
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
  __shared__ A scratch[kChunkThreads / 32 * 2];
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
    A sums[2] = {A(0), A(0)};
    for (int64_t col = first; col < cols; col += kStep) {
      load_to_acc<T, VEC>(x + col, xhat);
      load_to_acc<T, VEC>(dy + col, grad);
      if (w) load_to_acc<W, VEC>(w + col, param);
      else fill(param, A(1));
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const A g = grad[j] * param[j];
        sums[0] += g;
        sums[1] += g * (xhat[j] - mean) * rstd;
      }
    }
    group_sum<kChunkThreads>(sums, scratch);
    const A mean_g = p.rms ? A(0) : sums[0] / n;
    const A mean_gx = sums[1] / n;
    for (int64_t col = first; col < cols; col += kStep) {
      load_to_acc<T, VEC>(x + col, xhat);
      load_to_acc<T, VEC>(dy + col, grad);
      if (w) load_to_acc<W, VEC>(w + col, param);
      else fill(param, A(1));
      A out[VEC];
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        xhat[j] = (xhat[j] - mean) * rstd;
        out[j] = rstd * (grad[j] * param[j] - mean_g - xhat[j] * mean_gx);
        if (dw) dw[col + j] = (first_row ? A(0) : dw[col + j]) + grad[j] * xhat[j];
        if (db) db[col + j] = (first_row ? A(0) : db[col + j]) + grad[j];
      }
      store_from_acc<T, VEC>(dx + col, out);
    }
  }
}

// Stage two: out[c] = sum over g of partial[g][c], g in a fixed order per
// (column, slice), slices added in order. Blocks of 32 columns x 16 slices.
constexpr int kSumCols = 32;
constexpr int kSumSlices = 16;

template <typename A, typename W>
__global__ void __launch_bounds__(kSumCols * kSumSlices)
    sum_partials_kernel(const A* partial, W* out, int parts, int64_t cols) {
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

// ------------------------------------------------------------- launchers

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
int grid_limit(int64_t blocks) { return int(blocks < INT_MAX ? blocks : INT_MAX); }

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

// Calls f(kernel, threads, blocks needed) for the backward that fits p.
template <typename T, typename W, int VEC, typename F>
void with_bwd_kernel(const NormBwdParams& p, F&& f) {
  with_row_config<VEC, kElemsPerThread<acc_t<T>>, kBwdMaxTpr>(p.cols, [&](auto tpr, auto vpt) {
    constexpr int TPR = decltype(tpr)::value;
    constexpr int VPT = decltype(vpt)::value;
    if constexpr (TPR == 0) {
      f(norm_bwd_chunked_kernel<T, W, VEC>, kChunkThreads, p.rows);
    } else {
      constexpr int threads = kBwdThreads<TPR>;
      f(norm_bwd_kernel<T, W, TPR, VEC, VPT>, threads, ceil_div(p.rows, threads / TPR));
    }
  });
}

template <typename T>
bool vectorizable(int64_t cols, const void* a, const void* b, const void* c, const void* d) {
  return cols % kVec16<T> == 0 && aligned16(a, b, c, d);
}

template <typename T>
bool vectorizable(const NormBwdParams& p) {
  return vectorizable<T>(p.cols, p.x, p.dy, p.dx, p.weight);
}

}  // namespace

template <typename T, typename W>
void norm_fwd(const NormFwdParams& p, cudaStream_t stream) {
  if (vectorizable<T>(p.cols, p.x, p.y, p.weight, p.bias)) launch_fwd<T, W, kVec16<T>>(p, stream);
  else launch_fwd<T, W, 1>(p, stream);
}

template <typename T, typename W>
int norm_bwd_partial_rows(const NormBwdParams& p) {
  int grid = 0;
  auto plan = [&](auto kernel, int threads, int64_t blocks) { grid = resident_blocks(kernel, threads, blocks); };
  if (vectorizable<T>(p)) with_bwd_kernel<T, W, kVec16<T>>(p, plan);
  else with_bwd_kernel<T, W, 1>(p, plan);
  return grid;
}

template <typename T, typename W>
void norm_bwd(const NormBwdParams& p, cudaStream_t stream) {
  using A = acc_t<T>;
  // The grid is exactly p.partial_rows: stage two reads every partial row.
  auto launch = [&](auto kernel, int threads, int64_t) { kernel<<<p.partial_rows, threads, 0, stream>>>(p); };
  if (vectorizable<T>(p)) with_bwd_kernel<T, W, kVec16<T>>(p, launch);
  else with_bwd_kernel<T, W, 1>(p, launch);
  const dim3 block(kSumCols, kSumSlices);
  const int blocks = grid_limit(ceil_div(p.cols, kSumCols));
  if (p.dweight)
    sum_partials_kernel<A, W><<<blocks, block, 0, stream>>>(
        static_cast<const A*>(p.dweight_partial), static_cast<W*>(p.dweight), p.partial_rows, p.cols);
  if (p.dbias)
    sum_partials_kernel<A, W><<<blocks, block, 0, stream>>>(
        static_cast<const A*>(p.dbias_partial), static_cast<W*>(p.dbias), p.partial_rows, p.cols);
}

#define PYEXT_INSTANTIATE_NORM(T, W)                                   \
  template void norm_fwd<T, W>(const NormFwdParams&, cudaStream_t);    \
  template int norm_bwd_partial_rows<T, W>(const NormBwdParams&);      \
  template void norm_bwd<T, W>(const NormBwdParams&, cudaStream_t);
PYEXT_INSTANTIATE_NORM(float, float)
PYEXT_INSTANTIATE_NORM(double, double)
PYEXT_INSTANTIATE_NORM(__half, __half)
PYEXT_INSTANTIATE_NORM(__half, float)
PYEXT_INSTANTIATE_NORM(__nv_bfloat16, __nv_bfloat16)
PYEXT_INSTANTIATE_NORM(__nv_bfloat16, float)

}  // namespace pyext
