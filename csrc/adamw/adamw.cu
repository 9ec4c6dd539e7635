// Fused AdamW step: one launch updates up to kAdamWMaxTensors tensors.
//
// The update (Loshchilov & Hutter, "Decoupled Weight Decay Regularization",
// with torch.optim.AdamW's bias corrections), per element, in fp32:
//
//   g    = grad / grad_scale                   (GradScaler; this unscaled g is stored back)
//   g    = -g                                  (maximize)
//   p    = p * (1 - lr * weight_decay)         (decoupled weight decay: it never enters m or v)
//   m    = beta1 * m + (1 - beta1) * g         (first moment)
//   v    = beta2 * v + (1 - beta2) * g^2       (second moment)
//   vmax = max(vmax, v)                        (amsgrad: normalise by vmax instead of v)
//   p    = p - lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
//
// Bytes per fp32 parameter: read p, g, m, v and write p, m, v = 7 * 4 = 28
// (amsgrad +8, GradScaler +4 for the unscaled grad; bf16/fp16 params: 24).
// About 15 FLOPs per element against 28 bytes: bound by memory.
//
// Layout: the tensor list travels by value (a __grid_constant__ argument);
// tensor i is cut into chunks of kChunk elements, chunk_end holds the running
// count, and a grid sized to fill the GPU once walks all chunks of the launch
// (grid-stride), so a launch costs the same whether its tensors are many and
// small or few and large. Each thread keeps kUnroll 16-byte (fp32) or 8-byte
// (fp16/bf16) accesses per stream in flight; int64 indexing throughout.
#include "adamw/adamw.h"

#include <algorithm>

#include "common/float_math.cuh"
#include "common/launch.h"
#include "common/vec.cuh"

namespace pyext {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 4;     // elements per access: 16 bytes of fp32, 8 of fp16/bf16
constexpr int kUnroll = 4;  // accesses per thread and stream issued before any math
constexpr int64_t kChunk = int64_t(kThreads) * kVec * kUnroll;  // 4096 elements

static_assert(sizeof(AdamWTensorList) + sizeof(AdamWHyper) <= 4096,
              "kernel arguments must fit in 4 KB");

// One tensor's coefficients for this step, in fp32.
struct Coeffs {
  float beta1, one_minus_beta1, beta2, one_minus_beta2, eps;
  float decay;      // 1 - lr * weight_decay
  float step_size;  // lr / (1 - beta1^t)
  float bias_correction2_sqrt;  // sqrt(1 - beta2^t)
};

__device__ Coeffs coeffs_for(const AdamWTensorList& list, const AdamWHyper& h, int t, float lr) {
  const double step = *list.step[t];
  Coeffs k;
  k.beta1 = float(h.beta1);
  k.one_minus_beta1 = float(1.0 - h.beta1);
  k.beta2 = float(h.beta2);
  k.one_minus_beta2 = float(1.0 - h.beta2);
  k.eps = h.eps;
  k.decay = float(1.0 - double(lr) * h.weight_decay);
  k.step_size = float(double(lr) / (1.0 - pow(h.beta1, step)));
  k.bias_correction2_sqrt = float(sqrt(1.0 - pow(h.beta2, step)));
  return k;
}

// max that keeps a NaN from either side, as torch.maximum does.
__device__ __forceinline__ float max_nan(float a, float b) { return (b > a || b != b) ? b : a; }

// The update of one element; g comes back unscaled (what is stored as grad).
template <bool AMSGRAD>
__device__ __forceinline__ void update(float& p, float& g, float& m, float& v, float& vmax,
                                       const Coeffs& k, const float* grad_scale, bool maximize) {
  if (grad_scale != nullptr) g = g / *grad_scale;
  const float d = maximize ? -g : g;
  p *= k.decay;
  m = k.beta1 * m + k.one_minus_beta1 * d;
  v = k.beta2 * v + k.one_minus_beta2 * d * d;
  float v_hat = v;
  if (AMSGRAD) {
    vmax = max_nan(vmax, v);
    v_hat = vmax;
  }
  const float denom = sqrtf(v_hat) / k.bias_correction2_sqrt + k.eps;
  p -= k.step_size * (m / denom);
}

// Elements [begin, end) of one tensor, 16/8-byte accesses (all pointers aligned).
template <typename T, bool AMSGRAD>
__device__ __forceinline__ void step_vectorized(T* p, T* g, float* m, float* v, float* vmax,
                                                int64_t begin, int64_t end, const Coeffs& k,
                                                const AdamWHyper& h) {
  const int64_t nvec = (end - begin) / kVec;
  Vec<T, kVec> pv[kUnroll], gv[kUnroll];
  Vec<float, kVec> mv[kUnroll], vv[kUnroll], xv[kUnroll];
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t j = int64_t(u) * kThreads + threadIdx.x;
    if (j < nvec) {
      const int64_t i = begin + j * kVec;
      pv[u] = load_vec<T, kVec>(p + i);
      gv[u] = load_vec<T, kVec>(g + i);
      mv[u] = load_vec<float, kVec>(m + i);
      vv[u] = load_vec<float, kVec>(v + i);
      if (AMSGRAD) xv[u] = load_vec<float, kVec>(vmax + i);
    }
  }
#pragma unroll
  for (int u = 0; u < kUnroll; ++u) {
    const int64_t j = int64_t(u) * kThreads + threadIdx.x;
    if (j < nvec) {
      const int64_t i = begin + j * kVec;
#pragma unroll
      for (int e = 0; e < kVec; ++e) {
        float pe = to_acc(pv[u].v[e]), ge = to_acc(gv[u].v[e]);
        update<AMSGRAD>(pe, ge, mv[u].v[e], vv[u].v[e], xv[u].v[e], k, h.grad_scale, h.maximize);
        pv[u].v[e] = from_acc<T>(pe);
        gv[u].v[e] = from_acc<T>(ge);
      }
      store_vec<T, kVec>(p + i, pv[u]);
      if (h.grad_scale != nullptr) store_vec<T, kVec>(g + i, gv[u]);
      store_vec<float, kVec>(m + i, mv[u]);
      store_vec<float, kVec>(v + i, vv[u]);
      if (AMSGRAD) store_vec<float, kVec>(vmax + i, xv[u]);
    }
  }
  // The last chunk of a tensor may end with numel % kVec single elements.
  for (int64_t i = begin + nvec * kVec + threadIdx.x; i < end; i += kThreads) {
    float pe = to_acc(p[i]), ge = to_acc(g[i]), me = m[i], ve = v[i], xe = AMSGRAD ? vmax[i] : 0.f;
    update<AMSGRAD>(pe, ge, me, ve, xe, k, h.grad_scale, h.maximize);
    p[i] = from_acc<T>(pe);
    if (h.grad_scale != nullptr) g[i] = from_acc<T>(ge);
    m[i] = me;
    v[i] = ve;
    if (AMSGRAD) vmax[i] = xe;
  }
}

