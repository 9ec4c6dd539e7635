// Sums across a group of consecutive threads (a warp, or several warps of one
// block), in a fixed order: every thread of the group gets the same bits, and
// so does every run. Plain CUDA, no torch header.
#pragma once

namespace pyext {

// Butterfly (xor) sum over the 32 lanes of a warp. Every lane adds the same
// pairs in the same tree, and fp addition is commutative, so all lanes end
// with bitwise the same total.
template <typename A>
__device__ __forceinline__ A warp_sum(A v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Replaces v[0..N-1] of every thread with the sums over its group of GROUP
// consecutive threads (GROUP = 32, or a multiple of 32 dividing blockDim.x).
// For GROUP > 32 it goes through `scratch` (blockDim.x / 32 * N values of
// shared memory) and syncs the block: every thread of the block must call it.
template <int GROUP, int N, typename A>
__device__ __forceinline__ void group_sum(A (&v)[N], A* scratch) {
  static_assert(GROUP % 32 == 0, "groups are whole warps");
#pragma unroll
  for (int i = 0; i < N; ++i) v[i] = warp_sum(v[i]);
  if constexpr (GROUP > 32) {
    constexpr int kWarps = GROUP / 32;
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 == 0) {
#pragma unroll
      for (int i = 0; i < N; ++i) scratch[warp * N + i] = v[i];
    }
    __syncthreads();
    const int first = warp / kWarps * kWarps;
#pragma unroll
    for (int i = 0; i < N; ++i) {
      A s = scratch[first * N + i];
      for (int w = 1; w < kWarps; ++w) s += scratch[(first + w) * N + i];
      v[i] = s;
    }
    __syncthreads();  // scratch may be reused at once
  }
}

}  // namespace pyext
