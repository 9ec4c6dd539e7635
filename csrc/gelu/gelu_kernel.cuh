// GELU forward and backward kernels: one read and one write per element
// (forward reads x, writes y: 2n elements; backward reads x and dy, writes dx:
// 3n), so both are bound by memory. 16-byte vector accesses, grid-stride, int64 index.
//
//   exact:  y = x * Phi(x),  Phi(x) = (1 + erf(x / sqrt 2)) / 2
//           dy/dx = Phi(x) + x * exp(-x^2 / 2) / sqrt(2 pi)
//   tanh:   u = sqrt(2/pi) * (x + 0.044715 x^3),  y = x (1 + tanh u) / 2
//           dy/dx = (1 + tanh u) / 2 + x (1 - tanh^2 u) / 2 * sqrt(2/pi) (1 + 3 * 0.044715 x^2)
#pragma once

#include "common/float_math.cuh"
#include "common/launch.h"
#include "common/vec.cuh"
#include "gelu/gelu.h"

namespace pyext {
namespace gelu {

constexpr double kSqrt1_2 = 0.70710678118654752440;
constexpr double kInvSqrt2Pi = 0.39894228040143267794;
constexpr double kSqrt2OverPi = 0.79788456080286535588;
constexpr double kTanhCoeff = 0.044715;

template <typename A>
__device__ __forceinline__ A gelu_value(A x, bool tanh_approx) {
  if (tanh_approx) {
    const A u = A(kSqrt2OverPi) * (x + A(kTanhCoeff) * x * x * x);
    return A(0.5) * x * (A(1) + tanh(u));
  }
  return A(0.5) * x * (A(1) + erf(x * A(kSqrt1_2)));
}

template <typename A>
__device__ __forceinline__ A gelu_grad(A x, A dy, bool tanh_approx) {
  if (tanh_approx) {
    const A x2 = x * x;
    const A t = tanh(A(kSqrt2OverPi) * (x + A(kTanhCoeff) * x2 * x));
    const A du = A(kSqrt2OverPi) * (A(1) + A(3 * kTanhCoeff) * x2);
    return dy * (A(0.5) * (A(1) + t) + A(0.5) * x * (A(1) - t * t) * du);
  }
  const A cdf = A(0.5) * (A(1) + erf(x * A(kSqrt1_2)));
  const A pdf = A(kInvSqrt2Pi) * exp(A(-0.5) * x * x);
  return dy * (cdf + x * pdf);
}

// VEC elements per access; the last n % VEC elements are done one by one.
template <typename T, int VEC>
__global__ void gelu_fwd_kernel(GeluParams p) {
  const T* x = static_cast<const T*>(p.x);
  T* y = static_cast<T*>(p.out);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = p.n / VEC;
  for (int64_t i = tid; i < nvec; i += stride) {
    Vec<T, VEC> v = load_vec<T, VEC>(x + i * VEC);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v.v[j] = from_acc<T>(gelu_value(to_acc(v.v[j]), p.tanh_approx));
    store_vec<T, VEC>(y + i * VEC, v);
  }
  for (int64_t i = nvec * VEC + tid; i < p.n; i += stride)
    y[i] = from_acc<T>(gelu_value(to_acc(x[i]), p.tanh_approx));
}

template <typename T, int VEC>
__global__ void gelu_bwd_kernel(GeluParams p) {
  const T* x = static_cast<const T*>(p.x);
  const T* dy = static_cast<const T*>(p.dy);
  T* dx = static_cast<T*>(p.out);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t tid = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t nvec = p.n / VEC;
  for (int64_t i = tid; i < nvec; i += stride) {
    const Vec<T, VEC> xv = load_vec<T, VEC>(x + i * VEC);
    const Vec<T, VEC> gv = load_vec<T, VEC>(dy + i * VEC);
    Vec<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j)
      out.v[j] = from_acc<T>(gelu_grad(to_acc(xv.v[j]), to_acc(gv.v[j]), p.tanh_approx));
    store_vec<T, VEC>(dx + i * VEC, out);
  }
  for (int64_t i = nvec * VEC + tid; i < p.n; i += stride)
    dx[i] = from_acc<T>(gelu_grad(to_acc(x[i]), to_acc(dy[i]), p.tanh_approx));
}

constexpr int kThreads = 256;

// Calls launch(kernel, blocks, threads) for the forward or the backward: the
// vector kernel when every pointer allows 16-byte accesses, else the scalar one.
template <typename T, typename Launch>
void with_kernel(const GeluParams& p, bool backward, Launch&& launch) {
  constexpr int V = kVec16<T>;
  const bool vectorize = backward ? aligned16(p.x, p.dy, p.out) : aligned16(p.x, p.out);
  void (*kernel)(GeluParams) = backward ? (vectorize ? gelu_bwd_kernel<T, V> : gelu_bwd_kernel<T, 1>)
                                        : (vectorize ? gelu_fwd_kernel<T, V> : gelu_fwd_kernel<T, 1>);
  launch(kernel, elementwise_blocks(vectorize ? p.n / V + 1 : p.n, kThreads), kThreads);
}

}  // namespace gelu
}  // namespace pyext
