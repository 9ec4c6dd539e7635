// The CPU stand-in for csrc/common/wgmma.cuh (found first on the emulator's
// include path), written from the PTX ISA's description of wgmma rather than
// from the kernels' comments.
//   Descriptor: start address bits 0-13, leading byte offset 16-29, stride
//     byte offset 32-45 (each >> 4), base offset 49-51, swizzle 62-63 (1 =
//     128B, the only one emulated). Canonical 128B-swizzled layouts, offsets
//     in bytes from the start address, 16-bit elements:
//       K-major, element (mn, k): (mn / 8) SBO + (mn % 8) 128 + 2 k;
//       MN-major, element (k, mn): (mn / 64) LBO + (k / 8) SBO + (k % 8) 128
//         + 2 (mn % 64);
//     then the swizzle on the shared-memory address (bits 4-6 ^= bits 7-9).
//     A from shared memory is K-major, or MN-major with imm-trans-a; B is
//     K-major, or MN-major with imm-trans-b.
//   m64nNk16 fragments, warp w = (thread % 128) / 32, g = lane / 4,
//   t = lane % 4: D element e of d[j]: row 16w + g + 8 (e / 2), column
//     8j + 2t + e % 2; A from registers: a[r] holds row 16w + g + 8 (r % 2),
//     k 2t + 8 (r / 2) and the next k, low half first.
//   Asynchrony: a wgmma is queued when issued and runs when a wgmma.wait_group
//     lets its group complete (the latest the hardware may), reading the
//     accumulators, the A registers and shared memory as they are then; so a
//     kernel that touches them, or lets a buffer be refilled, before the
//     wait gets wrong numbers here. The wait is a collective of the
//     warpgroup; every thread must have issued the same wgmmas.
#pragma once

#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "common/mma.cuh"

#define PYEXT_SM90A 1

namespace emu {

struct WgmmaOp {
  float* d;  // this thread's accumulator, n / 2 floats
  int n;
  const uint32_t* a;  // this thread's 4 A registers (from registers), null when A is in shared memory
  uint64_t desc_a, desc_b;
  int trans_a, trans_b;
  bool scale_d, bf16;
};

struct WgmmaQueue {
  std::vector<WgmmaOp> open;                    // issued since the last commit
  std::vector<std::vector<WgmmaOp>> committed;  // oldest group first
};

inline std::vector<WgmmaQueue> g_wgmma;  // one a thread of the running block

// The order in which warpgroups commit groups of wgmmas (as their thread 0
// does), each with its block (x + gridDim.x * y): what a ping-pong schedule
// sets. Cleared by the emulator before each launch.
struct WgmmaCommit {
  int block, warpgroup;
};
inline std::vector<WgmmaCommit> g_wgmma_commits;

inline WgmmaQueue& wgmma_queue() {
  if (g_wgmma.size() < size_t(g_block->threads)) g_wgmma.resize(g_block->threads);
  return g_wgmma[tid()];
}

struct SmemMatrix {
  uint32_t start, lbo, sbo;
};

inline SmemMatrix decode(uint64_t desc) {
  if (desc >> 62 != 1) fault("a wgmma descriptor without the 128-byte swizzle (the only one emulated)");
  if ((desc >> 49 & 7) != 0) fault("a wgmma descriptor with a base offset");
  return {uint32_t(desc & 0x3FFF) << 4, uint32_t(desc >> 16 & 0x3FFF) << 4, uint32_t(desc >> 32 & 0x3FFF) << 4};
}

inline float element(const SmemMatrix& m, uint32_t offset, bool bf16) {
  uint32_t addr = m.start + offset;
  addr ^= (addr >> 7 & 7) << 4;
  if (addr + 2 > g_smem_bytes) {
    fault("a wgmma operand outside the block's shared memory");
    return 0.f;
  }
  uint16_t bits;
  std::memcpy(&bits, g_smem + addr, 2);
  return bf16 ? pyext::detail::to_float<__nv_bfloat16>(bits) : pyext::detail::to_float<__half>(bits);
}

inline uint32_t kmajor(const SmemMatrix& m, int mn, int k) { return (mn / 8) * m.sbo + (mn % 8) * 128 + 2 * k; }
inline uint32_t mnmajor(const SmemMatrix& m, int k, int mn) {
  return (mn / 64) * m.lbo + (k / 8) * m.sbo + (k % 8) * 128 + 2 * (mn % 64);
}

// Wgmma i of group g for thread `me` of the warpgroup: its D fragment.
inline void run_wgmma(WgmmaQueue* const* all, size_t g, size_t i, int me) {
  const WgmmaOp& op = all[me]->committed[g][i];
  for (int t = 0; t < 128 && me == 0; ++t) {  // checked once for the warpgroup
    const WgmmaOp& o = all[t]->committed[g][i];
    if (o.desc_a != op.desc_a || o.desc_b != op.desc_b || o.n != op.n || o.trans_a != op.trans_a ||
        o.trans_b != op.trans_b ||
        o.scale_d != op.scale_d || o.bf16 != op.bf16 || (o.a == nullptr) != (op.a == nullptr))
      fault("threads of a warpgroup issued different wgmmas");
  }
  const SmemMatrix a = op.a ? SmemMatrix{} : decode(op.desc_a), b = decode(op.desc_b);
  if (!g_error.empty()) return;
  auto A = [&](int row, int k) {
    if (op.a == nullptr) return element(a, op.trans_a ? mnmajor(a, k, row) : kmajor(a, row, k), op.bf16);
    const int r = row % 16, holder = (row / 16) * 32 + (r % 8) * 4 + (k % 8) / 2;
    const uint32_t reg = all[holder]->committed[g][i].a[(r >= 8) + 2 * (k >= 8)];
    const uint16_t bits = uint16_t(reg >> (16 * (k % 2)));
    return op.bf16 ? pyext::detail::to_float<__nv_bfloat16>(bits) : pyext::detail::to_float<__half>(bits);
  };
  auto B = [&](int k, int col) { return element(b, op.trans_b ? mnmajor(b, k, col) : kmajor(b, col, k), op.bf16); };
  const int warp = me / 32, group = me % 32 / 4, t = me % 4;
  for (int j = 0; j < op.n / 8; ++j)
    for (int e = 0; e < 4; ++e) {
      const int row = 16 * warp + group + 8 * (e / 2), col = 8 * j + 2 * t + e % 2;
      float sum = op.scale_d ? op.d[4 * j + e] : 0.f;
      for (int k = 0; k < 16; ++k) sum += A(row, k) * B(k, col);
      op.d[4 * j + e] = sum;
    }
}

}  // namespace emu

