// Named wrappers for the sm_90a warpgroup tensor-core instructions (wgmma):
// shared-memory matrix descriptors, the fence / commit / wait protocol and
// wgmma.mma_async m64nNk16 with fp32 accumulators, for f16 and bf16 inputs.
// Plain CUDA: no torch header. Use only from code compiled for sm_90a (see
// PYEXT_SM90A); the templates emit nothing unless instantiated.
//
// A warpgroup is 4 consecutive warps starting at a warp index divisible by 4;
// all 128 threads issue each wgmma together. Accumulator layout (D, 64 x N,
// fp32), with w = warp % 4, g = lane / 4, t = lane % 4: warp w owns rows
// 16w .. 16w + 15, and d[j] holds, for columns 8j .. 8j + 7,
//   d[j][0], d[j][1]: row 16w + g,     columns 8j + 2t, 8j + 2t + 1
//   d[j][2], d[j][3]: row 16w + g + 8, columns 8j + 2t, 8j + 2t + 1
// which is the mma.sync m16n8 C layout of mma.cuh, repeated N / 8 times.
// A from registers (64 x 16, 16-bit): warp w gives rows 16w .. 16w + 15 in
// the mma.sync m16n8k16 A layout (a[0]: row g, k 2t, 2t+1; a[1]: row g+8;
// a[2]: row g, k 2t+8, 2t+9; a[3]: row g+8, k 2t+8, 2t+9), so acc_to_a of
// flash_tile.cuh turns a 64 x 16 slice of an accumulator into an A operand.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "common/mma.cuh"

// Code that uses wgmma, setmaxnreg or other sm_90a-only instructions sits
// under `#if PYEXT_SM90A`: nvcc defines __CUDA_ARCH_FEAT_SM90_ALL only in
// the device pass for the arch-specific target sm_90a (compute_90a).
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ >= 900) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define PYEXT_SM90A 1
#else
#define PYEXT_SM90A 0
#endif

namespace pyext {

// Matrix descriptor of a wgmma operand in shared memory (64 bits):
//   bits  0-13  start address >> 4        bits 16-29  leading byte offset >> 4
//   bits 32-45  stride byte offset >> 4   bits 49-51  base offset (0 here)
//   bits 62-63  swizzle: 0 none, 1 = 128B, 2 = 64B, 3 = 32B
// With the 128-byte swizzle the operand is made of atoms of 8 rows x 128
// bytes (1024 bytes, 1024-byte aligned; a TMA box loaded with
// CU_TENSOR_MAP_SWIZZLE_128B and 128-byte rows is such a stack of atoms):
// 16-byte chunk c of row r of an atom sits at chunk c ^ (r % 8).
//   K-major (the reduction dim contiguous: Q and K rows of 64 elements):
//     SBO = distance between consecutive 8-row groups along M/N (1024 for a
//     dense stack); LBO is unused for swizzled K-major layouts (set to 1).
//     The k-th 16-element step of a 64-wide atom starts 32 k bytes further:
//     the hardware applies the swizzle to the computed address, so the start
//     address moves and the descriptor stays otherwise the same.
//   MN-major (M/N contiguous: V rows of 64 head-dim elements, K = keys):
//     LBO = distance between consecutive 64-element (128-byte) blocks along
//     N; SBO = distance between consecutive 8-row groups along K (1024).
// Addresses in shared memory fit 18 bits, so `desc + (bytes >> 4)` moves the
// start address by `bytes` without touching the other fields.
__device__ __forceinline__ uint64_t smem_desc_sw128(const void* smem, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  const uint64_t addr = smem_u32(smem);
  return ((addr & 0x3FFFF) >> 4) | (uint64_t((lbo_bytes >> 4) & 0x3FFF) << 16) |
         (uint64_t((sbo_bytes >> 4) & 0x3FFF) << 32) | (uint64_t(1) << 62);
}

// wgmma.fence.sync.aligned: orders this thread's earlier register writes
// (accumulators, A fragments) before the wgmma.mma_async that follow. Needed
// before the first wgmma and whenever those registers were touched since.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }

// wgmma.commit_group.sync.aligned: closes the group of wgmma.mma_async issued
// by this warpgroup since the last commit.
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }

