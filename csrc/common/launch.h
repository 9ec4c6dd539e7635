// Host-side launch helpers shared by the kernel files (no torch header).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace pyext {

// Blocks for a grid-stride elementwise kernel: enough to fill every SM a few
// times over, never more than the work needs.
inline int elementwise_blocks(int64_t work_items, int threads) {
  int device = 0, sms = 1;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t needed = (work_items + threads - 1) / threads;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(needed, int64_t(sms) * 8)));
}

}  // namespace pyext
