// What the LayerNorm/RMSNorm forward (layer_norm_fwd.cu) and backward
// (layer_norm_bwd.cu) share: the layout of a row over threads, block sizes,
// the fast-path configuration for a row length, small launch arithmetic.
//
// Layout: a group of TPR threads (a warp or several) owns a row; thread `lane`
// of the group holds VPT vectors of VEC elements at columns
// (i * TPR + lane) * VEC, so each access is a 16-byte vector (VEC > 1, when
// cols is a multiple of VEC and the pointers are 16-byte aligned) or a
// coalesced scalar (VEC = 1). The row is read once. Rows too long for the
// registers go through the chunked kernels, which loop over the row: the
// forward reads it three times (twice for RMSNorm), the backward twice, the
// repeats mostly from L2.
#pragma once

#include <climits>
#include <cstdint>
#include <type_traits>

#include "common/float_math.cuh"
#include "common/vec.cuh"

namespace pyext {
namespace norm {

// Elements of one row-sized array each thread keeps in registers on the fast
// path: 16 fp32 or 8 fp64 values. The backward keeps four such arrays.
template <typename A> constexpr int kElemsPerThread = int(64 / sizeof(A));
// The forward keeps one, x: with 16-byte vectors, 64 bytes of it a thread
// (16 fp32, 32 fp16/bf16, 8 fp64 values), four loads in flight whatever the
// dtype; element by element (VEC 1), as many values as the backward.
template <typename T, int VEC>
constexpr int kFwdElemsPerThread = VEC > 1 ? int(64 / sizeof(T)) : kElemsPerThread<acc_t<T>>;

// Block sizes. The forward packs rows shorter than 128 threads several to a
// block. The backward uses blocks of at least 512 threads: fewer blocks fill
// the GPU, so fewer rows of partial sums; and it stops at 512 threads per row
// because four arrays of 16 would not fit the 64 registers a 1024-thread block
// allows.
template <int TPR> constexpr int kFwdThreads = TPR < 128 ? 128 : TPR;
template <int TPR> constexpr int kBwdThreads = TPR < 512 ? 512 : TPR;
// The forward's widest rows: 1024 threads, but 512 (16384 elements, as the
// rest) for 32 values a thread, which do not fit the 64 registers of a
// 1024-thread block (sm_80 spills).
template <typename T, int VEC>
constexpr int kFwdMaxTpr = kFwdElemsPerThread<T, VEC> > 16 ? 512 : 1024;
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

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int grid_limit(int64_t blocks) { return int(blocks < INT_MAX ? blocks : INT_MAX); }

template <typename T>
inline bool vectorizable(int64_t cols, const void* a, const void* b, const void* c, const void* d) {
  return cols % kVec16<T> == 0 && aligned16(a, b, c, d);
}

}  // namespace norm
}  // namespace pyext
