// The CPU stand-in for csrc/common/tma.cuh (found first on the emulator's
// include path): mbarriers, TMA tile loads and the tensor-map encoder they
// read, written from the PTX ISA and cuda.h's descriptions.
//   mbarrier: a phase completes when its pending arrivals reach zero and its
//     transaction count is zero; then the next phase starts with the
//     barrier's full arrival count. try_wait.parity P is true once the
//     phase of parity P has completed, i.e. while the current phase's
//     parity differs from P. The state lives beside the emulator, keyed by
//     the barrier's address; a barrier used before its init is a fault.
//   cp.async.bulk.tensor (tile mode): the box at the given coordinates,
//     elements outside the tensor read as zero, written row after row to
//     shared memory with the map's swizzle (128B: byte address bits 4-6 ^=
//     bits 7-9, on the shared-memory address), then the box's bytes counted
//     down on the barrier. It lands when issued, or in Mode::lazy only when
//     no thread can move, one copy at a time, oldest first (so a barrier
//     that completes before all its bytes have landed lets its waiters read
//     a buffer not yet written); in Mode::random, any copy in flight, when
//     simt.h's scheduler lets the copy engine move.
//   cuTensorMapEncodeTiled: the documented limits (16-byte aligned base,
//     strides multiples of 16 below 2^40, dims 1 .. 2^32, boxes 1 .. 256,
//     inner box a multiple of 16 bytes and at most the swizzle span) refused
//     with CUDA_ERROR_INVALID_VALUE; the map keeps what the copy needs.
#pragma once

#include <cuda.h>

#include <cstdint>
#include <cstring>
#include <deque>
#include <map>

#include "common/mma.cuh"

