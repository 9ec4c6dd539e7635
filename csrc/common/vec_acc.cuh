// N consecutive elements of a storage type moved to or from the math type
// (float, or double), in 16-byte (or smaller) vector pieces. The pointer must
// be aligned to one piece: min(16, N * sizeof(S)) bytes.
#pragma once

#include "common/float_math.cuh"
#include "common/vec.cuh"

namespace pyext {

template <typename S, int N>
constexpr int kPiece = N < kVec16<S> ? N : kVec16<S>;

template <typename S, int N, typename A>
__device__ __forceinline__ void load_to_acc(const S* p, A (&out)[N]) {
  constexpr int P = kPiece<S, N>;
#pragma unroll
  for (int i = 0; i < N; i += P) {
    const Vec<S, P> v = load_vec<S, P>(p + i);
#pragma unroll
    for (int j = 0; j < P; ++j) out[i + j] = to_acc(v.v[j]);
  }
}

template <typename S, int N, typename A>
__device__ __forceinline__ void store_from_acc(S* p, const A (&in)[N]) {
  constexpr int P = kPiece<S, N>;
#pragma unroll
  for (int i = 0; i < N; i += P) {
    Vec<S, P> v;
#pragma unroll
    for (int j = 0; j < P; ++j) v.v[j] = from_acc<S>(in[i + j]);
    store_vec<S, P>(p + i, v);
  }
}

}  // namespace pyext
