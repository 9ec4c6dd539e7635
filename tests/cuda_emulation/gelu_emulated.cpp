// The CUDA GELU forward and backward (csrc/gelu/gelu_kernel.cuh) compiled as
// host C++ and run block by block on the CPU (simt.h), with the kernel and
// grid gelu_fwd / gelu_bwd pick. erf, tanh and exp are the host's libm, not
// CUDA's device functions: both are within 2 ulp of the true value, not the
// same bits. Loaded by tests/test_cuda_emulated.py.
#include <cmath>

#include "simt.h"
#include "runtime.h"

namespace pyext {
using std::erf;
using std::exp;
using std::tanh;
}  // namespace pyext

#include "gelu/gelu_kernel.cuh"

namespace {

std::string g_result;
int g_blocks = 0;

template <typename T>
void run(const pyext::GeluParams& p, bool backward) {
  pyext::gelu::with_kernel<T>(p, backward, [&](auto kernel, int blocks, int threads) {
    g_blocks = blocks;
    g_result = emu::launch(dim3(blocks), threads, 0, nullptr, [&] { kernel(p); });
  });
}

}  // namespace

// dtype: 0 float32, 1 float64, 2 float16, 3 bfloat16; on a device of `sms`
// multiprocessors. "" or the first fault found.
extern "C" const char* emulate_gelu(const pyext::GeluParams* p, int dtype, bool backward, int sms) {
  emu::g_sms = sms;
  g_result = "unsupported dtype";
  if (dtype == 0) run<float>(*p, backward);
  if (dtype == 1) run<double>(*p, backward);
  if (dtype == 2) run<__half>(*p, backward);
  if (dtype == 3) run<__nv_bfloat16>(*p, backward);
  return g_result.c_str();
}

// The grid of the last launch, in blocks.
extern "C" int gelu_last_blocks() { return g_blocks; }

extern "C" int gelu_params_size() { return sizeof(pyext::GeluParams); }
