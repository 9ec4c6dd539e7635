// The torch-facing side of FlashAttention: checks, device guard, stream,
// dispatch on dtype and head dim, launch. Semantics are those of the Triton
// kernels (triton_kernels/flash_attention.py).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>

#include "common/torch_types.h"
#include "flash_attention/flash_attention.h"

namespace pyext {
namespace {

void check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (const auto& [t, name] : {std::pair{&q, "q"}, std::pair{&k, "k"}, std::pair{&v, "v"}}) {
    TORCH_CHECK(t->is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t->device());
    TORCH_CHECK(t->dim() == 4, op, ": ", name, " must be 4-D (B, H, S, D), got ", t->dim(), "-D");
  }
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              op, ": q must be float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              op, ": q, k and v must have the same dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(k.device() == q.device() && v.device() == q.device(), op,
              ": q, k and v must be on the same device, got ", q.device(), ", ", k.device(), ", ", v.device());
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have the same shape, got ", k.sizes(), " and ",
              v.sizes());
  const int64_t d = q.size(3);
  TORCH_CHECK(d > 0 && d % 8 == 0 && d <= 256, op, ": head dim must be a multiple of 8 up to 256, got ", d);
  TORCH_CHECK(k.size(3) == d, op, ": q and k/v head dims differ: ", d, " and ", k.size(3));
  TORCH_CHECK(k.size(0) == q.size(0), op, ": q and k/v batch sizes differ: ", q.size(0), " and ", k.size(0));
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op, ": query heads (", q.size(1),
              ") must be a multiple of key/value heads (", k.size(1), ")");
  TORCH_CHECK(q.size(2) < std::numeric_limits<int>::max() && k.size(2) < std::numeric_limits<int>::max(),
              op, ": sequence lengths must fit in int32");
  // The grids are (blocks along the sequence, heads, batch) (flash_tile.cuh,
  // head_block_grid), as the Triton kernels' are.
  TORCH_CHECK(q.size(0) <= 65535 && q.size(1) <= 65535, op, ": batch ", q.size(0), " or heads ", q.size(1),
              " past 65535, the CUDA kernels' grid limit");
}

// The kernels read rows of 16-byte chunks (cp.async): a tensor with a
// non-unit last stride (copied by the Triton path too) or an unaligned base or
// outer stride (an odd view) is copied once; ordinary layouts, (B, S, H, D)
// views included, pass as they are.
at::Tensor aligned_for_copies(const at::Tensor& t) {
  const bool ok = t.stride(3) == 1 && reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 &&
                  t.stride(0) % 8 == 0 && t.stride(1) % 8 == 0 && t.stride(2) % 8 == 0;
  return ok ? t : t.clone(at::MemoryFormat::Contiguous);
}

FlashAttnParams make_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double scale, bool causal,
                            int64_t causal_offset) {
  FlashAttnParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_batch_stride = q.stride(0), p.q_head_stride = q.stride(1), p.q_row_stride = q.stride(2);
  p.k_batch_stride = k.stride(0), p.k_head_stride = k.stride(1), p.k_row_stride = k.stride(2);
  p.v_batch_stride = v.stride(0), p.v_head_stride = v.stride(1), p.v_row_stride = v.stride(2);
  p.batch = static_cast<int>(q.size(0));
  p.heads_q = static_cast<int>(q.size(1));
  p.heads_kv = static_cast<int>(k.size(1));
  p.seq_q = static_cast<int>(q.size(2));
  p.seq_k = static_cast<int>(k.size(2));
  p.head_dim = static_cast<int>(q.size(3));
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  // Offsets beyond [-Sq, Sk] mask the same as the bound: clamped, it fits int32.
  p.causal_offset = static_cast<int>(std::clamp<int64_t>(causal_offset, -int64_t(p.seq_q), p.seq_k));
  return p;
}