// wgmma.wait_group.sync.aligned N: waits until at most N committed groups
// are pending; then their accumulators may be read and their shared-memory
// operands overwritten.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// An empty asm that "reads and writes" each accumulator register: keeps the
// compiler from moving reads of the accumulators above a wgmma_wait (the
// wgmma asm statements look synchronous to it) or writes below a wgmma issue.
template <int kN>
__device__ __forceinline__ void wgmma_fence_operand(float (&d)[kN][4]) {
#pragma unroll
  for (int j = 0; j < kN; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[j][e])::"memory");
}

template <int kN>
__device__ __forceinline__ void wgmma_fence_operand(uint32_t (&a)[kN][4]) {
#pragma unroll
  for (int j = 0; j < kN; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) asm volatile("" : "+r"(a[j][e])::"memory");
}

// wgmma.mma_async.sync.aligned.m64nNk16.f32.{f16,bf16}.{f16,bf16}:
// D (64 x N, fp32) = A (64 x 16) B (16 x N) + (scale_d ? D : 0), issued by the
// whole warpgroup, completing asynchronously (see wgmma_commit / wgmma_wait).
//   ss: A from shared memory (descriptor desc_a); kTransA 0 = K-major, 1 =
//   MN-major (imm-trans-a).
//   rs: A from registers, the 4 registers of the layout above.
//   B from shared memory (descriptor desc_b); kTransB 0 = K-major, 1 =
//   MN-major (imm-trans-b; the transpose is done by the hardware).
// Operand order in PTX: d, a, b-desc, scale-d (predicate), imm-scale-a,
// imm-scale-b (1: no negation), [imm-trans-a (ss only)], imm-trans-b.
template <typename T, int N>
struct Wgmma;

// The operand lists, spelled out once per N (inline PTX takes no loops):
// the accumulator d[N / 8][4] is operands %0 .. %(N / 2 - 1), "+f" each;
// the scalars follow it, so their numbers depend on N.
#define PYEXT_WGMMA_ACC(d, j) "+f"(d[j][0]), "+f"(d[j][1]), "+f"(d[j][2]), "+f"(d[j][3])
#define PYEXT_WGMMA_N32_D_REGS "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15"
#define PYEXT_WGMMA_N32_D(d) PYEXT_WGMMA_ACC(d, 0), PYEXT_WGMMA_ACC(d, 1), PYEXT_WGMMA_ACC(d, 2), PYEXT_WGMMA_ACC(d, 3)
#define PYEXT_WGMMA_N64_D_REGS \
  "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15" \
  ", %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define PYEXT_WGMMA_N64_D(d) \
  PYEXT_WGMMA_ACC(d, 0), PYEXT_WGMMA_ACC(d, 1), PYEXT_WGMMA_ACC(d, 2), PYEXT_WGMMA_ACC(d, 3), \
      PYEXT_WGMMA_ACC(d, 4), PYEXT_WGMMA_ACC(d, 5), PYEXT_WGMMA_ACC(d, 6), PYEXT_WGMMA_ACC(d, 7)
#define PYEXT_WGMMA_N128_D_REGS \
  PYEXT_WGMMA_N64_D_REGS ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47" \
  ", %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define PYEXT_WGMMA_N128_D(d) \
  PYEXT_WGMMA_N64_D(d), PYEXT_WGMMA_ACC(d, 8), PYEXT_WGMMA_ACC(d, 9), PYEXT_WGMMA_ACC(d, 10), PYEXT_WGMMA_ACC(d, 11), \
      PYEXT_WGMMA_ACC(d, 12), PYEXT_WGMMA_ACC(d, 13), PYEXT_WGMMA_ACC(d, 14), PYEXT_WGMMA_ACC(d, 15)
