// Grid size for persistent kernels (host side, no torch header).
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

namespace pyext {

// As many blocks as can be resident on the device at once (occupancy of this
// kernel at this block size and dynamic shared memory), never more than
// `work_blocks`, at least one.
template <typename Kernel>
int resident_blocks(Kernel kernel, int threads, int64_t work_blocks, int smem_bytes = 0) {
  int device = 0, sms = 1, per_sm = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem_bytes);
  const int64_t resident = int64_t(sms) * std::max(per_sm, 1);
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(work_blocks, resident)));
}

}  // namespace pyext
