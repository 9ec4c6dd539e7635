// The Stage 2 (sm_90a) FlashAttention kernels (csrc/flash_attention/
// flash_*_sm90_kernel.cuh: the forward; the backward after Stage 1's delta,
// as flash_bwd_sm90 runs it: dK/dV then dQ, or with p.dq_accum dK/dV adding
// dQ up then flash_bwd_dq_convert) compiled as host C++ and
// run block by block on the CPU (simt.h), with the stand-ins for wgmma
// (common/wgmma.cuh) and for TMA, mbarriers and the tensor-map encoder
// (common/tma.cuh); the tensor maps come from the real make_sm90_tensor_maps,
// the grids, threads and shared memory from the kernels' traits (the
// forward's persistent grid from the multiprocessors and blocks an SM that
// runtime.h says the device has: emulator_sms). Loaded by tests/test_cuda_emulated.py.
#include <algorithm>
#include <cmath>
#include <vector>

#include "runtime.h"
#include "simt.h"
#include "common/mma.cuh"
#include "common/red_add.cuh"
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

#include "flash_attention/flash_bwd_delta_kernel.cuh"
#include "flash_attention/flash_bwd_dq_convert_kernel.cuh"
#include "flash_attention/flash_bwd_dkdv_sm90_kernel.cuh"
#include "flash_attention/flash_bwd_dq_sm90_kernel.cuh"
#include "flash_attention/flash_fwd_sm90_kernel.cuh"

namespace {

std::string g_result;
std::vector<emu::WgmmaCommit> g_forward_commits;  // emu::g_wgmma_commits of the last forward
alignas(1024) unsigned char g_smem[232448];  // the most an sm_90 block may have

// Runs one kernel on every block of its grid; false (g_result says why) on a fault.
template <typename Kernel>
bool run(dim3 grid, int threads, int smem_bytes, const Kernel& kernel) {
  if (size_t(smem_bytes) > sizeof(g_smem)) g_result = "more shared memory than an sm_90 block may have";
  emu::g_wgmma.clear();
  emu::g_wgmma_commits.clear();
  if (g_result.empty()) g_result = emu::launch(grid, threads, smem_bytes, g_smem, kernel);
  for (const auto& q : emu::g_wgmma)
    if (g_result.empty() && !(q.open.empty() && q.committed.empty())) g_result = "a thread ended with wgmmas in flight";
  return g_result.empty();
}

template <typename T, int kD>
void forward(const pyext::FlashAttnParams& p) {
  using Tr = pyext::FlashFwdSm90Traits<kD>;
  pyext::Sm90TensorMaps maps;
  if (!pyext::make_sm90_tensor_maps<T>(p, Tr::kBlockM, Tr::kBlockN, maps)) {
    g_result = "the tensor-map encoder refused q, k or v";
    return;
  }
  run(Tr::ctas(pyext::flash_fwd_sm90_kernel<T, kD>, p), Tr::kThreads, Tr::kSmemBytes,
      [&] { pyext::flash_fwd_sm90_kernel<T, kD>(maps.q, maps.k, maps.v, p); });
  g_forward_commits = emu::g_wgmma_commits;
}

template <typename T, int kD>
void backward(const pyext::FlashAttnParams& p) {
  using Delta = pyext::FlashBwdDeltaTraits;
  using KV = pyext::FlashBwdDkDvSm90Traits<kD>;
  using Q = pyext::FlashBwdDqSm90Traits<kD>;
  using C = pyext::FlashBwdDqConvertTraits;
  pyext::Sm90TensorMaps kv, q;
  if (!pyext::make_sm90_tensor_maps<T>(p, KV::kBlockM, KV::kBlockN, kv) ||
      !pyext::make_sm90_tensor_maps<T>(p, Q::kBlockM, Q::kBlockN, q)) {
    g_result = "the tensor-map encoder refused q, k, v or dout";
    return;
  }
  if (!run(Delta::grid(p), Delta::kThreads, 0, [&] { pyext::flash_bwd_delta_kernel<T>(p, Delta::rows(p)); })) return;
  if (p.dq_accum == nullptr) {
    run(KV::grid(p), KV::kThreads, KV::kSmemBytes,
        [&] { pyext::flash_bwd_dkdv_sm90_kernel<T, kD, false>(kv.q, kv.k, kv.v, kv.dout, p); }) &&
        run(Q::grid(p), Q::kThreads, Q::kSmemBytes,
            [&] { pyext::flash_bwd_dq_sm90_kernel<T, kD>(q.q, q.k, q.v, q.dout, p); });
    return;
  }
  std::fill_n(p.dq_accum, C::groups(p) * 8, 0.f);  // the launcher's zero_dq_accum
  emu::g_red_target = {p.dq_accum, p.dq_accum + C::groups(p) * 8};
  run(KV::grid(p), KV::kThreads, pyext::FlashBwdDkDvSm90Traits<kD, true>::kSmemBytes,
      [&] { pyext::flash_bwd_dkdv_sm90_kernel<T, kD, true>(kv.q, kv.k, kv.v, kv.dout, p); }) &&
      run(C::grid(p), C::kThreads, 0, [&] { pyext::flash_bwd_dq_convert_kernel<T>(p, C::groups(p)); });
}

// launch_fwd / launch_bwd's choice on an sm_90 device: the Stage 2 kernel of
// the head dim padded to 64 or 128.
template <void (*F64)(const pyext::FlashAttnParams&), void (*F128)(const pyext::FlashAttnParams&)>
void dispatch(const pyext::FlashAttnParams& p) {
  const int padded = pyext::flash_padded_head_dim(p.head_dim);
  if (padded == 64) F64(p);
  else if (padded == 128) F128(p);
  else g_result = "Stage 2 covers head dims that pad to 64 or 128";
}

void set_up(int mode, const void* const* readable, int n_readable) {
  g_result.clear();
  emu::g_mode = static_cast<emu::Mode>(mode);
  emu::g_on_stall = emu::land_next_tma;
  emu::g_tma_in_flight.clear();
  emu::g_red_target = {};
  emu::set_readable(readable, n_readable);
}

}  // namespace

