// The CUDA LayerNorm / RMSNorm forward (csrc/layer_norm/layer_norm_fwd_kernel.cuh)
// compiled as host C++ and run block by block on the CPU (simt.h), with the
// kernel and launch that norm_fwd picks. Loaded by tests/test_cuda_emulated.py.
#include <cmath>

#include "simt.h"

// A kernel's __shared__ array is one for every thread of its block: a static
// local is that, blocks running one after another.
#undef __shared__
#define __shared__ static

namespace pyext {
inline float rsqrt(float x) { return 1.f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
}  // namespace pyext

#include "layer_norm/layer_norm_fwd_kernel.cuh"

namespace {

std::string g_result;

template <typename T, typename W>
void forward(const pyext::NormFwdParams& p) {
  auto launch = [&](auto kernel, int threads, int blocks) {
    g_result = emu::launch(dim3(blocks), threads, 0, nullptr, [&] { kernel(p); });
  };
  if (pyext::norm::vectorizable<T>(p.cols, p.x, p.y, p.weight, p.bias))
    pyext::norm::with_fwd_kernel<T, W, pyext::kVec16<T>>(p, launch);
  else
    pyext::norm::with_fwd_kernel<T, W, 1>(p, launch);
}

}  // namespace

// x's dtype and the parameters': 0 float32, 1 float64, 2 float16, 3 bfloat16
// (the pairs norm_fwd is instantiated for); mode: emu::Mode. "" or the
// first fault found.
extern "C" const char* emulate_norm_fwd(const pyext::NormFwdParams* p, int x_dtype, int param_dtype, int mode) {
  emu::g_mode = static_cast<emu::Mode>(mode);
  g_result = "unsupported dtypes";
  if (x_dtype == 0 && param_dtype == 0) forward<float, float>(*p);
  if (x_dtype == 1 && param_dtype == 1) forward<double, double>(*p);
  if (x_dtype == 2 && param_dtype == 2) forward<__half, __half>(*p);
  if (x_dtype == 2 && param_dtype == 0) forward<__half, float>(*p);
  if (x_dtype == 3 && param_dtype == 3) forward<__nv_bfloat16, __nv_bfloat16>(*p);
  if (x_dtype == 3 && param_dtype == 0) forward<__nv_bfloat16, float>(*p);
  return g_result.c_str();
}

extern "C" int norm_fwd_params_size() { return sizeof(pyext::NormFwdParams); }
