// FlashAttention backward, last pass of the non-deterministic backward: dq =
// dq_accum rounded to T, where the dK/dV kernel (either stage's, with
// kAccumulateDq) added dQ up in fp32, scale applied. Both contiguous (B, Hq,
// Sq, D), D a multiple of 8: 8 elements a thread, 32 bytes read and 16
// written; 6 bytes an element in all. Launched by flash_bwd_dq_accum_launch.cuh.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/mma.cuh"
#include "common/vec.cuh"
#include "flash_attention/flash_attention.h"

namespace pyext {

struct FlashBwdDqConvertTraits {
  static constexpr int kThreads = 256;
  static int64_t groups(const FlashAttnParams& p) { return int64_t(p.batch) * p.heads_q * p.seq_q * p.head_dim / 8; }
  static dim3 grid(const FlashAttnParams& p) { return dim3(unsigned((groups(p) + kThreads - 1) / kThreads)); }
};

template <typename T>
__global__ void __launch_bounds__(FlashBwdDqConvertTraits::kThreads)
    flash_bwd_dq_convert_kernel(const FlashAttnParams p, int64_t groups) {
  const int64_t i = int64_t(blockIdx.x) * FlashBwdDqConvertTraits::kThreads + threadIdx.x;
  if (i >= groups) return;
  const Vec<float, 4> lo = load_vec<float, 4>(p.dq_accum + 8 * i), hi = load_vec<float, 4>(p.dq_accum + 8 * i + 4);
  const Vec<uint32_t, 4> packed = {{pack2<T>(lo.v[0], lo.v[1]), pack2<T>(lo.v[2], lo.v[3]), pack2<T>(hi.v[0], hi.v[1]),
                                    pack2<T>(hi.v[2], hi.v[3])}};
  store_vec<uint32_t, 4>(reinterpret_cast<uint32_t*>(static_cast<T*>(p.dq) + 8 * i), packed);
}

}  // namespace pyext
