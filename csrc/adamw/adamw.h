// Fused AdamW: plain parameters in, no torch types (see adamw_api.cpp).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace pyext {

// One launch covers up to kAdamWMaxTensors tensors and kAdamWMaxBlocks blocks of
// kAdamWChunk elements each; the host fills as many launches as the list needs.
// The struct travels by value as the kernel's argument (under 4 KB).
constexpr int kAdamWMaxTensors = 36;
constexpr int kAdamWMaxBlocks = 320;
constexpr int64_t kAdamWChunk = 65536;

struct AdamWLaunch {
  void* param[kAdamWMaxTensors];        // T, contiguous
  void* grad[kAdamWMaxTensors];         // T, contiguous; written unscaled with grad_scale
  float* exp_avg[kAdamWMaxTensors];     // fp32 moments, contiguous
  float* exp_avg_sq[kAdamWMaxTensors];
  float* max_exp_avg_sq[kAdamWMaxTensors];  // amsgrad only
  int64_t numel[kAdamWMaxTensors];
  int32_t step_index[kAdamWMaxTensors];     // into AdamWHyper::steps
  uint8_t block_tensor[kAdamWMaxBlocks];    // block -> tensor slot
  int32_t block_chunk[kAdamWMaxBlocks];     // block -> chunk of that tensor
};

struct AdamWHyper {
  const float* steps;       // t per tensor, already incremented, on the device
  double lr;                // as given: 1 - lr * weight_decay is worked out in double
  const float* lr_ptr;      // read instead of lr when not null (capturable)
  const float* grad_scale;  // grads are divided by *grad_scale, in place, when not null
  const float* found_inf;   // not null and not 0: GradScaler skips this step, nothing is written
  double beta1, beta2;      // as given: 1 - beta^t is worked out in double
  float eps;
  double weight_decay;
  bool amsgrad, maximize;
};

struct AdamWTensorList {
  void** param;
  void** grad;
  float** exp_avg;
  float** exp_avg_sq;
  float** max_exp_avg_sq;  // null entries when not amsgrad
  const int64_t* numel;
  int count;
};

// T is float, __half or __nv_bfloat16; instantiated in adamw.cu.
template <typename T>
void adamw_step(const AdamWTensorList& tensors, const AdamWHyper& hyper, cudaStream_t stream);

}  // namespace pyext
