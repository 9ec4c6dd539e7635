// Host launcher of the fused AdamW (adamw_kernel.cuh) for float32, float16
// and bfloat16 parameters.
#include "adamw/adamw_kernel.cuh"

namespace pyext {

template <typename T>
void adamw_step(const AdamWTensorList& list, const AdamWHyper& hyper, cudaStream_t stream) {
  adamw::adamw_launches(list, [&](const AdamWLaunch& args, int blocks) {
    adamw::adamw_kernel<T><<<blocks, adamw::kThreads, 0, stream>>>(args, hyper);
  });
}

template void adamw_step<float>(const AdamWTensorList&, const AdamWHyper&, cudaStream_t);
template void adamw_step<__half>(const AdamWTensorList&, const AdamWHyper&, cudaStream_t);
template void adamw_step<__nv_bfloat16>(const AdamWTensorList&, const AdamWHyper&, cudaStream_t);

}  // namespace pyext