// ss: desc_a, desc_b, scale_d, kTransA, kTransB; rs: a[0..3], desc_b, scale_d, kTransB.
#define PYEXT_WGMMA_N32_SS_PRED "%18"
#define PYEXT_WGMMA_N32_SS_TAIL "%16, %17, p, 1, 1, %19, %20"
#define PYEXT_WGMMA_N32_RS_PRED "%21"
#define PYEXT_WGMMA_N32_RS_TAIL "{%16, %17, %18, %19}, %20, p, 1, 1, %22"
#define PYEXT_WGMMA_N64_SS_PRED "%34"
#define PYEXT_WGMMA_N64_SS_TAIL "%32, %33, p, 1, 1, %35, %36"
#define PYEXT_WGMMA_N64_RS_PRED "%37"
#define PYEXT_WGMMA_N64_RS_TAIL "{%32, %33, %34, %35}, %36, p, 1, 1, %38"
#define PYEXT_WGMMA_N128_SS_PRED "%66"
#define PYEXT_WGMMA_N128_SS_TAIL "%64, %65, p, 1, 1, %67, %68"
#define PYEXT_WGMMA_N128_RS_PRED "%69"
#define PYEXT_WGMMA_N128_RS_TAIL "{%64, %65, %66, %67}, %68, p, 1, 1, %70"

// Wgmma<CTYPE, N> for the PTX input type AB ("f16" or "bf16"): the
// predicate p is scale_d != 0, set inside the asm block.
#define PYEXT_WGMMA_SPECIALIZATION(CTYPE, AB, N)                                                                \
  template <>                                                                                                   \
  struct Wgmma<CTYPE, N> {                                                                                      \
    template <int kTransA, int kTransB>                                                                         \
    static __device__ __forceinline__ void ss(float (&d)[N / 8][4], uint64_t desc_a, uint64_t desc_b,           \
                                              int scale_d) {                                                    \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " PYEXT_WGMMA_N##N##_SS_PRED ", 0;\n"                     \
                   "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." AB "." AB " {" PYEXT_WGMMA_N##N##_D_REGS    \
                   "}, " PYEXT_WGMMA_N##N##_SS_TAIL ";\n}\n"                                                   \
                   : PYEXT_WGMMA_N##N##_D(d)                                                                    \
                   : "l"(desc_a), "l"(desc_b), "r"(scale_d), "n"(kTransA), "n"(kTransB)                         \
                   : "memory");                                                                                 \
    }                                                                                                           \
    template <int kTransB>                                                                                      \
    static __device__ __forceinline__ void rs(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t desc_b,    \
                                              int scale_d) {                                                    \
      asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " PYEXT_WGMMA_N##N##_RS_PRED ", 0;\n"                     \
                   "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." AB "." AB " {" PYEXT_WGMMA_N##N##_D_REGS    \
                   "}, " PYEXT_WGMMA_N##N##_RS_TAIL ";\n}\n"                                                   \
                   : PYEXT_WGMMA_N##N##_D(d)                                                                    \
                   : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(scale_d), "n"(kTransB)        \
                   : "memory");                                                                                 \
    }                                                                                                           \
  };

PYEXT_WGMMA_SPECIALIZATION(__half, "f16", 32)
PYEXT_WGMMA_SPECIALIZATION(__nv_bfloat16, "bf16", 32)
PYEXT_WGMMA_SPECIALIZATION(__half, "f16", 64)
PYEXT_WGMMA_SPECIALIZATION(__nv_bfloat16, "bf16", 64)
PYEXT_WGMMA_SPECIALIZATION(__half, "f16", 128)
PYEXT_WGMMA_SPECIALIZATION(__nv_bfloat16, "bf16", 128)

}  // namespace pyext
