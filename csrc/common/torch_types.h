// For the torch-facing *_api.cpp files only: maps ATen scalar types onto the
// CUDA types the kernels are instantiated for, and the shared launch checks.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace pyext {

template <typename T> struct CudaType { using type = T; };
template <> struct CudaType<c10::Half> { using type = __half; };
template <> struct CudaType<c10::BFloat16> { using type = __nv_bfloat16; };
template <typename T> using cuda_t = typename CudaType<T>::type;

// Raises with the launch error, if any, of the kernel just queued.
void check_launch(const char* op);

}  // namespace pyext
