// A CUDA thread block run on the CPU, for testing the Stage 1 kernels' logic
// without a GPU: each thread of a block is a fiber (ucontext) with its own
// stack, run one at a time until it reaches a __syncthreads or a warp
// collective (a shuffle, ldmatrix, mma), where it waits until every thread
// that must take part has arrived. Blocks run one after another.
//
// What it checks besides the results: every thread of a block reaches the
// same barriers (a block that finishes with threads still waiting, or a warp
// collective met by a lane that has exited, is an error), and the shared
// memory of each block starts as NaN bytes, so a read of what no copy wrote
// shows. Its limits: one thread runs at a time, so a data race shows only
// through the order (Mode::serial lets a warp run ahead of the others) and
// the cp.async timing (Mode::lazy, in mma.cuh); no global memory bounds but the
// copies' (mma.cuh) and the guards the test puts around each output.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include <cuda_runtime.h>

namespace emu {

enum class Mode { eager, lazy, serial };  // see run_block; mma.cuh for eager / lazy

// A cp.async issued and not yet complete (Mode::lazy, common/mma.cuh).
struct Copy {
  void* dst;
  const void* src;
  bool fill;
};

struct Fiber {
  ucontext_t ctx;
  enum { running, at_block_barrier, at_warp_barrier, done } state = running;
  std::vector<std::vector<Copy>> committed_copies;  // oldest group first
  std::vector<Copy> open_copies;
};

struct Block {
  uint3 index;
  dim3 dims;  // threads: x fastest, warps of 32 consecutive threads as on a GPU
  int threads = 0;
  int current = -1;  // the fiber running now
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  unsigned char warp_slots[32][32 * 64];  // one warp collective's inputs, 64 bytes a lane
};

inline Block* g_block = nullptr;
inline dim3 g_grid;
inline Mode g_mode = Mode::eager;
inline unsigned char* g_smem = nullptr;  // the block's dynamic shared memory
inline size_t g_smem_bytes = 0;
inline std::string g_error;  // the first fault found in the running launch
inline std::vector<std::vector<char>> g_stacks;  // one a thread, kept from launch to launch

inline void fault(const std::string& what) {
  if (g_error.empty()) g_error = what;
}

inline int tid() { return g_block->current; }

inline uint3 thread_index() {
  const dim3 d = g_block->dims;
  const unsigned t = unsigned(tid());
  return {t % d.x, t / d.x % d.y, t / (d.x * d.y)};
}

inline void wait_as(decltype(Fiber::state) state) {
  Fiber& f = g_block->fibers[tid()];
  f.state = state;
  swapcontext(&f.ctx, &g_block->scheduler);
}

inline void syncthreads() { wait_as(Fiber::at_block_barrier); }
inline void warp_barrier() { wait_as(Fiber::at_warp_barrier); }

// Every lane of this thread's warp gives `mine`; compute(all 32 inputs, lane)
// gives this lane's result, after all have given theirs.
template <typename In, typename F>
auto warp_collective(const In& mine, const F& compute) {
  static_assert(sizeof(In) <= 64, "a lane's input must fit its slot");
  const int lane = tid() % 32, warp = tid() / 32;
  In* slots = reinterpret_cast<In*>(g_block->warp_slots[warp]);
  slots[lane] = mine;
  warp_barrier();
  auto result = compute(static_cast<const In*>(slots), lane);
  warp_barrier();  // no lane overwrites its slot before every lane has read
  return result;
}

template <typename Kernel>
struct Launch {
  static inline const Kernel* kernel = nullptr;
  static void start() {
    (*kernel)();
    g_block->fibers[tid()].state = Fiber::done;
    swapcontext(&g_block->fibers[tid()].ctx, &g_block->scheduler);
  }
};

// Releases warp w if all its live lanes wait at a warp barrier (a lane that
// has exited cannot take part: a fault); false if it does not.
inline bool release_warp(Block& b, int w) {
  const int first = w * 32, end = std::min(b.threads, first + 32);
  int waiting = 0, live = 0;
  for (int t = first; t < end; ++t) {
    live += b.fibers[t].state != Fiber::done;
    waiting += b.fibers[t].state == Fiber::at_warp_barrier;
  }
  if (waiting == 0 || waiting != live) return false;  // none waits, or the rest are at a __syncthreads
  if (waiting != end - first) fault("a warp collective met by a lane that has exited (warp " + std::to_string(w) + ")");
  for (int t = first; t < end; ++t) b.fibers[t].state = b.fibers[t].state == Fiber::done ? Fiber::done : Fiber::running;
  return true;
}

// Releases the block when every live thread waits at __syncthreads; false
// when all are done, or (a fault) when some wait elsewhere and none can move.
inline bool release_block(Block& b) {
  bool any = false, all_at_barrier = true;
  for (auto& f : b.fibers) {
    if (f.state == Fiber::done) continue;
    any = true;
    all_at_barrier &= f.state == Fiber::at_block_barrier;
  }
  if (!any) return false;
  if (!all_at_barrier) {
    fault("threads of a block wait at different barriers (a collective or __syncthreads not reached by all)");
    return false;
  }
  for (auto& f : b.fibers)
    if (f.state == Fiber::at_block_barrier) f.state = Fiber::running;
  return true;
}

inline void run_fiber(Block& b, int t) {
  b.current = t;
  if (b.fibers[t].state == Fiber::running) swapcontext(&b.scheduler, &b.fibers[t].ctx);
}

// Runs a block to its end. Mode::serial: one warp at a time, the last
// first, each to its next __syncthreads (the most one warp can run ahead of
// another); otherwise all warps a collective at a time, in lockstep.
inline void run_block(Block& b) {
  const int warps = (b.threads + 31) / 32;
  do {
    if (g_mode == Mode::serial) {
      for (int w = warps - 1; w >= 0; --w) {
        do {
          for (int t = w * 32; t < std::min(b.threads, w * 32 + 32); ++t) run_fiber(b, t);
        } while (release_warp(b, w) && g_error.empty());
      }
      continue;
    }
    bool moved;
    do {
      for (int t = 0; t < b.threads; ++t) run_fiber(b, t);
      moved = false;
      for (int w = 0; w < warps; ++w) moved |= release_warp(b, w);
    } while (moved && g_error.empty());
  } while (g_error.empty() && release_block(b));
}

// Runs kernel() (a lambda calling the __global__ function) on a grid of
// `grid` blocks of `block` threads with `smem_bytes` of dynamic shared
// memory at `smem` (what the kernel's `extern __shared__` array names); the
// returned string names the first fault, empty if none.
template <typename Kernel>
std::string launch(dim3 grid, dim3 block, size_t smem_bytes, unsigned char* smem, const Kernel& kernel) {
  constexpr size_t kStack = 64 * 1024;
  g_error.clear();
  g_smem = smem;
  g_smem_bytes = smem_bytes;
  g_grid = grid;
  Launch<Kernel>::kernel = &kernel;
  const int threads = int(block.x * block.y * block.z);
  if (g_stacks.size() < size_t(threads)) g_stacks.resize(threads, std::vector<char>(kStack));
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x && g_error.empty(); ++x) {
        std::memset(g_smem, 0xff, smem_bytes);  // NaN in every float type
        Block b;
        b.index = {x, y, z};
        b.dims = block;
        b.threads = threads;
        b.fibers = std::vector<Fiber>(threads);
        g_block = &b;
        for (int t = 0; t < threads; ++t) {
          Fiber& f = b.fibers[t];
          getcontext(&f.ctx);
          f.ctx.uc_stack.ss_sp = g_stacks[t].data();
          f.ctx.uc_stack.ss_size = kStack;
          f.ctx.uc_link = nullptr;
          makecontext(&f.ctx, &Launch<Kernel>::start, 0);
        }
        run_block(b);
        g_block = nullptr;
      }
  return g_error;
}

}  // namespace emu

// What the kernels see of CUDA's device side (cuda_runtime.h, included by a
// host compiler, leaves the attributes to it; launch bounds it leaves out).
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
#define threadIdx (::emu::thread_index())
#define blockIdx (::emu::g_block->index)
#define gridDim (::emu::g_grid)
#define blockDim (::emu::g_block->dims)
#define __syncthreads() ::emu::syncthreads()

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  if (mask != 0xffffffffu) ::emu::fault("__shfl_xor_sync with a partial mask");
  return ::emu::warp_collective(value, [&](const T* all, int lane) { return all[lane ^ lane_mask]; });
}
