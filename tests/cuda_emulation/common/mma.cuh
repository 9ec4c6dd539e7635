// The CPU stand-in for csrc/common/mma.cuh (found first on the emulator's
// include path): the same functions, written from the PTX ISA's description
// of each instruction rather than from the kernels' comments, so that a
// kernel that misreads a layout gets wrong numbers here.
//   ldmatrix .m8n8.x4.b16: lane 8i + r gives the address of row r of matrix
//     i; lane l receives in register i the 32-bit word l % 4 of row l / 4 of
//     matrix i (its columns 2 (l % 4), 2 (l % 4) + 1, low half first);
//     .trans: of the transposed matrix (rows 2 (l % 4), +1 of column l / 4).
//   mma .m16n8k16 .row.col, groupID g = lane / 4, t = lane % 4:
//     A: reg 0 row g, reg 1 row g + 8, reg 2 row g, reg 3 row g + 8, at
//        columns (k) 2t, 2t + 1, plus 8 for regs 2 and 3;
//     B: reg 0 rows (k) 2t, 2t + 1, reg 1 rows 2t + 8, 2t + 9, of column g;
//     C, D: elements 0, 1 row g, columns 2t, 2t + 1; 2, 3 row g + 8.
//   Bank conflicts: shared memory serves 32 banks of 4 bytes a cycle, so an
//     ldmatrix matrix (8 rows of 16 bytes) takes one pass if its rows fall in
//     8 different 16-byte bank groups ((address / 16) % 8), more if two rows
//     at different addresses share a group; g_ldmatrix_extra_passes counts
//     the passes past one (a performance check: the results are the same).
//   cp.async: in Mode::eager the 16 bytes are copied when the copy is issued;
//     in Mode::lazy only when a cp.async.wait_group lets it complete (the
//     latest the hardware may), so a read before the wait sees NaN or the
//     tile before.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "simt.h"

namespace emu {

inline long g_ldmatrix_extra_passes = 0;

// The global buffers a copy may read from: [begin, end) pairs, set per launch.
inline std::vector<std::pair<const char*, const char*>> g_readable;

// g_readable from n [begin, end) address pairs, as the tests pass them.
inline void set_readable(const void* const* pairs, int n) {
  g_readable.clear();
  for (int i = 0; i < n; ++i)
    g_readable.emplace_back(static_cast<const char*>(pairs[2 * i]), static_cast<const char*>(pairs[2 * i + 1]));
}

inline Fiber& this_fiber() { return g_block->fibers[tid()]; }

inline void do_copy(const Copy& c) {
  if (c.fill) std::memcpy(c.dst, c.src, 16);
  else std::memset(c.dst, 0, 16);
}

inline bool in_smem(const void* p, size_t bytes) {
  auto a = static_cast<const unsigned char*>(p);
  return a >= g_smem && a + bytes <= g_smem + g_smem_bytes && reinterpret_cast<uintptr_t>(a) % 16 == 0;
}

// The shared-memory address of p: its offset in the block's shared memory.
inline uint32_t smem_offset(const void* p) { return uint32_t(static_cast<const unsigned char*>(p) - g_smem); }

inline bool readable(const void* p, size_t bytes) {
  auto a = static_cast<const char*>(p);
  for (auto& [begin, end] : g_readable)
    if (a >= begin && a + bytes <= end) return true;
  return false;
}

}  // namespace emu

