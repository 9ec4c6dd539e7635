// The CUDA fused AdamW (csrc/adamw/adamw_kernel.cuh) compiled as host C++ and
// run block by block on the CPU (simt.h), packed into launches by the real
// adamw_launches. Loaded by tests/test_cuda_emulated.py.
#include <algorithm>
#include <cmath>

#include "simt.h"

namespace pyext {
using std::min;
}  // namespace pyext

#include "adamw/adamw_kernel.cuh"

namespace {

std::string g_result;
int g_launches = 0;

template <typename T>
void step(const pyext::AdamWTensorList& list, const pyext::AdamWHyper& hyper) {
  g_result.clear();
  g_launches = 0;
  pyext::adamw::adamw_launches(list, [&](const pyext::AdamWLaunch& args, int blocks) {
    ++g_launches;
    for (int b = 0; b < blocks && g_result.empty(); ++b) {  // what a block reads of the launch's tables
      const int slot = args.block_tensor[b];
      if (slot >= pyext::kAdamWMaxTensors || args.param[slot] == nullptr)
        g_result = "block " + std::to_string(b) + " names tensor slot " + std::to_string(slot) + ", not filled";
    }
    if (g_result.empty())
      g_result = emu::launch(dim3(blocks), pyext::adamw::kThreads, 0, nullptr,
                             [&] { pyext::adamw::adamw_kernel<T>(args, hyper); });
  });
}

}  // namespace

// dtype: 0 float32, 1 float16, 2 bfloat16 (the parameters'). "" or the
// first fault found.
extern "C" const char* emulate_adamw_step(int dtype, const pyext::AdamWTensorList* list,
                                          const pyext::AdamWHyper* hyper) {
  if (dtype == 0) step<float>(*list, *hyper);
  if (dtype == 1) step<__half>(*list, *hyper);
  if (dtype == 2) step<__nv_bfloat16>(*list, *hyper);
  return g_result.c_str();
}

// How many launches the last step took.
extern "C" int adamw_launch_count() { return g_launches; }

extern "C" int adamw_struct_sizes(int which) {
  return which == 0 ? sizeof(pyext::AdamWTensorList) : sizeof(pyext::AdamWHyper);
}
