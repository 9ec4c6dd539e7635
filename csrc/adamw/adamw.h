// Fused AdamW step: plain parameters in, no torch types (see adamw_api.cpp).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace pyext {

// Tensors per launch. The list travels by value as a kernel argument, which
// must stay within 4 KB: 48 * 65 bytes + the rest (static_assert in adamw.cu).
constexpr int kAdamWMaxTensors = 48;

// Up to kAdamWMaxTensors parameters of one dtype on one device. Each
// parameter's p, g, m, v (and vmax) share one dense layout, so they are
// stepped as flat arrays of numel elements.
struct AdamWTensorList {
  void* param[kAdamWMaxTensors];         // T (float, __half or __nv_bfloat16)
  void* grad[kAdamWMaxTensors];          // T; written back unscaled when grad_scale is set
  float* exp_avg[kAdamWMaxTensors];
  float* exp_avg_sq[kAdamWMaxTensors];
  float* max_exp_avg_sq[kAdamWMaxTensors];  // amsgrad only
  const float* step[kAdamWMaxTensors];   // step count t (float32 on the device, this step counted)
  int64_t numel[kAdamWMaxTensors];
  int64_t chunk_end[kAdamWMaxTensors];   // chunks of tensors 0..i together (prefix sum)
  uint8_t vectorized[kAdamWMaxTensors];  // every pointer of tensor i is 16-byte aligned
  int num_tensors;
};

struct AdamWHyper {
  double beta1, beta2;            // double: bias corrections 1 - beta^t are taken in double
  float lr;
  const float* lr_ptr;            // when set, lr is read from the device (capturable)
  float weight_decay, eps;
  const float* grad_scale;        // GradScaler: grads are divided by it (null: none)
  const float* found_inf;         // GradScaler: nonzero skips the whole step (null: none)
  bool maximize;
};

// Chunks (the kernel's unit of work) a tensor of numel elements is cut into.
int64_t adamw_chunks(int64_t numel);

// T is float, __half or __nv_bfloat16; instantiated in adamw.cu.
template <typename T>
void adamw_step(const AdamWTensorList& list, const AdamWHyper& hyper, bool amsgrad, cudaStream_t stream);

}  // namespace pyext
