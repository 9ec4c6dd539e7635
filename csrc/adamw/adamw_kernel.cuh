// Fused AdamW over lists of tensors: many tensors per launch, fp32 math (the
// moments formed in fp64 and rounded once). The kernel and adamw_launches,
// which packs a list into launches; adamw.cu launches them (host code can
// include this file: tests/cuda_emulation).
//
// Per element (AdamW, Loshchilov & Hutter; decoupled weight decay):
//   g = grad / grad_scale, negated when maximizing (grad = g, unscaled, as torch's fused AdamW leaves it)
//   p = p * (1 - lr * weight_decay)
//   m = beta1 * m + (1 - beta1) * g
//   v = beta2 * v + (1 - beta2) * g^2
//   v_max = max(v_max, v), used for v below (amsgrad only)
//   p = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
// Bytes per fp32 parameter: read p, g, m, v; write p, m, v: 28 (36 with
// amsgrad), 4 more with a GradScaler's grad_scale (g written back).
#pragma once

#include "adamw/adamw.h"

#include "common/float_math.cuh"
#include "common/vec.cuh"
#include "common/vec_acc.cuh"

namespace pyext {
namespace adamw {

constexpr int kThreads = 512;
constexpr int kUnroll = 4;  // independent groups of elements in flight per thread
constexpr int kVec = 4;     // elements per access on the vector path: 16 bytes of fp32 moments

// The update of one element, with the step's constants worked out once per block.
struct AdamWUpdate {
  float inv_scale, step_size, inv_sqrt_bc2, decay, eps;
  double beta1, beta2, one_minus_beta1, one_minus_beta2;
  bool unscale, amsgrad, maximize;

  __device__ AdamWUpdate(const AdamWHyper& h, float t) {
    const double lr = h.lr_ptr ? double(*h.lr_ptr) : h.lr;
    unscale = h.grad_scale != nullptr;
    inv_scale = unscale ? 1.0f / *h.grad_scale : 1.0f;
    // 1 - beta^t in double: in float, 1 - 0.999^2 = 0.001999 keeps about four
    // correct digits, which the update would carry. Once per block.
    step_size = static_cast<float>(lr / (1.0 - pow(h.beta1, double(t))));
    inv_sqrt_bc2 = static_cast<float>(1.0 / sqrt(1.0 - pow(h.beta2, double(t))));
    // 1 - lr * weight_decay in double too: in float, 1 - 30 * 0.01 rounds to
    // 0.70000005, one ulp off, unless the compiler fuses it into an fma; every
    // step multiplies p by it.
    decay = static_cast<float>(1.0 - lr * h.weight_decay);
    // The betas and 1 - beta as the host's doubles (1.0f - float(0.999) is
    // 0.000999987; 1 - 0.9999: 1.7e-4 off), for the moments below.
    beta1 = h.beta1, beta2 = h.beta2, one_minus_beta1 = 1.0 - h.beta1, one_minus_beta2 = 1.0 - h.beta2;
    eps = h.eps, amsgrad = h.amsgrad, maximize = h.maximize;
  }

