// Fused AdamW over lists of tensors: many tensors per launch, fp32 math.
//
// Per element (AdamW, Loshchilov & Hutter; decoupled weight decay):
//   g = grad / grad_scale, negated when maximizing
//   p = p * (1 - lr * weight_decay)
//   m = beta1 * m + (1 - beta1) * g
//   v = beta2 * v + (1 - beta2) * g^2
//   v_max = max(v_max, v), used for v below (amsgrad only)
//   p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// Bytes per fp32 parameter: read p, g, m, v; write p, m, v: 28 (36 with amsgrad).
#include "adamw/adamw.h"

#include "common/float_math.cuh"

namespace pyext {
namespace {

constexpr int kThreads = 512;
constexpr int kUnroll = 4;  // independent elements in flight per thread

template <typename T>
__global__ void __launch_bounds__(kThreads) adamw_kernel(AdamWLaunch args, AdamWHyper h) {
  const int slot = args.block_tensor[blockIdx.x];
  const int64_t begin = int64_t(args.block_chunk[blockIdx.x]) * kAdamWChunk;
  const int64_t end = min(begin + kAdamWChunk, args.numel[slot]);
  T* param = static_cast<T*>(args.param[slot]);
  const T* grad = static_cast<const T*>(args.grad[slot]);
  float* m = args.exp_avg[slot];
  float* v = args.exp_avg_sq[slot];
  float* vmax = args.max_exp_avg_sq[slot];

  const float t = h.steps[args.step_index[slot]];
  const float lr = h.lr_ptr ? *h.lr_ptr : h.lr;
  const float inv_scale = h.grad_scale ? 1.0f / *h.grad_scale : 1.0f;
  const float step_size = lr / (1.0f - powf(h.beta1, t));
  const float inv_sqrt_bc2 = rsqrtf(1.0f - powf(h.beta2, t));
  const float decay = 1.0f - lr * h.weight_decay;

  for (int64_t base = begin + threadIdx.x; base < end; base += int64_t(kThreads) * kUnroll) {
    float p_r[kUnroll], g_r[kUnroll], m_r[kUnroll], v_r[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {  // all loads first: kUnroll requests in flight
      const int64_t i = base + int64_t(u) * kThreads;
      if (i < end) {
        p_r[u] = to_acc(param[i]);
        g_r[u] = to_acc(grad[i]);
        m_r[u] = m[i];
        v_r[u] = v[i];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + int64_t(u) * kThreads;
      if (i >= end) continue;
      float g = g_r[u] * inv_scale;
      if (h.maximize) g = -g;
      const float mu = h.beta1 * m_r[u] + (1.0f - h.beta1) * g;
      const float nu = h.beta2 * v_r[u] + (1.0f - h.beta2) * g * g;
      float second = nu;
      if (h.amsgrad) {
        second = fmaxf(vmax[i], nu);
        vmax[i] = second;
      }
      const float denom = sqrtf(second) * inv_sqrt_bc2 + h.eps;
      param[i] = from_acc<T>(p_r[u] * decay - step_size * mu / denom);
      m[i] = mu;
      v[i] = nu;
    }
  }
}

}  // namespace

template <typename T>
void adamw_step(const AdamWTensorList& list, const AdamWHyper& hyper, cudaStream_t stream) {
  AdamWLaunch args{};
  int tensors = 0, blocks = 0;  // filled in the launch being built
  auto flush = [&] {
    if (blocks) adamw_kernel<T><<<blocks, kThreads, 0, stream>>>(args, hyper);
    tensors = blocks = 0;
  };
  auto add_slot = [&](int k) {
    if (tensors == kAdamWMaxTensors) flush();
    args.param[tensors] = list.param[k];
    args.grad[tensors] = list.grad[k];
    args.exp_avg[tensors] = list.exp_avg[k];
    args.exp_avg_sq[tensors] = list.exp_avg_sq[k];
    args.max_exp_avg_sq[tensors] = list.max_exp_avg_sq[k];
    args.numel[tensors] = list.numel[k];
    args.step_index[tensors] = k;
    ++tensors;
  };
  for (int k = 0; k < list.count; ++k) {
    const int64_t chunks = (list.numel[k] + kAdamWChunk - 1) / kAdamWChunk;
    for (int64_t c = 0; c < chunks; ++c) {
      // a new tensor, or one that continues after a full launch was flushed
      if (c == 0 || tensors == 0) add_slot(k);
      args.block_tensor[blocks] = static_cast<uint8_t>(tensors - 1);
      args.block_chunk[blocks] = static_cast<int32_t>(c);
      if (++blocks == kAdamWMaxBlocks) flush();
    }
  }
  flush();
}

template void adamw_step<float>(const AdamWTensorList&, const AdamWHyper&, cudaStream_t);
template void adamw_step<__half>(const AdamWTensorList&, const AdamWHyper&, cudaStream_t);
template void adamw_step<__nv_bfloat16>(const AdamWTensorList&, const AdamWHyper&, cudaStream_t);

}  // namespace pyext
