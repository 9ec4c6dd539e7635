// Host launcher of the LayerNorm and RMSNorm backward (layer_norm_bwd_kernel.cuh):
// 16-byte vectors where the row length and every pointer allow them; stage one
// on as many blocks as are resident, then the fixed-order sum of the partials.
#include "layer_norm/layer_norm_bwd_kernel.cuh"

namespace pyext {

template <typename T, typename W>
int norm_bwd_partial_rows(const NormBwdParams& p) {
  return norm::bwd_partial_rows<T, W>(p);
}

template <typename T, typename W>
void norm_bwd(const NormBwdParams& p, cudaStream_t stream) {
  norm::bwd_launches<T, W>(p, [&](auto kernel, dim3 grid, dim3 block, int smem, auto... args) {
    kernel<<<grid, block, smem, stream>>>(args...);
  });
}

#define PYEXT_INSTANTIATE_NORM_BWD(T, W)                              \
  template int norm_bwd_partial_rows<T, W>(const NormBwdParams&);     \
  template void norm_bwd<T, W>(const NormBwdParams&, cudaStream_t);
PYEXT_INSTANTIATE_NORM_BWD(float, float)
PYEXT_INSTANTIATE_NORM_BWD(double, double)
PYEXT_INSTANTIATE_NORM_BWD(__half, __half)
PYEXT_INSTANTIATE_NORM_BWD(__half, float)
PYEXT_INSTANTIATE_NORM_BWD(__nv_bfloat16, __nv_bfloat16)
PYEXT_INSTANTIATE_NORM_BWD(__nv_bfloat16, float)

}  // namespace pyext