namespace emu {

struct Mbarrier {
  uint32_t count = 0, pending = 0;
  int64_t tx = 0;
  uint32_t completed = 0;  // phases completed; the current one has parity completed % 2
};

inline std::map<const void*, Mbarrier> g_mbarriers;

inline Mbarrier* mbarrier(const void* bar) {
  auto it = g_mbarriers.find(bar);
  if (it == g_mbarriers.end()) {
    fault("an mbarrier used before mbarrier.init");
    return nullptr;
  }
  return &it->second;
}

inline void mbarrier_update(Mbarrier& m, int arrivals, int64_t tx) {
  if (m.pending < uint32_t(arrivals)) fault("more arrivals on an mbarrier than its phase expects");
  m.pending -= arrivals;
  m.tx += tx;
  if (m.pending == 0 && m.tx == 0) {
    ++m.completed;
    m.pending = m.count;
  }
}

struct TensorMap {  // what the stand-in encoder keeps in a CUtensorMap's 128 bytes
  const char* base;
  uint32_t rank, elem_bytes, swizzle_bytes;  // swizzle_bytes 0: none
  uint64_t dims[5], strides[5];               // strides in bytes, strides[0] = elem_bytes
  uint32_t box[5];
};
static_assert(sizeof(TensorMap) <= sizeof(CUtensorMap), "the map must fit a CUtensorMap");

inline CUresult encode_tiled(CUtensorMap* map, CUtensorMapDataType type, cuuint32_t rank, void* base,
                             const cuuint64_t* dims, const cuuint64_t* strides, const cuuint32_t* box,
                             const cuuint32_t* elem_strides, CUtensorMapInterleave interleave,
                             CUtensorMapSwizzle swizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill) {
  const uint32_t elem = type == CU_TENSOR_MAP_DATA_TYPE_FLOAT16 || type == CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 ? 2 : 0;
  const uint32_t span = swizzle == CU_TENSOR_MAP_SWIZZLE_128B  ? 128
                        : swizzle == CU_TENSOR_MAP_SWIZZLE_64B ? 64
                        : swizzle == CU_TENSOR_MAP_SWIZZLE_32B ? 32
                                                                : 0;
  bool ok = elem != 0 && rank >= 1 && rank <= 5 && interleave == CU_TENSOR_MAP_INTERLEAVE_NONE &&
            reinterpret_cast<uintptr_t>(base) % 16 == 0 && (swizzle == CU_TENSOR_MAP_SWIZZLE_NONE || span == 128);
  TensorMap m{static_cast<const char*>(base), rank, elem, span, {}, {}, {}};
  for (uint32_t i = 0; ok && i < rank; ++i) {
    ok = dims[i] >= 1 && dims[i] <= (uint64_t(1) << 32) && box[i] >= 1 && box[i] <= 256 && elem_strides[i] == 1;
    m.dims[i] = dims[i];
    m.box[i] = box[i];
    m.strides[i] = i == 0 ? elem : strides[i - 1];
    if (i > 0) ok = ok && strides[i - 1] % 16 == 0 && strides[i - 1] < (uint64_t(1) << 40);
  }
  ok = ok && box[0] * elem % 16 == 0 && (span == 0 || box[0] * elem <= span);
  if (!ok) return CUDA_ERROR_INVALID_VALUE;
  std::memset(map, 0, sizeof(CUtensorMap));
  std::memcpy(map, &m, sizeof(m));
  return CUDA_SUCCESS;
}

struct TmaCopy {
  unsigned char* dst;
  TensorMap map;
  Mbarrier* bar;
  int coords[4];
};

// The box of c.map at c.coords into shared memory, then its bytes off c.bar.
inline void land(const TmaCopy& c) {
  const TensorMap& m = c.map;
  const uint32_t row_bytes = m.box[0] * m.elem_bytes, rows = m.box[1] * m.box[2] * m.box[3];
  const uint32_t start = smem_offset(c.dst);
  for (uint32_t r = 0; r < rows; ++r)
    for (uint32_t e = 0; e < m.box[0]; ++e) {
      const uint32_t index[4] = {e, r % m.box[1], r / m.box[1] % m.box[2], r / (m.box[1] * m.box[2])};
      int64_t offset = 0;
      bool inside = true;
      for (int i = 0; i < 4; ++i) {
        const int64_t x = int64_t(c.coords[i]) + index[i];
        inside &= x >= 0 && uint64_t(x) < m.dims[i];
        offset += x * int64_t(m.strides[i]);
      }
      uint32_t addr = start + r * row_bytes + e * m.elem_bytes;
      if (m.swizzle_bytes) addr ^= (addr >> 7 & 7) << 4;
      if (!inside) {
        std::memset(g_smem + addr, 0, m.elem_bytes);
      } else if (!readable(m.base + offset, m.elem_bytes)) {
        fault("TMA load from outside every input tensor");
        return;
      } else {
        std::memcpy(g_smem + addr, m.base + offset, m.elem_bytes);
      }
    }
  mbarrier_update(*c.bar, 0, -int64_t(rows) * row_bytes);
}

inline std::deque<TmaCopy> g_tma_in_flight;  // Mode::lazy, Mode::random

// simt.h's g_on_stall for kernels that use TMA: lands the oldest copy in
// flight (Mode::random: any).
inline bool land_next_tma() {
  if (g_tma_in_flight.empty()) return false;
  const size_t i = g_mode == Mode::random ? g_rng() % g_tma_in_flight.size() : 0;
  const TmaCopy c = g_tma_in_flight[i];
  g_tma_in_flight.erase(g_tma_in_flight.begin() + i);
  land(c);
  return true;
}

}  // namespace emu

// What tma_host.h looks up from the driver: the stand-in encoder. Defines the
// runtime's own function: include this in one emulator source only.
extern "C" cudaError_t cudaGetDriverEntryPointByVersion(const char* symbol, void** fn, unsigned int,
                                                         unsigned long long, cudaDriverEntryPointQueryResult* status) {
  const bool known = std::strcmp(symbol, "cuTensorMapEncodeTiled") == 0;
  *fn = known ? reinterpret_cast<void*>(&emu::encode_tiled) : nullptr;
  *status = known ? cudaDriverEntryPointSuccess : cudaDriverEntryPointSymbolNotFound;
  return cudaSuccess;
}

