// A named wrapper for a fire-and-forget atomic add to global memory, as the
// sm_90a kernels use it to sum partial results that several blocks produce.
// Plain CUDA: no torch header.
#pragma once

namespace pyext {

// red.global.add.v2.f32 [addr], {a, b} (sm_90+): adds a to addr[0] and b to
// addr[1], each atomically, returning nothing (SASS REDG.E.ADD.F32x2). addr
// is 8-byte aligned, in global memory. The order in which the blocks' adds
// land is not fixed, so the last bits of a sum vary from run to run; like
// every fp32 atomic add to global memory, it flushes denormals to zero.
__device__ __forceinline__ void red_add_f32x2(float* addr, float a, float b) {
  asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(addr), "f"(a), "f"(b) : "memory");
}

}  // namespace pyext
