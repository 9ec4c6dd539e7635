// The Stage 1 FlashAttention kernels (csrc/flash_attention, mma.sync) compiled
// as host C++ and run block by block on the CPU (simt.h, common/mma.cuh):
// the forward, then the backward's launches as flash_bwd makes them (delta,
// dK/dV, dQ; or with p.dq_accum delta, dK/dV adding dQ up, the rounding of
// dQ), with the grids, threads and shared memory of the real launchers.
// Loaded by tests/test_cuda_emulated.py through ctypes.
#include <algorithm>
#include <cmath>

#include "simt.h"
#include "common/mma.cuh"
#include "common/red_add.cuh"

namespace pyext {
using std::max;
using std::min;
alignas(16) unsigned char smem[256 * 1024];  // what the kernels' `extern __shared__ smem[]` names
}  // namespace pyext

#include "flash_attention/flash_bwd_delta_kernel.cuh"
#include "flash_attention/flash_bwd_dkdv_kernel.cuh"
#include "flash_attention/flash_bwd_dq_convert_kernel.cuh"
#include "flash_attention/flash_bwd_dq_kernel.cuh"
#include "flash_attention/flash_fwd_kernel.cuh"

namespace {

std::string g_result;

// Runs one kernel of Traits Tr on every block of its grid.
template <typename Tr, typename Kernel>
bool run(const pyext::FlashAttnParams& p, size_t smem_bytes, const Kernel& kernel) {
  static_assert(sizeof(pyext::smem) >= 160 * 1024, "room for the largest kernel's shared memory");
  g_result = emu::launch(Tr::grid(p), Tr::kThreads, smem_bytes, pyext::smem, kernel);
  return g_result.empty();
}

template <typename T, int kD>
void forward(const pyext::FlashAttnParams& p) {
  using Tr = pyext::FlashFwdTraits<kD>;
  run<Tr>(p, Tr::kSmemBytes, [&] { pyext::flash_fwd_kernel<T, kD>(p); });
}

template <typename T, int kD>
void backward(const pyext::FlashAttnParams& p) {
  using Delta = pyext::FlashBwdDeltaTraits;
  using KV = pyext::FlashBwdDkDvTraits<kD>;
  using Q = pyext::FlashBwdDqTraits<kD>;
  using C = pyext::FlashBwdDqConvertTraits;
  if (!run<Delta>(p, 0, [&] { pyext::flash_bwd_delta_kernel<T>(p, Delta::rows(p)); })) return;
  if (p.dq_accum == nullptr) {
    run<KV>(p, KV::kSmemBytes, [&] { pyext::flash_bwd_dkdv_kernel<T, kD, false>(p); }) &&
        run<Q>(p, Q::kSmemBytes, [&] { pyext::flash_bwd_dq_kernel<T, kD>(p); });
    return;
  }
  std::fill_n(p.dq_accum, C::groups(p) * 8, 0.f);  // the launcher's zero_dq_accum
  emu::g_red_target = {p.dq_accum, p.dq_accum + C::groups(p) * 8};
  run<KV>(p, pyext::FlashBwdDkDvTraits<kD, true>::kSmemBytes, [&] { pyext::flash_bwd_dkdv_kernel<T, kD, true>(p); }) &&
      run<C>(p, 0, [&] { pyext::flash_bwd_dq_convert_kernel<T>(p, C::groups(p)); });
}

// The launchers' dispatch: the head dim rounded up to a multiple of 32.
template <typename T, void (*F32)(const pyext::FlashAttnParams&), void (*F64)(const pyext::FlashAttnParams&),
          void (*F96)(const pyext::FlashAttnParams&), void (*F128)(const pyext::FlashAttnParams&),
          void (*F160)(const pyext::FlashAttnParams&), void (*F192)(const pyext::FlashAttnParams&),
          void (*F224)(const pyext::FlashAttnParams&), void (*F256)(const pyext::FlashAttnParams&)>
void dispatch(const pyext::FlashAttnParams& p) {
  switch (pyext::flash_padded_head_dim(p.head_dim)) {
    case 32: return F32(p);
    case 64: return F64(p);
    case 96: return F96(p);
    case 128: return F128(p);
    case 160: return F160(p);
    case 192: return F192(p);
    case 224: return F224(p);
    default: return F256(p);
  }
}

template <typename T>
void run_forward(const pyext::FlashAttnParams& p) {
  dispatch<T, forward<T, 32>, forward<T, 64>, forward<T, 96>, forward<T, 128>, forward<T, 160>, forward<T, 192>,
           forward<T, 224>, forward<T, 256>>(p);
}

template <typename T>
void run_backward(const pyext::FlashAttnParams& p) {
  dispatch<T, backward<T, 32>, backward<T, 64>, backward<T, 96>, backward<T, 128>, backward<T, 160>,
           backward<T, 192>, backward<T, 224>, backward<T, 256>>(p);
}

void set_up(int mode, const void* const* readable, int n_readable) {
  emu::g_mode = static_cast<emu::Mode>(mode);
  emu::g_red_target = {};
  emu::set_readable(readable, n_readable);
}

}  // namespace

// Each returns "" or the first fault found. bf16: 1 for bfloat16, 0 for
// float16; mode: emu::Mode; readable: n_readable [begin, end) address pairs,
// the inputs that copies may read.
extern "C" const char* emulate_flash_fwd(const pyext::FlashAttnParams* p, int bf16, int mode,
                                         const void* const* readable, int n_readable) {
  set_up(mode, readable, n_readable);
  if (bf16) run_forward<__nv_bfloat16>(*p);
  else run_forward<__half>(*p);
  return g_result.c_str();
}

extern "C" const char* emulate_flash_bwd(const pyext::FlashAttnParams* p, int bf16, int mode,
                                         const void* const* readable, int n_readable) {
  set_up(mode, readable, n_readable);
  if (bf16) run_backward<__nv_bfloat16>(*p);
  else run_backward<__half>(*p);
  return g_result.c_str();
}

// For the caller's check that its copy of the struct has the same layout.
// The ldmatrix passes past one since the last call (common/mma.cuh), then zero.
extern "C" long take_ldmatrix_extra_passes() {
  const long passes = emu::g_ldmatrix_extra_passes;
  emu::g_ldmatrix_extra_passes = 0;
  return passes;
}

extern "C" int flash_attn_params_size() { return sizeof(pyext::FlashAttnParams); }