  // p, m, v (and vmax, amsgrad only) updated in place from the gradient,
  // which is left unscaled.
  __device__ __forceinline__ void operator()(float& p, float& grad, float& m, float& v, float& vmax) const {
    grad *= inv_scale;
    const float g = maximize ? -grad : grad;
    // The moments in double, rounded once to float: in float each is three
    // or four roundings (two with an fma the compiler may or may not form),
    // where torch's lerp_ and addcmul_ take two. g * g is exact in double.
    const double g64 = g;
    m = static_cast<float>(beta1 * m + one_minus_beta1 * g64);
    v = static_cast<float>(beta2 * v + one_minus_beta2 * (g64 * g64));
    float second = v;
    if (amsgrad) second = vmax = fmaxf(vmax, v);
    p = p * decay - step_size * m / (sqrtf(second) * inv_sqrt_bc2 + eps);
  }
};

// Elements [begin, end) of one tensor, VEC consecutive ones per thread and
// access (VEC > 1: end - begin a multiple of VEC, every pointer aligned to
// VEC elements), kUnroll groups loaded before any is updated.
template <typename T, int VEC>
__device__ __forceinline__ void adamw_range(const AdamWUpdate& update, T* param, T* grad, float* m,
                                            float* v, float* vmax, int64_t begin, int64_t end) {
  constexpr int64_t kStride = int64_t(kThreads) * VEC;
  for (int64_t base = begin + int64_t(threadIdx.x) * VEC; base < end; base += kStride * kUnroll) {
    float p_r[kUnroll][VEC], g_r[kUnroll][VEC], m_r[kUnroll][VEC], v_r[kUnroll][VEC], w_r[kUnroll][VEC];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kStride;
      if (i >= end) continue;
      load_to_acc<T, VEC>(param + i, p_r[u]);
      load_to_acc<T, VEC>(grad + i, g_r[u]);
      load_to_acc<float, VEC>(m + i, m_r[u]);
      load_to_acc<float, VEC>(v + i, v_r[u]);
      if (update.amsgrad) load_to_acc<float, VEC>(vmax + i, w_r[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t i = base + u * kStride;
      if (i >= end) continue;
#pragma unroll
      for (int j = 0; j < VEC; ++j) update(p_r[u][j], g_r[u][j], m_r[u][j], v_r[u][j], w_r[u][j]);
      store_from_acc<T, VEC>(param + i, p_r[u]);
      if (update.unscale) store_from_acc<T, VEC>(grad + i, g_r[u]);
      store_from_acc<float, VEC>(m + i, m_r[u]);
      store_from_acc<float, VEC>(v + i, v_r[u]);
      if (update.amsgrad) store_from_acc<float, VEC>(vmax + i, w_r[u]);
    }
  }
}

// One block: one chunk of one tensor. 16-byte accesses to the moments (and
// 4 * sizeof(T) to the parameter and gradient) when the tensor's pointers are
// aligned, which torch's allocations are; the chunk's last few elements, or
// all of an unaligned tensor, one at a time.
template <typename T>
__global__ void __launch_bounds__(kThreads) adamw_kernel(AdamWLaunch args, AdamWHyper h) {
  if (h.found_inf && *h.found_inf != 0.0f) return;  // decided on the device: no host sync
  const int slot = args.block_tensor[blockIdx.x];
  const int64_t begin = int64_t(args.block_chunk[blockIdx.x]) * kAdamWChunk;
  const int64_t end = min(begin + kAdamWChunk, args.numel[slot]);
  T* param = static_cast<T*>(args.param[slot]);
  T* grad = static_cast<T*>(args.grad[slot]);
  float* m = args.exp_avg[slot];
  float* v = args.exp_avg_sq[slot];
  float* vmax = args.max_exp_avg_sq[slot];
  const AdamWUpdate update(h, h.steps[args.step_index[slot]]);

  const bool aligned = reinterpret_cast<uintptr_t>(param) % (kVec * sizeof(T)) == 0 &&
                       reinterpret_cast<uintptr_t>(grad) % (kVec * sizeof(T)) == 0 &&
                       aligned16(m, v) && (!h.amsgrad || aligned16(vmax));
  const int64_t vec_end = aligned ? begin + (end - begin) / kVec * kVec : begin;
  adamw_range<T, kVec>(update, param, grad, m, v, vmax, begin, vec_end);
  adamw_range<T, 1>(update, param, grad, m, v, vmax, vec_end, end);
}

// Packs the list into launches of at most kAdamWMaxTensors tensors and
// kAdamWMaxBlocks chunks, a tensor's chunks running on past a full launch,
// and calls launch(args, blocks) for each.
template <typename F>
void adamw_launches(const AdamWTensorList& list, F&& launch) {
  AdamWLaunch args{};
  int tensors = 0, blocks = 0;  // filled in the launch being built
  auto flush = [&] {
    if (blocks) launch(args, blocks);
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

}  // namespace adamw
}  // namespace pyext
