// The CUDA runtime queries the launchers make to size their grids, answered
// for an emulated device: g_sms multiprocessors, each holding g_blocks_per_sm
// blocks of any kernel. Defines the runtime's own functions, so include it in
// one emulator source only (each is built as its own library).
#pragma once

#include <cuda_runtime.h>

namespace emu {
inline int g_sms = 132;
inline int g_blocks_per_sm = 1;
inline int g_smem_optin = 232448;  // shared memory a block may opt in to: an H100's
}  // namespace emu

extern "C" {
cudaError_t cudaGetDevice(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  if (attr == cudaDevAttrMultiProcessorCount) *value = emu::g_sms;
  else if (attr == cudaDevAttrMaxSharedMemoryPerBlockOptin) *value = emu::g_smem_optin;
  else return cudaErrorInvalidValue;
  return cudaSuccess;
}

cudaError_t cudaFuncSetAttribute(const void*, cudaFuncAttribute, int) { return cudaSuccess; }

cudaError_t cudaGetLastError() { return cudaSuccess; }

cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* blocks, const void*, int, size_t,
                                                                   unsigned int) {
  *blocks = emu::g_blocks_per_sm;
  return cudaSuccess;
}
}
