// A CUDA thread block run on the CPU, for testing the Stage 1 kernels' logic
// without a GPU: each thread of a block is a fiber (ucontext) with its own
// stack, run one at a time until it reaches a __syncthreads, a warp
// collective (a shuffle, ldmatrix, mma) or a warpgroup one (wgmma's wait),
// where it waits until every thread that must take part has arrived, or a
// wait for an mbarrier's or a named barrier's phase that has not completed,
// where it yields and polls again when the others have moved. Blocks run one
// after another.
//
// What it checks besides the results: every thread of a block reaches the
// same barriers (a block that finishes with threads still waiting, or a warp
// collective met by a lane that has exited, is an error), that no thread
// waits for a barrier phase that never completes (or for registers a
// setmaxnreg.inc never gets, common/tma.cuh), that every named
// barrier's phases are complete when its block ends, and the shared
// memory of each block starts as NaN bytes, so a read of what no copy wrote
// shows. Its limits: one thread runs at a time, so a data race shows only
// through the order (Mode::serial lets a warp run ahead of the others,
// Mode::random runs threads in a seeded random order and pace) and
// the cp.async timing (Mode::lazy, in mma.cuh); no global memory bounds but the
// copies' (mma.cuh) and the guards the test puts around each output.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include <cuda_runtime.h>

