// FlashAttention backward, Stage 2: sm_90a dQ with wgmma, TMA and warp
// specialisation; head dims 64 and 128 (padded as the forward). Same math,
// masking and summation order per query as Stage 1 (flash_bwd_dq_kernel.cuh),
// accumulated in registers over the key blocks a query block sees (no
// atomics: deterministic):
//   S = Q K^T;  P = exp2(S * scale * log2(e) - lse * log2(e))
//   dP = dO V^T;  dS = P * (dP - delta);  dQ += dS K;  then dQ * scale stored.
//
// CTA = 128 query rows of one (batch, query head), 384 threads, laid out as
// the forward (flash_fwd_sm90_kernel.cuh):
//   warpgroup 0, producer (setmaxnreg.dec to 24): one thread issues the TMA
//     copies: Q and dO once (qdo_full), then K and V tiles of 64 keys into a
//     ring of kStages buffers (full[s]: 1 arrival with expect_tx; empty[s]:
//     the 8 consumer warps).
//   warpgroups 1, 2, consumers (setmaxnreg.inc to 240): 64 query rows each,
//     their lse and delta in registers. Per tile: S = Q K^T and dP = dO V^T
//     (wgmma, both operands from shared memory, K-major, as S of the
//     forward), masking and P in fp32, dS in fp32 rounded to 16 bits as the
//     register A operand of dQ += dS K (B = K, MN-major: the transpose bit,
//     as V in the forward's O += P V). Then the buffer is released.
#pragma once

#include <cmath>

#include "common/wgmma.cuh"
#include "flash_attention/flash_attention.h"
#include "flash_attention/flash_sm90_tile.cuh"
#include "flash_attention/flash_tile.cuh"

