// Host side of TMA: tensor maps (CUtensorMap) built with the driver's
// cuTensorMapEncodeTiled, reached through the runtime's entry-point lookup so
// that the extension does not link libcuda. Plain CUDA: no torch header.
#pragma once

#include <cuda.h>
#include <cudaTypedefs.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace pyext {

// cuTensorMapEncodeTiled from the driver in use, or nullptr where it has none
// (driver older than CUDA 12.0). Looked up once per process.
// cudaGetDriverEntryPointByVersion is the CUDA 12.5+ form of
// cudaGetDriverEntryPoint (deprecated in 13.0); 12000 asks for the ABI the
// function has had since CUDA 12.0.
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 fn = [] {
    void* f = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &f, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();  // not sticky; leave no error for the launch check
      return static_cast<PFN_cuTensorMapEncodeTiled_v12000>(nullptr);
    }
    return reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(f);
  }();
  return fn;
}

// A 4-D tiled tensor map over 16-bit elements: dims (d0, d1, d2, d3),
// innermost first, d0 contiguous; strides of d1, d2, d3 in elements (turned
// into bytes here: the driver wants multiples of 16 bytes below 2^40); boxes
// of (box0, box1, 1, 1) elements, 128-byte swizzle (box0 * 2 <= 128), reads
// outside the tensor filled with zeros. False (and `map` unusable) when the
// driver refuses the layout or has no encoder.
inline bool make_tensor_map_4d_16bit(CUtensorMap* map, bool bf16, const void* base, const uint64_t (&dims)[4],
                                     const int64_t (&strides)[3], uint32_t box0, uint32_t box1) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  cuuint64_t gdim[4], gstride[3];
  for (int i = 0; i < 4; ++i) gdim[i] = dims[i];
  for (int i = 0; i < 3; ++i) {
    if (strides[i] < 0) return false;
    gstride[i] = static_cast<cuuint64_t>(strides[i]) * 2;
  }
  const cuuint32_t box[4] = {box0, box1, 1, 1};
  const cuuint32_t elem_strides[4] = {1, 1, 1, 1};
  const CUresult r =
      encode(map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 4, const_cast<void*>(base),
             gdim, gstride, box, elem_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
             CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS;
}

}  // namespace pyext