// Each returns "" or the first fault found. bf16: 1 for bfloat16, 0 for
// float16; mode: emu::Mode; readable: n_readable [begin, end) address pairs,
// the inputs that copies may read.
extern "C" const char* emulate_flash_fwd_sm90(const pyext::FlashAttnParams* p, int bf16, int mode,
                                              const void* const* readable, int n_readable) {
  set_up(mode, readable, n_readable);
  if (bf16) dispatch<forward<__nv_bfloat16, 64>, forward<__nv_bfloat16, 128>>(*p);
  else dispatch<forward<__half, 64>, forward<__half, 128>>(*p);
  return g_result.c_str();
}

extern "C" const char* emulate_flash_bwd_sm90(const pyext::FlashAttnParams* p, int bf16, int mode,
                                              const void* const* readable, int n_readable) {
  set_up(mode, readable, n_readable);
  if (bf16) dispatch<backward<__nv_bfloat16, 64>, backward<__nv_bfloat16, 128>>(*p);
  else dispatch<backward<__half, 64>, backward<__half, 128>>(*p);
  return g_result.c_str();
}

// The last forward's wgmma commits (emu::g_wgmma_commits): their count, and
// up to `capacity` of them into block[] and warpgroup[].
extern "C" int forward_wgmma_commits(int* block, int* warpgroup, int capacity) {
  const int n = int(g_forward_commits.size());
  for (int i = 0; i < std::min(n, capacity); ++i) {
    block[i] = g_forward_commits[i].block;
    warpgroup[i] = g_forward_commits[i].warpgroup;
  }
  return n;
}

// The multiprocessors of the emulated device, which the persistent forward
// takes one CTA each of.
extern "C" void emulator_sms(int sms) { emu::g_sms = sms; }

extern "C" int flash_attn_params_size() { return sizeof(pyext::FlashAttnParams); }