namespace pyext {

template <int kD>
struct FlashBwdDqSm90Traits {
  static_assert(kD == 64 || kD == 128, "Stage 2 backward covers head dims 64 and 128");
  static constexpr int kBlockM = 128;  // query rows per CTA: two consumer warpgroups x 64
  static constexpr int kBlockN = 64;   // keys per K/V tile (wgmma N of S and dP)
  static constexpr int kStages = 2;
  static constexpr int kThreads = 384;
  static constexpr int kConsumerWarps = 8;
  static constexpr int kQBytes = kBlockM * kD * 2;     // one Q (or dO) block
  static constexpr int kTileBytes = kBlockN * kD * 2;  // one K (or V) tile
  // Q + dO + kStages x (K + V) + 1 KB to align to 1024. D 64: 16 + 16 + 2 x
  // 16 + 1 = 65 KB; D 128: 32 + 32 + 2 x 32 + 1 = 129 KB.
  static constexpr int kSmemBytes = 2 * kQBytes + 2 * kStages * kTileBytes + 1024;
  // Registers per consumer thread at D = 128: dQ 64 x 128 fp32 = 64; S (then
  // P) and dP (then dS), 64 x 64 fp32 = 2 x 32; dS as A operand 16; lse and
  // delta of 2 rows 4: 148 + addresses (D = 64: 116), under 240.
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
  static_assert(sm90_registers_fit<kThreads, kProducerRegs, kConsumerRegs>(), "setmaxnreg over the block's registers");
  static_assert(kSmemBytes + 2048 <= 227 * 1024, "shared memory over the sm_90 per-block limit");
  static dim3 grid(const FlashAttnParams& p) {
    return head_block_grid(p.batch, p.heads_q, (p.seq_q + kBlockM - 1) / kBlockM);
  }
};

template <typename T, int kD>
__global__ void __launch_bounds__(FlashBwdDqSm90Traits<kD>::kThreads, 1)
    flash_bwd_dq_sm90_kernel(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                             const __grid_constant__ CUtensorMap tm_v, const __grid_constant__ CUtensorMap tm_do,
                             const FlashAttnParams p) {
#if PYEXT_SM90A
  using Tr = FlashBwdDqSm90Traits<kD>;
  constexpr int kM = Tr::kBlockM, kN = Tr::kBlockN, kStages = Tr::kStages, kBox = kSm90BoxCols;
  __shared__ uint64_t bars[1 + 2 * kStages];  // see sm90_barriers_init; the stub below has none
  uint64_t* qdo_full = bars;
  uint64_t* full = bars + 1;
  uint64_t* empty = bars + 1 + kStages;
  T* sq = reinterpret_cast<T*>(dynamic_smem_1024());  // [kD / 64][kM][64]
  T* sdo = sq + kM * kD;                                     // [kD / 64][kM][64]
  T* sk = sdo + kM * kD;                                     // [kStages][kD / 64][kN][64]
  T* sv = sk + kStages * kN * kD;                            // [kStages][kD / 64][kN][64]

  const int tid = threadIdx.x, warpgroup = tid / 128;
  const int b = blockIdx.z, h = blockIdx.y, bh = b * p.heads_q + h;
  const int hk = h / (p.heads_q / p.heads_kv);
  const int m0 = (gridDim.x - 1 - blockIdx.x) * kM;  // a head's longest causal rows start first
  const int n_end = keys_end(p, m0, kM);
  const int n_blocks = (n_end + kN - 1) / kN;

  if (tid == 0) sm90_barriers_init<kStages>(bars, 1, Tr::kConsumerWarps);
  __syncthreads();

  if (warpgroup == 0) {
    // ---- producer ----
    setmaxnreg_dec<Tr::kProducerRegs>();
    if (tid == 0 && n_blocks > 0) {
      prefetch_tensor_map(&tm_q);
      prefetch_tensor_map(&tm_do);
      prefetch_tensor_map(&tm_k);
      prefetch_tensor_map(&tm_v);
      mbarrier_arrive_expect_tx(qdo_full, 2 * Tr::kQBytes);
      tma_load_tile<kD, kM>(sq, &tm_q, qdo_full, m0, h, b);
      tma_load_tile<kD, kM>(sdo, &tm_do, qdo_full, m0, h, b);
      produce_kv_ring<kD, kN, kStages>(sk, sv, &tm_k, &tm_v, full, empty, n_blocks, 0, hk, b);
    }
  } else {
    // ---- consumers ----
    setmaxnreg_inc<Tr::kConsumerRegs>();
    const int wg = warpgroup - 1, lane = tid % 32, warp = (tid % 128) / 32;
    const int m0w = m0 + wg * 64;                // this warpgroup's first row
    const int row = m0w + warp * 16 + lane / 4;  // this lane's rows: row, row + 8
    const int64_t row_base = int64_t(bh) * p.seq_q;

    // Descriptors (wgmma.cuh). Q, dO as A (K-major): this warpgroup's 64 rows
    // of each 128-row box, k step ks in box ks / 4 at byte 32 (ks % 4). K, V
    // as B of S, dP (K-major): the 64 rows of a box, same stepping. K as B of
    // dQ (MN-major): k step = 16 keys = 2048 bytes, the second 64 head-dim
    // columns (D = 128) one box (kN x 128 bytes) further: LBO.
    const uint64_t dq_a = smem_desc_sw128(sq + wg * 64 * kBox, 16, 1024);
    const uint64_t ddo_a = smem_desc_sw128(sdo + wg * 64 * kBox, 16, 1024);
    const uint64_t dk_k = smem_desc_sw128(sk, 16, 1024), dv_k = smem_desc_sw128(sv, 16, 1024);
    const uint64_t dk_mn = smem_desc_sw128(sk, kN * kBox * 2, 1024);
    constexpr uint64_t kQBox = kM * kBox * 2 >> 4, kTileBox = kN * kBox * 2 >> 4, kStage = kN * kD * 2 >> 4;
    constexpr uint64_t kRows16 = 16 * kBox * 2 >> 4;  // 16 keys of the MN-major K

    const float scale2 = p.scale * kLog2e;
    float lse2[2], delta[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const bool ok = row + 8 * r < p.seq_q;
      const float lse = ok ? p.lse[row_base + row + 8 * r] : -INFINITY;
      lse2[r] = lse == -INFINITY ? INFINITY : lse * kLog2e;  // a row with no key (or past Sq) gets P = 0
      delta[r] = ok ? p.delta[row_base + row + 8 * r] : 0.f;
    }
    float dq[kD / 8][4];
    zero(dq);
    float sacc[kN / 8][4];    // S, then P
    float dpacc[kN / 8][4];   // dP, then dS
    uint32_t dsa[kN / 16][4];  // dS rounded to T: the A operand of dS K
    if (n_blocks > 0) mbarrier_wait(qdo_full, 0);

    for (int nb = 0; nb < n_blocks; ++nb) {
      const int s = nb % kStages, n0 = nb * kN;
      mbarrier_wait(&full[s], (nb / kStages) & 1);
      // S = Q K^T and dP = dO V^T, two groups.
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kD / 16; ++ks) {
        const uint64_t a = kmajor_k_step(ks, kQBox), bk = s * kStage + kmajor_k_step(ks, kTileBox);
        Wgmma<T, kN>::template ss<0, 0>(sacc, dq_a + a, dk_k + bk, ks > 0);
      }
      wgmma_commit();
#pragma unroll
      for (int ks = 0; ks < kD / 16; ++ks) {
        const uint64_t a = kmajor_k_step(ks, kQBox), bk = s * kStage + kmajor_k_step(ks, kTileBox);
        Wgmma<T, kN>::template ss<0, 0>(dpacc, ddo_a + a, dv_k + bk, ks > 0);
      }
      wgmma_commit();
      wgmma_wait<1>();
      wgmma_fence_operand(sacc);
      // P with Stage 1's masking: keys past Sk, causal (rows past Sq: lse2 +inf).
      const bool edge = n0 + kN > p.seq_k || (p.causal && n0 + kN - 1 > m0w + p.causal_offset);
#pragma unroll
      for (int j = 0; j < kN / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float x = exp2f(sacc[j][e] * scale2 - lse2[e / 2]);
          if (edge) {
            const int col = n0 + 8 * j + 2 * (lane % 4) + e % 2, r = row + 8 * (e / 2);
            sacc[j][e] = col < p.seq_k && (!p.causal || col <= r + p.causal_offset) ? x : 0.f;
          } else {
            sacc[j][e] = x;
          }
        }
      }
      wgmma_wait<0>();
      wgmma_fence_operand(dpacc);
#pragma unroll
      for (int j = 0; j < kN / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) dpacc[j][e] = sacc[j][e] * (dpacc[j][e] - delta[e / 2]);
      }
      acc_to_a<T, kN>(dpacc, dsa);
      // dQ += dS K.
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kN / 16; ++ks) Wgmma<T, kD>::template rs<1>(dq, dsa[ks], dk_mn + s * kStage + ks * kRows16, 1);
      wgmma_commit();
      wgmma_wait<0>();
      wgmma_fence_operand(dq);
      wgmma_fence_operand(dsa);
      // This warp's reads of buffer s are done: one arrival per warp.
      __syncwarp();
      if (lane == 0) mbarrier_arrive(&empty[s]);
    }

    const float scale[2] = {p.scale, p.scale};
    store_acc<T, kD / 8>(static_cast<T*>(p.dq) + row_base * p.head_dim, dq, row, p.seq_q, 0, p.head_dim, scale, lane);
  }
#else
  // Built for an arch without sm_90a features: never launched (the host
  // checks for the static shared memory above first).
  __trap();
#endif
}

}  // namespace pyext
