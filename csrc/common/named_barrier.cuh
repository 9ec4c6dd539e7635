// Named wrappers for the CTA's named barriers (bar.sync / bar.arrive with a
// barrier id and a thread count), which let some warps of a block wait for
// others without stopping the rest. Plain CUDA: no torch header.
//
// A CTA has 16 barriers, 0 .. 15; __syncthreads is barrier 0 over the whole
// block, so kernels use 1 .. 15. `threads` is the number of threads that
// take part in one phase (a multiple of 32; every thread of a warp executes
// the instruction together). A phase completes when that many have arrived,
// by bar.sync (arrive, then wait for the phase to complete) or by
// bar.arrive (arrive and go on); then the barrier starts its next phase.
#pragma once

#include <cstdint>

namespace pyext {

// bar.sync id, threads: arrive at barrier `id` and wait until `threads`
// threads have arrived in this phase.
__device__ __forceinline__ void named_barrier_sync(uint32_t id, uint32_t threads) {
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

// bar.arrive id, threads: arrive at barrier `id` without waiting.
__device__ __forceinline__ void named_barrier_arrive(uint32_t id, uint32_t threads) {
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
}

}  // namespace pyext
