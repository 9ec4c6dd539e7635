// FlashAttention kernels: plain parameters in, no torch types (see
// flash_attention_api.cpp, which checks the inputs before any launch).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace pyext {

// q (B, Hq, Sq, D) and k, v (B, Hkv, Sk, D): strides in elements, unit last
// stride, base pointers 16-byte aligned and strides multiples of 8 elements
// (for 16-byte cp.async). out, dout, dq (B, Hq, Sq, D), dk, dv (B, Hkv, Sk, D)
// and lse, delta (B, Hq, Sq) are contiguous.
struct FlashAttnParams {
  const void* q;
  const void* k;
  const void* v;
  int64_t q_batch_stride, q_head_stride, q_row_stride;
  int64_t k_batch_stride, k_head_stride, k_row_stride;
  int64_t v_batch_stride, v_head_stride, v_row_stride;
  void* out;          // forward output; backward input
  // Where set (calls at twice the default scale or more; the API's
  // stores_out_lo), also out's size and dtype, contiguous: the forward writes
  // what rounding out to T left out, the backward's delta reads out + out_lo.
  void* out_lo;
  float* lse;         // forward output (natural log); backward input
  const void* dout;   // backward only
  float* delta;       // backward scratch: rowsum(dout * (out + out_lo)), fp32
  void* dq;
  void* dk;
  void* dv;
  // Backward scratch of the non-deterministic backward: dQ summed in fp32
  // (B, Hq, Sq, D) by the dK/dV kernel's atomic adds; null for the
  // deterministic one (a dQ kernel of its own).
  float* dq_accum;
  int batch, heads_q, heads_kv, seq_q, seq_k, head_dim;
  float scale;
  bool causal;
  int causal_offset;  // key j visible to query i iff j <= i + causal_offset; clamped to [-Sq, Sk]
};

// Head dims are compiled for multiples of 32; a head dim that is a multiple of
// 8 runs on the next one up, with zero-filled loads and masked stores.
constexpr int kFlashHeadDims[] = {32, 64, 96, 128, 160, 192, 224, 256};
inline int flash_padded_head_dim(int d) { return (d + 31) / 32 * 32; }

// T is __half or __nv_bfloat16; kD one of kFlashHeadDims. Instantiated in
// flash_fwd_hdim*.cu and flash_bwd_hdim*.cu. flash_fwd and flash_bwd return
// false, having launched nothing, when the device has less shared memory per
// block than the kernels for kD need (the larger head dims on sm_86/sm_89).
template <typename T, int kD> bool flash_fwd(const FlashAttnParams& p, cudaStream_t stream);
// Stage 2 forward for sm_90a (wgmma, TMA, warp specialisation), kD 64 or 128
// (head dims that pad to them); instantiated in flash_fwd_sm90_hdim*.cu.
// Returns false, having launched nothing, where it cannot run: the extension
// was built without sm_90a code, the driver refuses a TMA tensor map for
// these strides (cuTensorMapEncodeTiled) or the dynamic shared memory size;
// the caller then runs flash_fwd.
template <typename T, int kD> bool flash_fwd_sm90(const FlashAttnParams& p, cudaStream_t stream);
// dq, dk, dv from dout, q, k, v, lse and the delta that flash_bwd_delta wrote:
// dk, dv, then dq in a kernel of its own, or, when p.dq_accum is set, dq added
// up in p.dq_accum by the dK/dV kernel, then rounded into dq.
template <typename T, int kD> bool flash_bwd(const FlashAttnParams& p, cudaStream_t stream);
// Stage 2 backward for sm_90a (wgmma, TMA, warp specialisation), kD 64 or
// 128 (flash_bwd_sm90_hdim*.cu): dk, dv, then dq in a kernel of its own, or,
// when p.dq_accum is set, dq added up in p.dq_accum by the dK/dV kernel and
// then rounded into dq (fewer products; dq's last bits vary run to run). Returns false,
// having launched nothing, where either of its two kernels cannot run (as
// flash_fwd_sm90: no sm_90a code, a tensor map or the shared memory refused);
// the caller then runs flash_bwd.
template <typename T, int kD> bool flash_bwd_sm90(const FlashAttnParams& p, cudaStream_t stream);
// delta = rowsum(dout * (out + out_lo)) in fp32 (out alone where p.out_lo is
// null); instantiated in flash_bwd_delta.cu.
template <typename T> void flash_bwd_delta(const FlashAttnParams& p, cudaStream_t stream);

}  // namespace pyext
