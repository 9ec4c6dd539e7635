// A named wrapper for a fire-and-forget atomic add to global memory, as the
// attention backward uses it to sum dQ, which several blocks add to.
// Plain CUDA: no torch header.
#pragma once

namespace pyext {

// Adds a to addr[0] and b to addr[1], each atomically, returning nothing:
// red.global.add.v2.f32 [addr], {a, b} on sm_90+ (SASS REDG.E.ADD.F32x2),
// two red.global.add.f32 before. addr is 8-byte aligned, in global memory.
// The order in which the blocks' adds land is not fixed, so the last bits of
// a sum vary from run to run; like every fp32 atomic add to global memory,
// it flushes denormals to zero.
__device__ __forceinline__ void red_add_f32x2(float* addr, float a, float b) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(addr), "f"(a), "f"(b) : "memory");
#else
  asm volatile("red.global.add.f32 [%0], %1;\n" ::"l"(addr), "f"(a) : "memory");
  asm volatile("red.global.add.f32 [%0], %1;\n" ::"l"(addr + 1), "f"(b) : "memory");
#endif
}

}  // namespace pyext
