// The Stage 2 (sm_90a) FlashAttention forward (csrc/flash_attention/
// flash_fwd_sm90_kernel.cuh) compiled as host C++ and run block by block on
// the CPU (simt.h), with the stand-ins for wgmma (common/wgmma.cuh) and for
// TMA, mbarriers and the tensor-map encoder (common/tma.cuh); the tensor
// maps come from the real make_sm90_tensor_maps, the grid, threads and
// shared memory from the kernel's traits. Loaded by tests/test_cuda_emulated.py.
#include <cmath>

#include "simt.h"
#include "common/mma.cuh"
#include "common/tma.cuh"
#include "common/wgmma.cuh"

// A kernel's static __shared__ array (the barriers) is one for every thread
// of its block: a static local is that, blocks running one after another.
#undef __shared__
#define __shared__ static

namespace pyext {
using std::max;
using std::min;
}  // namespace pyext

#include "flash_attention/flash_fwd_sm90_kernel.cuh"

namespace {

std::string g_result;
alignas(1024) unsigned char g_smem[232448];  // the most an sm_90 block may have

template <typename T, int kD>
void forward(const pyext::FlashAttnParams& p) {
  using Tr = pyext::FlashFwdSm90Traits<kD>;
  static_assert(Tr::kSmemBytes <= sizeof(g_smem), "room for the kernel's shared memory");
  pyext::Sm90TensorMaps maps;
  if (!pyext::make_sm90_tensor_maps<T>(p, Tr::kBlockM, Tr::kBlockN, maps)) {
    g_result = "the tensor-map encoder refused q, k or v";
    return;
  }
  emu::g_wgmma.clear();
  g_result = emu::launch(Tr::grid(p), Tr::kThreads, Tr::kSmemBytes, g_smem,
                         [&] { pyext::flash_fwd_sm90_kernel<T, kD>(maps.q, maps.k, maps.v, p); });
  for (const auto& q : emu::g_wgmma)
    if (g_result.empty() && !(q.open.empty() && q.committed.empty())) g_result = "a thread ended with wgmmas in flight";
}

template <typename T>
void run_forward(const pyext::FlashAttnParams& p) {
  const int padded = pyext::flash_padded_head_dim(p.head_dim);
  if (padded == 64) forward<T, 64>(p);
  else if (padded == 128) forward<T, 128>(p);
  else g_result = "Stage 2 covers head dims that pad to 64 or 128";
}

}  // namespace

// "" or the first fault found. bf16: 1 for bfloat16, 0 for float16; mode:
// emu::Mode; readable: n_readable [begin, end) address pairs, the inputs
// that copies may read.
extern "C" const char* emulate_flash_fwd_sm90(const pyext::FlashAttnParams* p, int bf16, int mode,
                                              const void* const* readable, int n_readable) {
  emu::g_mode = static_cast<emu::Mode>(mode);
  emu::g_on_stall = emu::land_oldest_tma;
  emu::g_tma_in_flight.clear();
  emu::g_readable.clear();
  for (int i = 0; i < n_readable; ++i)
    emu::g_readable.emplace_back(static_cast<const char*>(readable[2 * i]),
                                 static_cast<const char*>(readable[2 * i + 1]));
  if (bf16) run_forward<__nv_bfloat16>(*p);
  else run_forward<__half>(*p);
  return g_result.c_str();
}

extern "C" int flash_attn_params_size() { return sizeof(pyext::FlashAttnParams); }