namespace pyext {

inline uint64_t smem_desc_sw128(const void* smem, uint32_t lbo_bytes, uint32_t sbo_bytes) {
  const uint64_t addr = emu::smem_offset(smem);
  if (addr >= (1u << 18)) emu::fault("a wgmma operand past the descriptor's 18-bit address");
  return (addr >> 4) | uint64_t(lbo_bytes >> 4 & 0x3FFF) << 16 | uint64_t(sbo_bytes >> 4 & 0x3FFF) << 32 |
         uint64_t(1) << 62;
}

inline void wgmma_fence() {}

inline void wgmma_commit() {
  emu::WgmmaQueue& q = emu::wgmma_queue();
  q.committed.push_back(std::move(q.open));
  q.open.clear();
  if (emu::tid() % 128 == 0)
    emu::g_wgmma_commits.push_back({int(blockIdx.x + gridDim.x * blockIdx.y), emu::tid() / 128});
}

template <int N>
inline void wgmma_wait() {
  emu::WgmmaQueue& q = emu::wgmma_queue();
  if (!q.open.empty()) emu::fault("wgmma.wait_group with wgmmas not committed");
  const size_t run = q.committed.size() > size_t(N) ? q.committed.size() - N : 0;
  emu::group_collective<128>(&q, [&](emu::WgmmaQueue* const* all, int me) {
    for (int t = 0; t < 128; ++t)
      if (all[t]->committed.size() != q.committed.size()) emu::fault("threads of a warpgroup wait on different groups");
    for (size_t g = 0; g < run && emu::g_error.empty(); ++g)
      for (size_t i = 0; i < q.committed[g].size(); ++i) emu::run_wgmma(all, g, i, me);
    return 0;
  });
  q.committed.erase(q.committed.begin(), q.committed.begin() + run);
}

template <int kN>
inline void wgmma_fence_operand(float (&)[kN][4]) {}

template <int kN>
inline void wgmma_fence_operand(uint32_t (&)[kN][4]) {}

template <typename T, int N>
struct Wgmma {
  static constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;

  template <int kTransA, int kTransB>
  static void ss(float (&d)[N / 8][4], uint64_t desc_a, uint64_t desc_b, int scale_d) {
    emu::wgmma_queue().open.push_back({&d[0][0], N, nullptr, desc_a, desc_b, kTransA, kTransB, scale_d != 0, kBf16});
  }

  template <int kTransB>
  static void rs(float (&d)[N / 8][4], const uint32_t (&a)[4], uint64_t desc_b, int scale_d) {
    emu::wgmma_queue().open.push_back({&d[0][0], N, &a[0], 0, desc_b, 0, kTransB, scale_d != 0, kBf16});
  }
};

}  // namespace pyext
