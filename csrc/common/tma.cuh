// Named wrappers for the sm_90 bulk tensor copy engine (TMA) and the
// mbarriers it completes on, plus setmaxnreg (sm_90a). Plain CUDA: no torch
// header. Barrier and destination addresses are shared-memory (CTA) addresses.
//
// mbarrier protocol used here: a barrier counts arrivals and, for TMA,
// transaction bytes; its current phase completes when the expected arrivals
// have arrived and the byte count is back to zero, then the next phase
// starts. Phases alternate parity 0, 1, 0, ...; the k-th completion (k from
// 0) is that of a phase of parity k % 2, and waiting with that parity returns
// once it has happened.
#pragma once

#include <cuda.h>  // CUtensorMap (a type only: nothing here calls the driver)

#include <cstdint>

#include "common/mma.cuh"

namespace pyext {

// mbarrier.init.shared::cta.b64 [bar], count: a barrier expecting `count`
// arrivals per phase, in phase 0. One thread initialises; see fence_barrier_init.
__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(count) : "memory");
}

// fence.mbarrier_init.release.cluster: makes the initialised barriers
// visible to the async proxy (the TMA unit that completes them); a
// __syncthreads after it makes them visible to the other threads.
__device__ __forceinline__ void fence_barrier_init() {
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
}

// The barriers of a producer/consumer ring of `stages` buffers: full[s]
// completes on `producers` arrivals (the TMA issuer's, with the bytes it
// expects, and any plain-store writers), empty[s] on `consumers` (one per
// consumer warp). One thread calls it, then fence_barrier_init.
__device__ __forceinline__ void mbarrier_ring_init(uint64_t* full, uint64_t* empty, int stages, uint32_t producers,
                                                   uint32_t consumers) {
  for (int s = 0; s < stages; ++s) {
    mbarrier_init(&full[s], producers);
    mbarrier_init(&empty[s], consumers);
  }
}

// fence.proxy.async.shared::cta: orders this thread's ordinary (generic
// proxy) shared-memory accesses before later async-proxy ones (TMA, wgmma)
// on the same memory. Needed after st.shared of data that TMA stores or
// wgmma reads next; not needed between TMA loads and wgmma (both async).
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// mbarrier.arrive.expect_tx.shared::cta.b64 _, [bar], bytes: one arrival,
// and `bytes` more transaction bytes expected in the current phase (the TMA
// copies that name this barrier count them down as they land).
__device__ __forceinline__ void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(bar)), "r"(bytes)
               : "memory");
}

// mbarrier.arrive.shared::cta.b64 _, [bar]: one arrival (release semantics:
// this thread's earlier memory accesses happen before the phase completes).
__device__ __forceinline__ void mbarrier_arrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(bar)) : "memory");
}

// mbarrier.try_wait.parity.shared::cta.b64 p, [bar], parity, in a loop:
// returns once the phase of parity `parity` has completed (acquire: the TMA
// data and the arrivers' earlier accesses are then visible). try_wait may
// suspend the thread for a while before returning false, so the loop does
// not hammer the barrier.
__device__ __forceinline__ void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  const uint32_t addr = smem_u32(bar);
  uint32_t done;
  do {
    asm volatile(
        "{\n.reg .pred p;\n"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n"
        "selp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(addr), "r"(parity)
        : "memory");
  } while (!done);
}

// cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes
//   [dst], [tmap, {c0, c1, c2, c3}], [bar]:
// copies the box of the tensor map whose first element has coordinates
// (c0, c1, c2, c3) (innermost first, in elements) to shared memory at `dst`,
// laid out and swizzled as the map says; elements outside the tensor read as
// zero. The full box size is counted against `bar`'s expected transaction
// bytes. `tmap` is the generic address of a CUtensorMap in param, const or
// global memory (a __grid_constant__ kernel parameter here). dst: 128-byte
// aligned, 1024 for the 128-byte swizzle.
__device__ __forceinline__ void tma_load_4d(void* dst, const CUtensorMap* tmap, uint64_t* bar, int c0, int c1,
                                            int c2, int c3) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes "
      "[%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(smem_u32(dst)),
      "l"(reinterpret_cast<uint64_t>(tmap)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(smem_u32(bar))
      : "memory");
}

// The kernel's dynamic shared memory from its first 1024-byte boundary, the
// alignment of the 128-byte swizzle atoms that TMA writes and wgmma reads
// (a kernel asks for 1 KB more than its tiles).
__device__ __forceinline__ unsigned char* dynamic_smem_1024() {
  extern __shared__ unsigned char smem_raw[];
  return reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
}

// prefetch.tensormap [tmap]: brings the tensor map into the descriptor cache
// ahead of its first use.
__device__ __forceinline__ void prefetch_tensor_map(const CUtensorMap* tmap) {
  asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(tmap)) : "memory");
}

// setmaxnreg.{inc,dec}.sync.aligned.u32 N (sm_90a): every thread of the
// warpgroup sets its register budget to N (24 .. 256, multiple of 8); dec
// hands registers back to the SM's pool, inc waits until enough are free.
// Effective only when the kernel has a register cap at entry
// (__launch_bounds__(threads, 1)) and each role is one branch of an if/else;
// ptxas says otherwise (warning C7508).
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
}

template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
}

}  // namespace pyext