namespace pyext {

inline void mbarrier_init(uint64_t* bar, uint32_t count) { emu::g_mbarriers[bar] = {count, count, 0, 0}; }

inline void fence_barrier_init() {}

inline void mbarrier_ring_init(uint64_t* full, uint64_t* empty, int stages, uint32_t producers,
                               uint32_t consumers) {
  for (int s = 0; s < stages; ++s) {
    mbarrier_init(&full[s], producers);
    mbarrier_init(&empty[s], consumers);
  }
}

inline void fence_proxy_async() {}

inline void mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t bytes) {
  if (emu::Mbarrier* m = emu::mbarrier(bar)) emu::mbarrier_update(*m, 1, bytes);
}

inline void mbarrier_arrive(uint64_t* bar) {
  if (emu::Mbarrier* m = emu::mbarrier(bar)) emu::mbarrier_update(*m, 1, 0);
}

inline void mbarrier_wait(uint64_t* bar, uint32_t parity) {
  emu::wait_until([&] {
    const emu::Mbarrier* m = emu::mbarrier(bar);
    return m == nullptr || m->completed % 2 != parity % 2;
  });
}

inline void tma_load_4d(void* dst, const CUtensorMap* tmap, uint64_t* bar, int c0, int c1, int c2, int c3) {
  emu::TmaCopy c{static_cast<unsigned char*>(dst), {}, emu::mbarrier(bar), {c0, c1, c2, c3}};
  std::memcpy(&c.map, tmap, sizeof(c.map));
  const uint32_t bytes = c.map.box[0] * c.map.elem_bytes * c.map.box[1] * c.map.box[2] * c.map.box[3];
  if (c.map.rank != 4) emu::fault("tma_load_4d with a map of another rank");
  if (!emu::in_smem(dst, bytes) || emu::smem_offset(dst) % (c.map.swizzle_bytes ? 1024 : 128) != 0)
    emu::fault("TMA destination outside shared memory or not aligned for its swizzle");
  if (!emu::g_error.empty() || c.bar == nullptr) return;
  if (emu::g_mode == emu::Mode::lazy || emu::g_mode == emu::Mode::random) emu::g_tma_in_flight.push_back(c);
  else emu::land(c);
}

inline void prefetch_tensor_map(const CUtensorMap*) {}

inline unsigned char* dynamic_smem_1024() {
  const auto base = reinterpret_cast<uintptr_t>(emu::g_smem);
  return reinterpret_cast<unsigned char*>((base + 1023) & ~uintptr_t(1023));
}

// setmaxnreg.{inc,dec}.sync.aligned: every thread of the warpgroup, with the
// same count (24 .. 256, a multiple of 8); dec gives the registers above N
// back to the block, inc waits until the block has those it asks for (a
// wait that never ends is simt.h's deadlock fault; the block's registers are
// what its threads held at entry).
template <int N>
inline void setmaxnreg(bool inc) {
  static_assert(N >= 24 && N <= 256 && N % 8 == 0, "setmaxnreg takes 24 .. 256, a multiple of 8");
  emu::group_collective<128>(N, [](const int* all, int) {
    for (int i = 0; i < 128; ++i)
      if (all[i] != N) emu::fault("setmaxnreg with different counts in one warpgroup");
    return 0;
  });
  emu::Block& b = *emu::g_block;
  int& mine = b.warpgroup_registers[emu::tid() / 128];
  if (emu::tid() % 128 == 0) {  // one thread moves the warpgroup's registers
    if (inc ? N < mine : N > mine)
      emu::fault(inc ? "setmaxnreg.inc below the warpgroup's count" : "setmaxnreg.dec above the warpgroup's count");
    const int change = (N - mine) * 128;
    emu::wait_until([&] { return b.free_registers >= change; });
    b.free_registers -= change;
    mine = N;
  }
  emu::wait_until([&] { return mine == N; });
}

template <int N>
inline void setmaxnreg_inc() {
  setmaxnreg<N>(true);
}

template <int N>
inline void setmaxnreg_dec() {
  setmaxnreg<N>(false);
}

}  // namespace pyext
