// Host launcher of the LayerNorm and RMSNorm forward (layer_norm_fwd_kernel.cuh):
// 16-byte vectors where the row length and every pointer allow them.
#include "layer_norm/layer_norm_fwd_kernel.cuh"

namespace pyext {

template <typename T, typename W>
void norm_fwd(const NormFwdParams& p, cudaStream_t stream) {
  auto launch = [&](auto kernel, int threads, int blocks) { kernel<<<blocks, threads, 0, stream>>>(p); };
  if (norm::vectorizable<T>(p.cols, p.x, p.y, p.weight, p.bias)) norm::with_fwd_kernel<T, W, kVec16<T>>(p, launch);
  else norm::with_fwd_kernel<T, W, 1>(p, launch);
}

#define PYEXT_INSTANTIATE_NORM_FWD(T, W) template void norm_fwd<T, W>(const NormFwdParams&, cudaStream_t);
PYEXT_INSTANTIATE_NORM_FWD(float, float)
PYEXT_INSTANTIATE_NORM_FWD(double, double)
PYEXT_INSTANTIATE_NORM_FWD(__half, __half)
PYEXT_INSTANTIATE_NORM_FWD(__half, float)
PYEXT_INSTANTIATE_NORM_FWD(__nv_bfloat16, __nv_bfloat16)
PYEXT_INSTANTIATE_NORM_FWD(__nv_bfloat16, float)

}  // namespace pyext
