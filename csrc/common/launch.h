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

// Whether the binary for this device holds `kernel`'s sm_90a body: only if
// the build targeted sm_90a (TORCH_CUDA_ARCH_LIST with 9.0a). For the sm_90a
// attention kernels, whose barriers are their only static shared memory and
// whose stub for other architectures has none.
template <typename Kernel>
bool has_sm90a_body(Kernel kernel) {
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess || attr.sharedSizeBytes == 0) {
    cudaGetLastError();
    return false;
  }
  return true;
}

// Lets `kernel` launch with `bytes` of dynamic shared memory (over 48 KB needs
// an opt-in). False, with nothing set and no CUDA error left behind, when the
// current device allows less per block (99 KB on sm_86/sm_89, 163 KB on
// sm_80, 227 KB on sm_90) or refuses the opt-in.
template <typename Kernel>
bool opt_in_smem(Kernel kernel, int bytes) {
  if (bytes <= 48 * 1024) return true;
  int device = 0, limit = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (bytes > limit) return false;
  if (cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel), cudaFuncAttributeMaxDynamicSharedMemorySize,
                           bytes) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return true;
}

}  // namespace pyext
