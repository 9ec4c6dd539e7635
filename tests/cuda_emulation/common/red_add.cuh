// The CPU stand-in for csrc/common/red_add.cuh (found first on the
// emulator's include path). Threads of the emulator run one at a time, so a
// plain add is atomic. It checks the vector's alignment (8 bytes) and that
// both floats lie in the buffer the launch may add to (emu::g_red_target):
// an add of 0 past a row's end changes no value, so the guards alone would
// not see it.
#pragma once

#include <cstdint>

#include "simt.h"

namespace emu {

struct RedTarget {
  const float* begin = nullptr;
  const float* end = nullptr;
};
inline RedTarget g_red_target;  // set by the emulator before a launch that adds

}  // namespace emu

namespace pyext {

inline void red_add_f32x2(float* addr, float a, float b) {
  if (reinterpret_cast<uintptr_t>(addr) % 8 != 0) emu::fault("red.global.add.v2.f32 on an address not 8-byte aligned");
  else if (addr < emu::g_red_target.begin || addr + 2 > emu::g_red_target.end)
    emu::fault("red.global.add.v2.f32 outside the buffer it adds to");
  else {
    addr[0] += a;
    addr[1] += b;
  }
}

}  // namespace pyext
