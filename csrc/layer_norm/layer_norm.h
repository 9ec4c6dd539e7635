// LayerNorm and RMSNorm kernels: plain parameters in, no torch types (see
// layer_norm_api.cpp). One set of kernels serves both; `rms` drops the mean.
// Tensors are viewed as (rows, cols), cols = the product of normalized_shape.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace pyext {

// A = the math type: float for float/half/bfloat16 input, double for double.
struct NormFwdParams {
  const void* x;       // T, (rows, cols), contiguous
  const void* weight;  // W, (cols), or null
  const void* bias;    // W, (cols), or null (always null for rms)
  void* y;             // T, (rows, cols), contiguous
  void* mean;          // A, (rows); null for rms
  void* rstd;          // A, (rows)
  int64_t rows;
  int64_t cols;
  double eps;
  bool rms;
};

struct NormBwdParams {
  const void* dy;      // T, (rows, cols), contiguous
  const void* x;       // T, (rows, cols), contiguous
  const void* mean;    // A, (rows); null for rms
  const void* rstd;    // A, (rows)
  const void* weight;  // W, (cols), or null
  void* dx;            // T, (rows, cols), contiguous
  // Stage one writes one row of partial column sums per block into these
  // (A, (partial_rows, cols)); stage two sums them in a fixed order into
  // dweight and dbias (W, (cols)). Null when that gradient is not wanted.
  void* dweight_partial;
  void* dbias_partial;
  void* dweight;
  void* dbias;
  int64_t rows;
  int64_t cols;
  int partial_rows;    // from norm_bwd_partial_rows; the stage-one grid
  bool rms;
};

// T is float, double, __half or __nv_bfloat16; W is T, or float when T is
// __half or __nv_bfloat16. Instantiated in layer_norm_fwd.cu and
// layer_norm_bwd.cu.
template <typename T, typename W> void norm_fwd(const NormFwdParams& p, cudaStream_t stream);
// Rows of partials the backward needs (its stage-one grid) for p.rows, p.cols
// and the pointers' alignment; p.rows > 0.
template <typename T, typename W> int norm_bwd_partial_rows(const NormBwdParams& p);
template <typename T, typename W> void norm_bwd(const NormBwdParams& p, cudaStream_t stream);

}  // namespace pyext
