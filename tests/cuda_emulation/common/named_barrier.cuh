// The CPU stand-in for csrc/common/named_barrier.cuh (found first on the
// emulator's include path): bar.sync / bar.arrive on simt.h's named
// barriers, which check the PTX rules the kernels rely on (ids 1 .. 15, one
// thread count per phase, every phase complete when the block ends).
#pragma once

#include <cstdint>

#include "simt.h"

namespace pyext {

inline void named_barrier_sync(uint32_t id, uint32_t threads) { emu::named_barrier(id, threads, true); }

inline void named_barrier_arrive(uint32_t id, uint32_t threads) { emu::named_barrier(id, threads, false); }

}  // namespace pyext