void check_shared_memory(const char* op, bool launched, int head_dim, int device) {
  if (launched) return;
  int limit = 0;
  cudaDeviceGetAttribute(&limit, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  TORCH_CHECK(false, op, ": head dim ", head_dim, " needs more shared memory per block than this GPU allows (",
              limit, " bytes); backend='triton' runs it");
}

// Stage 2 (sm_90a: wgmma, TMA, warp specialisation), forward and backward,
// runs on devices of compute capability 9.x for head dims that pad to 64 or
// 128, unless the environment says PYEXT_FLASH_SM90=0 (read on every call, so
// a test or a benchmark can compare both stages in one process). Everything
// else, and any case flash_fwd_sm90 / flash_bwd_sm90 turns down (no
// sm_90a code in this build, a layout the TMA driver refuses, the shared
// memory opt-in refused), runs Stage 1.
bool sm90_wanted(int device) {
  const char* env = std::getenv("PYEXT_FLASH_SM90");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  int major = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return major == 9;
}

// Whether the forward stores out_lo beside out (FlashAttnParams::out_lo): at
// a softmax scale twice the default 1/sqrt(D) or more, where rows of P can be
// nearly one-hot on any data and D = rowsum(dO * O) from the rounded out costs
// dq and dk the rule. The Triton launcher's rule for plain attention
// (triton_kernels/flash_attention/forward.py, peaky_scale), in the same double
// arithmetic; tests/test_attention.py checks both backends follow it.
bool stores_out_lo(double scale, int64_t head_dim) { return scale * std::sqrt(double(head_dim)) >= 2.0; }

// Each launch_* returns false, having launched nothing, when this GPU has too
// little shared memory per block for the head dim's kernels.
template <typename T>
bool launch_fwd(const FlashAttnParams& p, cudaStream_t s, bool sm90) {
  const int padded = flash_padded_head_dim(p.head_dim);
  if (sm90 && padded == 64 && flash_fwd_sm90<T, 64>(p, s)) return true;
  if (sm90 && padded == 128 && flash_fwd_sm90<T, 128>(p, s)) return true;
  switch (padded) {
    case 32: return flash_fwd<T, 32>(p, s);
    case 64: return flash_fwd<T, 64>(p, s);
    case 96: return flash_fwd<T, 96>(p, s);
    case 128: return flash_fwd<T, 128>(p, s);
    case 160: return flash_fwd<T, 160>(p, s);
    case 192: return flash_fwd<T, 192>(p, s);
    case 224: return flash_fwd<T, 224>(p, s);
    default: return flash_fwd<T, 256>(p, s);
  }
}

// (out, lse, out_lo): out_lo out-sized where stores_out_lo, else empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_fwd_cuda(const at::Tensor& q_in, const at::Tensor& k_in,
                                                                   const at::Tensor& v_in, double scale, bool causal,
                                                                   int64_t causal_offset) {
  check_qkv("flash_attn_fwd_cuda", q_in, k_in, v_in);
  const c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor out = at::empty(q_in.sizes(), q_in.options());
  at::Tensor lse = at::empty({q_in.size(0), q_in.size(1), q_in.size(2)}, q_in.options().dtype(at::kFloat));
  const bool low_part = stores_out_lo(scale, q_in.size(3));
  at::Tensor out_lo = low_part ? at::empty(q_in.sizes(), q_in.options()) : at::empty({0}, q_in.options());
  if (out.numel() == 0) return {out, lse, out_lo};
  if (k_in.size(2) == 0) return {out.zero_(), lse.fill_(-std::numeric_limits<float>::infinity()), out_lo.zero_()};
  const at::Tensor q = aligned_for_copies(q_in), k = aligned_for_copies(k_in), v = aligned_for_copies(v_in);
  FlashAttnParams p = make_params(q, k, v, scale, causal, causal_offset);
  p.out = out.data_ptr();
  p.out_lo = low_part ? out_lo.data_ptr() : nullptr;
  p.lse = lse.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool sm90 = sm90_wanted(q.get_device());
  bool launched = false;
  AT_DISPATCH_SWITCH(q.scalar_type(), "flash_attn_fwd_cuda",
                     AT_DISPATCH_CASE(at::kHalf, [&] { launched = launch_fwd<cuda_t<scalar_t>>(p, stream, sm90); })
                     AT_DISPATCH_CASE(at::kBFloat16,
                                      [&] { launched = launch_fwd<cuda_t<scalar_t>>(p, stream, sm90); }));
  check_shared_memory("flash_attn_fwd_cuda", launched, p.head_dim, q.get_device());
  check_launch("flash_attn_fwd_cuda");
  return {out, lse, out_lo};
}

template <typename T>
bool launch_bwd(const FlashAttnParams& p, cudaStream_t s, bool sm90) {
  const int padded = flash_padded_head_dim(p.head_dim);
  if (sm90 && padded == 64 && flash_bwd_sm90<T, 64>(p, s)) return true;
  if (sm90 && padded == 128 && flash_bwd_sm90<T, 128>(p, s)) return true;
  switch (padded) {
    case 32: return flash_bwd<T, 32>(p, s);
    case 64: return flash_bwd<T, 64>(p, s);
    case 96: return flash_bwd<T, 96>(p, s);
    case 128: return flash_bwd<T, 128>(p, s);
    case 160: return flash_bwd<T, 160>(p, s);
    case 192: return flash_bwd<T, 192>(p, s);
    case 224: return flash_bwd<T, 224>(p, s);
    default: return flash_bwd<T, 256>(p, s);
  }
}

