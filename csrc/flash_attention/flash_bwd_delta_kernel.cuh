// FlashAttention backward, first pass: delta_i = rowsum(dO_i * O_i) in fp32,
// one warp per row of the contiguous (B * Hq * Sq, D) out and dout, 16-byte
// loads (D is a multiple of 8), O = out + out_lo where the forward stored
// out_lo (store_out in flash_tile.cuh says why). Launched by flash_bwd_delta.cu.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/float_math.cuh"
#include "common/vec.cuh"
#include "flash_attention/flash_attention.h"

namespace pyext {

struct FlashBwdDeltaTraits {
  static constexpr int kRowsPerBlock = 4;
  static constexpr int kThreads = 32 * kRowsPerBlock;
  static int64_t rows(const FlashAttnParams& p) { return int64_t(p.batch) * p.heads_q * p.seq_q; }
  static dim3 grid(const FlashAttnParams& p) { return dim3(unsigned((rows(p) + kRowsPerBlock - 1) / kRowsPerBlock)); }
};

template <typename T>
__global__ void __launch_bounds__(FlashBwdDeltaTraits::kThreads) flash_bwd_delta_kernel(const FlashAttnParams p,
                                                                                         int64_t rows) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * FlashBwdDeltaTraits::kRowsPerBlock + threadIdx.x / 32;
  if (row >= rows) return;
  const T* o = static_cast<const T*>(p.out) + row * p.head_dim;
  const T* o_lo = p.out_lo ? static_cast<const T*>(p.out_lo) + row * p.head_dim : nullptr;
  const T* dout = static_cast<const T*>(p.dout) + row * p.head_dim;
  float sum = 0.f;
  for (int c = lane * 8; c < p.head_dim; c += 32 * 8) {
    const Vec<T, 8> a = load_vec<T, 8>(o + c), g = load_vec<T, 8>(dout + c);
#pragma unroll
    for (int i = 0; i < 8; ++i) sum += to_acc(a.v[i]) * to_acc(g.v[i]);
    if (o_lo) {
      const Vec<T, 8> b = load_vec<T, 8>(o_lo + c);
#pragma unroll
      for (int i = 0; i < 8; ++i) sum += to_acc(b.v[i]) * to_acc(g.v[i]);
    }
  }
#pragma unroll
  for (int mask = 16; mask > 0; mask /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, mask);
  if (lane == 0) p.delta[row] = sum;
}

}  // namespace pyext
