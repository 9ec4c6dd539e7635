// GELU launches on a stream; the kernels and the choice between them are in
// gelu_kernel.cuh.
#include "gelu/gelu_kernel.cuh"

namespace pyext {
namespace {

template <typename T>
void launch(const GeluParams& p, bool backward, cudaStream_t stream) {
  gelu::with_kernel<T>(p, backward, [&](auto kernel, int blocks, int threads) {
    kernel<<<blocks, threads, 0, stream>>>(p);
  });
}

}  // namespace

template <typename T>
void gelu_fwd(const GeluParams& p, cudaStream_t stream) {
  launch<T>(p, false, stream);
}

template <typename T>
void gelu_bwd(const GeluParams& p, cudaStream_t stream) {
  launch<T>(p, true, stream);
}

#define PYEXT_INSTANTIATE_GELU(T)                                  \
  template void gelu_fwd<T>(const GeluParams&, cudaStream_t);      \
  template void gelu_bwd<T>(const GeluParams&, cudaStream_t);
PYEXT_INSTANTIATE_GELU(float)
PYEXT_INSTANTIATE_GELU(double)
PYEXT_INSTANTIATE_GELU(__half)
PYEXT_INSTANTIATE_GELU(__nv_bfloat16)

}  // namespace pyext