namespace emu {

enum class Mode { eager, lazy, serial, random };  // see run_block; mma.cuh for eager / lazy

// A cp.async issued and not yet complete (Mode::lazy, common/mma.cuh).
struct Copy {
  void* dst;
  const void* src;
  bool fill;
};

struct Fiber {
  ucontext_t ctx;
  // at_group_barrier: in a collective of group_size threads (a warp, a warpgroup)
  enum { running, polling, at_block_barrier, at_group_barrier, done } state = running;
  int group_size = 0;
  int waits_passed = 0;  // wait_until calls returned: a thread that passed one and polls at the next has moved
  std::vector<std::vector<Copy>> committed_copies;  // oldest group first
  std::vector<Copy> open_copies;
};

// A named barrier (bar.sync / bar.arrive, common/named_barrier.cuh): the
// thread count of its current phase, the threads arrived in it, the phases
// completed.
struct NamedBarrier {
  uint32_t expected = 0, arrived = 0, completed = 0;
};

struct Block {
  uint3 index;
  dim3 dims;  // threads: x fastest, warps of 32 consecutive threads as on a GPU
  int threads = 0;
  int current = -1;  // the fiber running now
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  unsigned char slots[1024][64];  // each thread's input to the collective it is in
  NamedBarrier named[16];
  // setmaxnreg (common/tma.cuh): each warpgroup's registers per thread, and
  // the block's registers that no warpgroup holds.
  int warpgroup_registers[8] = {};
  int free_registers = 0;
};

inline Block* g_block = nullptr;
inline dim3 g_grid;
inline Mode g_mode = Mode::eager;
inline unsigned g_seed = 0;  // Mode::random's, for every launch
inline std::mt19937 g_rng;
inline unsigned char* g_smem = nullptr;  // the block's dynamic shared memory
inline size_t g_smem_bytes = 0;
inline std::string g_error;  // the first fault found in the running launch
inline std::vector<std::vector<char>> g_stacks;  // one a thread, kept from launch to launch
// An asynchronous unit's next step, taken when no thread can move (and at
// random in Mode::random; the TMA copies of common/tma.cuh); true if it did
// something.
inline bool (*g_on_stall)() = nullptr;

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

// Waits until every thread of this thread's group of `size` (threads
// size * i .. size * (i + 1) - 1) has arrived.
inline void group_barrier(int size) {
  g_block->fibers[tid()].group_size = size;
  wait_as(Fiber::at_group_barrier);
}

inline void warp_barrier() { group_barrier(32); }

// Gives way to the other threads until done() holds (an mbarrier's or a
// named barrier's phase complete, registers free for setmaxnreg.inc),
// polling again each time it is run.
template <typename Done>
inline void wait_until(const Done& done) {
  while (!done() && g_error.empty()) wait_as(Fiber::polling);
  ++g_block->fibers[tid()].waits_passed;
}

// bar.sync (wait: arrive, then wait for the phase to complete) or bar.arrive
// on named barrier `id` of `threads` threads. PTX's rules: id 1 .. 15 (0 is
// __syncthreads'), a thread count that is a multiple of 32, the same count
// from every thread of a phase, and (both being .aligned) every thread of
// the warp executing it together: a warp collective here.
inline void named_barrier(uint32_t id, uint32_t threads, bool wait) {
  warp_barrier();
  if (id == 0 || id > 15 || threads == 0 || threads % 32 != 0 || threads > uint32_t(g_block->threads)) {
    fault("a named barrier with id " + std::to_string(id) + " and " + std::to_string(threads) +
          " threads, outside PTX's rules");
    return;
  }
  NamedBarrier& b = g_block->named[id];
  if (b.arrived > 0 && b.expected != threads)
    fault("threads of one phase of named barrier " + std::to_string(id) + " give different thread counts");
  b.expected = threads;
  const uint32_t phase = b.completed;
  if (++b.arrived == threads) {
    b.arrived = 0;
    ++b.completed;
  }
  if (wait) wait_until([&] { return b.completed != phase; });
}

// Every thread of this thread's group of kSize gives `mine`; compute(all
// kSize inputs, index in the group) gives this thread's result, after all
// have given theirs.
template <int kSize, typename In, typename F>
auto group_collective(const In& mine, const F& compute) {
  static_assert(sizeof(In) <= 64, "a thread's input must fit its slot");
  const int first = tid() / kSize * kSize;
  std::memcpy(g_block->slots[tid()], &mine, sizeof(In));
  group_barrier(kSize);
  In all[kSize];
  for (int i = 0; i < kSize; ++i) std::memcpy(&all[i], g_block->slots[first + i], sizeof(In));
  auto result = compute(static_cast<const In*>(all), tid() - first);
  group_barrier(kSize);  // no thread overwrites its slot before every one has read
  return result;
}

template <typename In, typename F>
auto warp_collective(const In& mine, const F& compute) {
  return group_collective<32>(mine, compute);
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

// Releases the group of `size` threads from `first` if all its live threads
// wait at a barrier of that group (one that has exited cannot take part: a
// fault); false if they do not.
inline bool release_group(Block& b, int first, int size) {
  const int end = std::min(b.threads, first + size);
  int waiting = 0, live = 0;
  for (int t = first; t < end; ++t) {
    const Fiber& f = b.fibers[t];
    live += f.state != Fiber::done;
    waiting += f.state == Fiber::at_group_barrier && f.group_size == size;
  }
  if (waiting == 0 || waiting != live) return false;  // none waits, or the rest wait elsewhere
  if (waiting != end - first)
    fault("a collective of " + std::to_string(size) + " threads met by one that has exited (thread " +
          std::to_string(first) + " on)");
  for (int t = first; t < end; ++t) b.fibers[t].state = b.fibers[t].state == Fiber::done ? Fiber::done : Fiber::running;
  return true;
}

// Releases every warp and warpgroup whose threads have all arrived.
inline bool release_groups(Block& b) {
  bool any = false;
  for (const int size : {32, 128})
    for (int first = 0; first < b.threads; first += size) any |= release_group(b, first, size);
  return any;
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
    const bool polling = std::any_of(b.fibers.begin(), b.fibers.end(),
                                     [](const Fiber& f) { return f.state == Fiber::polling; });
    fault(polling ? "threads wait for what never comes (an mbarrier's or a named barrier's phase, or the registers "
                    "of a setmaxnreg.inc)"
                  : "threads of a block wait at different barriers (a collective or __syncthreads not reached by all)");
    return false;
  }
  for (auto& f : b.fibers)
    if (f.state == Fiber::at_block_barrier) f.state = Fiber::running;
  return true;
}

// Runs thread t until it waits again; false if it only polled a phase
// that has not completed (nothing moved).
inline bool run_fiber(Block& b, int t) {
  Fiber& f = b.fibers[t];
  if (f.state != Fiber::running && f.state != Fiber::polling) return false;
  const bool was_polling = f.state == Fiber::polling;
  const int passed = f.waits_passed;
  f.state = Fiber::running;
  b.current = t;
  swapcontext(&b.scheduler, &f.ctx);
  return !was_polling || f.state != Fiber::polling || f.waits_passed != passed;
}

// Runs a block to its end. Mode::serial: one warp at a time, the last
// first, each as far as it can go alone (to a __syncthreads, a warpgroup
// collective or a phase another warp completes). Mode::random: each sweep
// runs each thread with probability 1/2, in a shuffled order (a sweep that
// moves nothing is followed by one of all), and lets an asynchronous unit
// move one time in four. Otherwise all warps a collective at a time, in
// lockstep.
inline void run_block(Block& b) {
  const int warps = (b.threads + 31) / 32;
  do {
    bool moved;
    do {
      moved = false;
      if (g_mode == Mode::serial) {
        for (int w = warps - 1; w >= 0 && g_error.empty(); --w) {
          bool warp_moved;
          do {
            warp_moved = false;
            for (int t = w * 32; t < std::min(b.threads, w * 32 + 32); ++t) warp_moved |= run_fiber(b, t);
            warp_moved |= release_group(b, w * 32, 32);
            moved |= warp_moved;
          } while (warp_moved && g_error.empty());
        }
      } else if (g_mode == Mode::random) {
        std::vector<int> order(b.threads);
        std::iota(order.begin(), order.end(), 0);
        std::shuffle(order.begin(), order.end(), g_rng);
        for (const int t : order)
          if (g_rng() % 2) moved |= run_fiber(b, t);
        if (!moved)
          for (const int t : order) moved |= run_fiber(b, t);
        if (g_on_stall && g_rng() % 4 == 0) moved |= g_on_stall();
      } else {
        for (int t = 0; t < b.threads; ++t) moved |= run_fiber(b, t);
      }
      moved |= release_groups(b);
      if (!moved && g_on_stall) moved = g_on_stall();
    } while (moved && g_error.empty());
  } while (g_error.empty() && release_block(b));
  for (uint32_t id = 1; id < 16 && g_error.empty(); ++id)
    if (b.named[id].arrived)
      fault("named barrier " + std::to_string(id) + " has " + std::to_string(b.named[id].arrived) + " of " +
            std::to_string(b.named[id].expected) + " threads arrived when its block ends");
  if (g_error.empty() && g_on_stall && g_on_stall()) fault("an asynchronous copy still in flight when its block ended");
}

// Runs kernel() (a lambda calling the __global__ function) on a grid of
// `grid` blocks of `block` threads with `smem_bytes` of dynamic shared
// memory at `smem` (what the kernel's `extern __shared__` array names); the
// returned string names the first fault, empty if none.
template <typename Kernel>
std::string launch(dim3 grid, dim3 block, size_t smem_bytes, unsigned char* smem, const Kernel& kernel) {
  constexpr size_t kStack = 64 * 1024;
  g_error.clear();
  g_rng.seed(g_seed);
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
        // What a thread holds at entry under __launch_bounds__(threads, 1): the
        // SM's 64K registers over the block's threads, rounded down to 8.
        for (int& r : b.warpgroup_registers) r = std::min(255, 65536 / threads) / 8 * 8;
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

// Mode::random's seed. simt.h is included by one source of each library.
extern "C" void emulator_seed(unsigned seed) { ::emu::g_seed = seed; }

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
// Products rounded once. g++ -std=c++17 (ISO mode, -ffp-contract=off, and no
// -march with FMA) fuses no product into an add anywhere, so these are plain.
inline float __fmul_rn(float a, float b) { return a * b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  if (mask != 0xffffffffu) ::emu::fault("__syncwarp with a partial mask");
  ::emu::warp_barrier();
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  if (mask != 0xffffffffu) ::emu::fault("__shfl_xor_sync with a partial mask");
  return ::emu::warp_collective(value, [&](const T* all, int lane) { return all[lane ^ lane_mask]; });
}
