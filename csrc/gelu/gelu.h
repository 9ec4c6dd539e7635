// GELU kernels: plain parameters in, no torch types (see gelu_api.cpp).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace pyext {

struct GeluParams {
  const void* x;   // input, contiguous, n elements
  const void* dy;  // upstream gradient (backward only), contiguous
  void* out;       // y (forward) or dx (backward), contiguous
  int64_t n;
  bool tanh_approx;  // approximate="tanh"
};

// T is float, double, __half or __nv_bfloat16; instantiated in gelu.cu.
template <typename T> void gelu_fwd(const GeluParams& p, cudaStream_t stream);
template <typename T> void gelu_bwd(const GeluParams& p, cudaStream_t stream);

}  // namespace pyext