namespace pyext {

inline uint32_t smem_u32(const void* p) {
  if (!emu::in_smem(p, 1)) emu::fault("a shared address of something outside the block's shared memory");
  return emu::smem_offset(p);
}

inline void st_shared_b32(uint32_t addr, uint32_t v) {
  if (addr % 4 != 0 || addr + 4 > emu::g_smem_bytes) emu::fault("st.shared.b32 unaligned or outside shared memory");
  else std::memcpy(emu::g_smem + addr, &v, 4);
}

inline unsigned char* dynamic_smem() { return emu::g_smem; }

inline void cp_async_16(void* smem, const void* gmem, bool fill) {
  if (!emu::in_smem(smem, 16)) emu::fault("cp.async to an address outside the block's shared memory or unaligned");
  if (reinterpret_cast<uintptr_t>(gmem) % 16 != 0) emu::fault("cp.async from an unaligned global address");
  if (!emu::readable(gmem, fill ? 16 : 1)) emu::fault("cp.async from outside every input tensor");
  if (!emu::g_error.empty()) return;
  const emu::Copy c{smem, gmem, fill};
  if (emu::g_mode == emu::Mode::lazy) emu::this_fiber().open_copies.push_back(c);
  else emu::do_copy(c);
}

inline void cp_async_commit() {
  if (emu::g_mode != emu::Mode::lazy) return;
  auto& t = emu::this_fiber();
  t.committed_copies.push_back(std::move(t.open_copies));
  t.open_copies.clear();
}

template <int N>
inline void cp_async_wait() {
  if (emu::g_mode != emu::Mode::lazy) return;
  auto& groups = emu::this_fiber().committed_copies;
  while (groups.size() > size_t(N)) {
    for (auto& c : groups.front()) emu::do_copy(c);
    groups.erase(groups.begin());
  }
}

namespace detail {

inline uint16_t half_at(const void* row, int i) {
  uint16_t h;
  std::memcpy(&h, static_cast<const char*>(row) + 2 * i, 2);
  return h;
}

// Passes past one that the 4 matrices of an ldmatrix .x4 take (see the top).
inline int extra_passes(const void* const* rows) {
  int extra = 0;
  for (int i = 0; i < 4; ++i) {
    uintptr_t seen[8][8];
    int count[8] = {};
    for (int r = 0; r < 8; ++r) {
      const uintptr_t chunk = reinterpret_cast<uintptr_t>(rows[8 * i + r]) / 16;
      uintptr_t* group = seen[chunk % 8];
      int& n = count[chunk % 8];
      if (std::find(group, group + n, chunk) == group + n) group[n++] = chunk;
    }
    extra += *std::max_element(count, count + 8) - 1;
  }
  return extra;
}

template <bool kTrans>
inline void ldmatrix(uint32_t (&r)[4], const void* row_address) {
  if (!emu::in_smem(row_address, 16)) emu::fault("ldmatrix row outside the block's shared memory or unaligned");
  const auto words = emu::warp_collective(row_address, [](const void* const* rows, int lane) {
    std::array<uint32_t, 4> w{};
    if (!emu::g_error.empty()) return w;
    if (lane == 0) emu::g_ldmatrix_extra_passes += extra_passes(rows);
    for (int i = 0; i < 4; ++i) {
      uint16_t lo, hi;
      if (!kTrans) {
        lo = half_at(rows[8 * i + lane / 4], 2 * (lane % 4));
        hi = half_at(rows[8 * i + lane / 4], 2 * (lane % 4) + 1);
      } else {
        lo = half_at(rows[8 * i + 2 * (lane % 4)], lane / 4);
        hi = half_at(rows[8 * i + 2 * (lane % 4) + 1], lane / 4);
      }
      w[i] = uint32_t(lo) | uint32_t(hi) << 16;
    }
    return w;
  });
  for (int i = 0; i < 4; ++i) r[i] = words[i];
}

template <typename T>
inline float to_float(uint16_t bits) {
  T x;
  std::memcpy(&x, &bits, 2);
  return float(x);
}

template <typename T>
inline float half_of(uint32_t reg, int which) {
  return to_float<T>(uint16_t(reg >> (16 * which)));
}

struct MmaIn {
  uint32_t a[4], b[2];
};

}  // namespace detail

inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) { detail::ldmatrix<false>(r, smem_row); }
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) { detail::ldmatrix<true>(r, smem_row); }

// D = A B + C with A 16 x 16, B 16 x 8, fp32 sums in k order.
template <typename T>
inline void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const detail::MmaIn mine{{a[0], a[1], a[2], a[3]}, {b0, b1}};
  const auto d = emu::warp_collective(mine, [&](const detail::MmaIn* all, int lane) {
    auto A = [&](int row, int k) {
      const int reg = (row >= 8) + 2 * (k >= 8);
      return detail::half_of<T>(all[(row % 8) * 4 + (k % 8) / 2].a[reg], k % 2);
    };
    auto B = [&](int k, int col) { return detail::half_of<T>(all[col * 4 + (k % 8) / 2].b[k >= 8], k % 2); };
    std::array<float, 4> out{};
    for (int e = 0; e < 4; ++e) {
      const int row = lane / 4 + 8 * (e / 2), col = 2 * (lane % 4) + e % 2;
      float sum = c[e];
      for (int k = 0; k < 16; ++k) sum += A(row, k) * B(k, col);
      out[e] = sum;
    }
    return out;
  });
  for (int e = 0; e < 4; ++e) c[e] = d[e];
}

template <typename T>
inline uint32_t pack2(float lo, float hi) {
  const T l = T(lo), h = T(hi);  // round to nearest even, as cvt.rn
  uint16_t lb, hb;
  std::memcpy(&lb, &l, 2);
  std::memcpy(&hb, &h, 2);
  return uint32_t(lb) | uint32_t(hb) << 16;
}

}  // namespace pyext
