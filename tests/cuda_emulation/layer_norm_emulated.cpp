// The CUDA LayerNorm / RMSNorm forward and backward (csrc/layer_norm/
// layer_norm_fwd_kernel.cuh, layer_norm_bwd_kernel.cuh) compiled as host C++
// and run block by block on the CPU (simt.h), with the kernels, grids and
// launch order that norm_fwd and norm_bwd pick. Loaded by tests/test_cuda_emulated.py.
#include <cmath>

#include "simt.h"
#include "runtime.h"

// A kernel's __shared__ array is one for every thread of its block: a static
// local is that, blocks running one after another.
#undef __shared__
#define __shared__ static

namespace pyext {
inline float rsqrt(float x) { return 1.f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
}  // namespace pyext

#include "layer_norm/layer_norm_bwd_kernel.cuh"
#include "layer_norm/layer_norm_fwd_kernel.cuh"

namespace {

std::string g_result;
// The prefetching backward's dynamic shared memory (128 KB at most: fp32 and
// fp64 rows of 512 threads, four vectors of x and dy each, two buffers).
alignas(16) unsigned char g_dynamic_smem[128 * 1024];

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

template <typename T, typename W>
void backward(pyext::NormBwdParams& p, bool plan) {
  if (plan) {
    p.partial_rows = pyext::norm::bwd_partial_rows<T, W>(p);
    return;
  }
  g_result.clear();
  // What the prefetch's cp.async may read: x and dy.
  const size_t bytes = size_t(p.rows) * size_t(p.cols) * sizeof(T);
  const void* readable[] = {p.x, static_cast<const char*>(p.x) + bytes, p.dy, static_cast<const char*>(p.dy) + bytes};
  emu::set_readable(readable, 2);
  pyext::norm::bwd_launches<T, W>(p, [&](auto kernel, dim3 grid, dim3 block, int smem, auto... args) {
    if (size_t(smem) > sizeof(g_dynamic_smem)) g_result = "more dynamic shared memory than the emulator has";
    if (g_result.empty())
      g_result = emu::launch(grid, block, smem, smem ? g_dynamic_smem : nullptr, [&] { kernel(args...); });
  });
}

// Calls f(T{}, W{}) for x's dtype and the parameters' (0 float32, 1 float64,
// 2 float16, 3 bfloat16; the pairs the kernels are instantiated for).
template <typename F>
void dispatch(int x_dtype, int param_dtype, F&& f) {
  g_result = "unsupported dtypes";
  if (x_dtype == 0 && param_dtype == 0) f(float{}, float{});
  if (x_dtype == 1 && param_dtype == 1) f(double{}, double{});
  if (x_dtype == 2 && param_dtype == 2) f(__half{}, __half{});
  if (x_dtype == 2 && param_dtype == 0) f(__half{}, float{});
  if (x_dtype == 3 && param_dtype == 3) f(__nv_bfloat16{}, __nv_bfloat16{});
  if (x_dtype == 3 && param_dtype == 0) f(__nv_bfloat16{}, float{});
}

}  // namespace

// mode: emu::Mode. Each returns "" or the first fault found.
extern "C" const char* emulate_norm_fwd(const pyext::NormFwdParams* p, int x_dtype, int param_dtype, int mode) {
  emu::g_mode = static_cast<emu::Mode>(mode);
  dispatch(x_dtype, param_dtype, [&](auto t, auto w) { forward<decltype(t), decltype(w)>(*p); });
  return g_result.c_str();
}

// plan: set p->partial_rows as norm_bwd_partial_rows does on a device of
// `sms` multiprocessors (one resident block each); else run the backward.
extern "C" const char* emulate_norm_bwd(pyext::NormBwdParams* p, int x_dtype, int param_dtype, int mode, bool plan,
                                        int sms) {
  emu::g_mode = static_cast<emu::Mode>(mode);
  emu::g_sms = sms;
  dispatch(x_dtype, param_dtype, [&](auto t, auto w) {
    g_result.clear();
    backward<decltype(t), decltype(w)>(*p, plan);
  });
  return g_result.c_str();
}

// The shared memory a block may opt in to (an H100's 227 KB by default; an
// RTX 4090's 99 KB leaves fp32 and fp64 rows the backward without prefetch).
extern "C" void set_smem_optin(int bytes) { emu::g_smem_optin = bytes; }

extern "C" int norm_params_size(int backward) {
  return backward ? sizeof(pyext::NormBwdParams) : sizeof(pyext::NormFwdParams);
}