// Elements [begin, end) one at a time (some pointer of the tensor is misaligned).
template <typename T, bool AMSGRAD>
__device__ __forceinline__ void step_scalar(T* p, T* g, float* m, float* v, float* vmax,
                                            int64_t begin, int64_t end, const Coeffs& k,
                                            const AdamWHyper& h) {
  for (int64_t i = begin + threadIdx.x; i < end; i += kThreads) {
    float pe = to_acc(p[i]), ge = to_acc(g[i]), me = m[i], ve = v[i], xe = AMSGRAD ? vmax[i] : 0.f;
    update<AMSGRAD>(pe, ge, me, ve, xe, k, h.grad_scale, h.maximize);
    p[i] = from_acc<T>(pe);
    if (h.grad_scale != nullptr) g[i] = from_acc<T>(ge);
    m[i] = me;
    v[i] = ve;
    if (AMSGRAD) vmax[i] = xe;
  }
}

template <typename T, bool AMSGRAD>
__global__ void __launch_bounds__(kThreads)
    adamw_kernel(const __grid_constant__ AdamWTensorList list, const AdamWHyper h) {
  if (h.found_inf != nullptr && *h.found_inf != 0.f) return;  // GradScaler saw inf/NaN: skip the step
  const float lr = h.lr_ptr != nullptr ? *h.lr_ptr : h.lr;
  const int64_t total_chunks = list.chunk_end[list.num_tensors - 1];
  int t = 0, coeffs_of = -1;
  Coeffs k;
  for (int64_t c = blockIdx.x; c < total_chunks; c += gridDim.x) {
    while (c >= list.chunk_end[t]) ++t;  // chunks only move forward: amortised O(1)
    if (t != coeffs_of) {
      k = coeffs_for(list, h, t, lr);
      coeffs_of = t;
    }
    const int64_t begin = (c - (t > 0 ? list.chunk_end[t - 1] : 0)) * kChunk;
    const int64_t end = begin + kChunk < list.numel[t] ? begin + kChunk : list.numel[t];
    T* p = static_cast<T*>(list.param[t]);
    T* g = static_cast<T*>(list.grad[t]);
    if (list.vectorized[t]) {
      step_vectorized<T, AMSGRAD>(p, g, list.exp_avg[t], list.exp_avg_sq[t], list.max_exp_avg_sq[t],
                                  begin, end, k, h);
    } else {
      step_scalar<T, AMSGRAD>(p, g, list.exp_avg[t], list.exp_avg_sq[t], list.max_exp_avg_sq[t],
                              begin, end, k, h);
    }
  }
}

// Blocks that fit on the GPU at once (each then walks its share of chunks).
template <typename T, bool AMSGRAD>
int resident_blocks() {
  static const int per_sm = [] {
    int n = 1;
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, adamw_kernel<T, AMSGRAD>, kThreads, 0);
    return std::max(n, 1);
  }();
  int device = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return per_sm * sms;
}

template <typename T, bool AMSGRAD>
void launch(const AdamWTensorList& list, const AdamWHyper& h, cudaStream_t stream) {
  const int64_t chunks = list.chunk_end[list.num_tensors - 1];
  const int blocks = int(std::min<int64_t>(chunks, resident_blocks<T, AMSGRAD>()));
  adamw_kernel<T, AMSGRAD><<<blocks, kThreads, 0, stream>>>(list, h);
}

}  // namespace

int64_t adamw_chunks(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

template <typename T>
void adamw_step(const AdamWTensorList& list, const AdamWHyper& h, bool amsgrad, cudaStream_t stream) {
  if (list.num_tensors == 0) return;
  if (amsgrad) {
    launch<T, true>(list, h, stream);
  } else {
    launch<T, false>(list, h, stream);
  }
}

template void adamw_step<float>(const AdamWTensorList&, const AdamWHyper&, bool, cudaStream_t);
template void adamw_step<__half>(const AdamWTensorList&, const AdamWHyper&, bool, cudaStream_t);
template void adamw_step<__nv_bfloat16>(const AdamWTensorList&, const AdamWHyper&, bool, cudaStream_t);

}  // namespace pyext