// out, out_lo and dout are read as contiguous (B, Hq, Sq, D) rows, lse as (B, Hq, Sq).
at::Tensor contiguous_like(const char* op, const at::Tensor& t, const at::Tensor& q, const char* name,
                           at::IntArrayRef sizes, at::ScalarType dtype) {
  TORCH_CHECK(t.device() == q.device(), op, ": ", name, " is on ", t.device(), " but q is on ", q.device());
  TORCH_CHECK(t.sizes() == sizes, op, ": ", name, " must have shape ", sizes, ", got ", t.sizes());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  const at::Tensor c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 ? c : c.clone();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> flash_attn_bwd_cuda(
    const at::Tensor& dout_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& out_lo_in, const at::Tensor& lse_in, double scale, bool causal,
    int64_t causal_offset, bool deterministic) {
  constexpr const char* op = "flash_attn_bwd_cuda";
  check_qkv(op, q_in, k_in, v_in);
  const at::Tensor dout = contiguous_like(op, dout_in, q_in, "dout", q_in.sizes(), q_in.scalar_type());
  const at::Tensor out = contiguous_like(op, out_in, q_in, "out", q_in.sizes(), q_in.scalar_type());
  // out_lo: the forward's, out-sized where it stored one, else empty (D from out alone)
  const at::Tensor out_lo = out_lo_in.numel() == 0 ? out_lo_in
                            : contiguous_like(op, out_lo_in, q_in, "out_lo", q_in.sizes(), q_in.scalar_type());
  const at::Tensor lse = contiguous_like(op, lse_in, q_in, "lse", q_in.sizes().slice(0, 3), at::kFloat);
  const c10::cuda::CUDAGuard guard(q_in.device());
  at::Tensor dq = at::empty(q_in.sizes(), q_in.options());
  at::Tensor dk = at::empty(k_in.sizes(), k_in.options());
  at::Tensor dv = at::empty(v_in.sizes(), v_in.options());
  if (q_in.numel() == 0 || k_in.numel() == 0) return {dq.zero_(), dk.zero_(), dv.zero_()};
  const at::Tensor q = aligned_for_copies(q_in), k = aligned_for_copies(k_in), v = aligned_for_copies(v_in);
  at::Tensor delta = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  FlashAttnParams p = make_params(q, k, v, scale, causal, causal_offset);
  p.out = const_cast<void*>(out.data_ptr());
  p.out_lo = out_lo.numel() == 0 ? nullptr : const_cast<void*>(out_lo.data_ptr());
  p.lse = const_cast<float*>(lse.data_ptr<float>());
  p.dout = dout.data_ptr();
  p.delta = delta.data_ptr<float>();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool sm90 = sm90_wanted(q.get_device());
  // The non-deterministic backward adds dQ up in fp32 (2x dq's bytes, freed
  // on return) with atomics, in place of the dQ kernel.
  at::Tensor dq_accum;
  if (!deterministic) {
    dq_accum = at::empty(q_in.sizes(), q_in.options().dtype(at::kFloat));
    p.dq_accum = dq_accum.data_ptr<float>();
  }
  bool launched = false;
  AT_DISPATCH_SWITCH(q.scalar_type(), op, AT_DISPATCH_CASE(at::kHalf, [&] {
                       flash_bwd_delta<cuda_t<scalar_t>>(p, stream);
                       launched = launch_bwd<cuda_t<scalar_t>>(p, stream, sm90);
                     }) AT_DISPATCH_CASE(at::kBFloat16, [&] {
                       flash_bwd_delta<cuda_t<scalar_t>>(p, stream);
                       launched = launch_bwd<cuda_t<scalar_t>>(p, stream, sm90);
                     }));
  check_shared_memory(op, launched, p.head_dim, q.get_device());
  check_launch(op);
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(pyext, m) {
  m.def("flash_attn_fwd_cuda(Tensor q, Tensor k, Tensor v, float scale, bool causal, int causal_offset) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("flash_attn_bwd_cuda(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor out_lo, Tensor lse, "
        "float scale, bool causal, int causal_offset, bool deterministic) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(pyext, CUDA, m) {
  m.impl("flash_attn_fwd_cuda", &flash_attn_fwd_cuda);
  m.impl("flash_attn_bwd_cuda", &flash_attn_bwd_cuda);
}

}  // namespace pyext
