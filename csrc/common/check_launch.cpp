#include <c10/util/Exception.h>
#include <cuda_runtime.h>

#include "common/torch_types.h"

namespace pyext {

void check_launch(const char* op) {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace pyext
