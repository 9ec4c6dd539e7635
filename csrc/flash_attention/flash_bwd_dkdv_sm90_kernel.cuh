// FlashAttention backward, Stage 2: sm_90a (Hopper) dK and dV with wgmma, TMA
// and warp specialisation; head dims 64 and 128 (a head dim that pads to one
// of them, TMA zero-filling the columns past d). Same math, masking and
// summation order per key as Stage 1 (flash_bwd_dkdv_kernel.cuh): with P
// recomputed from the forward's lse and delta = rowsum(dO * O) per query
// (flash_bwd_delta.cu), for one key block of one (batch, key head), summed
// over the query heads of its GQA group and their query blocks, in a fixed
// order (no atomics: bitwise deterministic):
//   S^T = K Q^T;  P^T = exp2(S^T * scale * log2(e) - lse * log2(e))
//   dV += P^T dO;  dP^T = V dO^T;  dS^T = P^T * (dP^T - delta);  dK += dS^T Q
//   then dK * scale and dV are stored. dQ: flash_bwd_dq_sm90_kernel.cuh, or,
//   with kAccumulateDq, here (below): the non-deterministic backward.
//
// CTA = 128 keys of one (batch, key head), 384 threads:
//   warpgroup 0, producer (setmaxnreg.dec to 24): thread 0 issues the TMA
//     copies: K and V once (kv_full), then per step the Q and dO tiles of 64
//     query rows into a ring of kStages buffers; warp 1 writes that step's
//     lse * log2(e) (+inf for a row past Sq or one that saw no key) and delta
//     into the same ring slot with plain stores. full[s]: 1 arrival with
//     expect_tx (thread 0) + 32 (warp 1's lanes); empty[s]: 8 consumer warps.
//   warpgroups 1, 2, consumers (setmaxnreg.inc to 240): each owns 64 keys.
//     Per step: S^T and dP^T (wgmma, A = K or V and B = Q or dO from shared
//     memory, all K-major, as S = Q K^T of the forward), masking and P^T in
//     fp32, P^T rounded to 16 bits as the register A operand of dV += P^T dO
//     (B = dO, MN-major: the transpose bit, as V in the forward's O += P V),
//     dS^T in fp32 then rounded as the A operand of dK += dS^T Q (B = Q,
//     MN-major). Then the ring slot is released.
//   kAccumulateDq (FlashAttention-2/3's dQ, one kernel instead of two): each
//     consumer warpgroup also stores its dS^T (64 keys x 64 queries, 16-bit)
//     into a shared buffer of the step's 128 keys; after a named barrier
//     over both, warpgroup w computes dQ[:, w kD/2 .. (w + 1) kD/2) = dS K
//     over all 128 keys (wgmma: A = the buffer read transposed, MN-major; B
//     = K, MN-major, as V in the forward) and adds it, times scale, to
//     p.dq_accum (fp32) with atomic adds (red_add_acc). Work per step: 5
//     products of 128 x 64 x D instead of this kernel's 4 and the dQ
//     kernel's 3 (which recomputes S and dP); the blocks' adds land in any
//     order, so dQ's last bits vary run to run. Two dS^T buffers: a
//     warpgroup writes step i + 1's while the other may still read step
//     i's, and it cannot be two steps ahead (it passed step i's barrier).
// Operand majorness: the transpose bits exist for 16-bit types only (PTX ISA,
// wgmma.mma_async imm-trans-b), which is all this file instantiates.
#pragma once

#include <cmath>

#include "common/named_barrier.cuh"
#include "common/wgmma.cuh"
#include "flash_attention/flash_attention.h"
#include "flash_attention/flash_sm90_tile.cuh"
#include "flash_attention/flash_tile.cuh"

namespace pyext {

template <int kD, bool kAccumulateDq = false>
struct FlashBwdDkDvSm90Traits {
  static_assert(kD == 64 || kD == 128, "Stage 2 backward covers head dims 64 and 128");
  static constexpr int kBlockN = 128;  // keys per CTA: two consumer warpgroups x 64
  static constexpr int kBlockM = 64;   // query rows per step (wgmma N of S^T and dP^T)
  static constexpr int kStages = 2;    // Q/dO ring: step i + 1 loads while step i computes
  static constexpr int kThreads = 384;
  static constexpr int kConsumerWarps = 8;
  static constexpr int kKVBytes = kBlockN * kD * 2;  // one K (or V) tile
  static constexpr int kStepBytes = kBlockM * kD * 2;  // one Q (or dO) tile
  static constexpr int kDsBytes = kAccumulateDq ? kBlockN * kBlockM * 2 : 0;  // one dS^T buffer: 16 KB
  // K + V + kStages x (Q + dO) [+ 2 dS^T buffers] + 1 KB to align the base
  // to 1024 (128-byte swizzle atoms). D 64: 16 + 16 + 2 x 16 [+ 32] + 1 = 65
  // [97] KB; D 128: 32 + 32 + 2 x 32 [+ 32] + 1 = 129 [161] KB; lse, delta
  // (1 KB) and the barriers are static.
  static constexpr int kSmemBytes = 2 * kKVBytes + 2 * kStages * kStepBytes + 2 * kDsBytes + 1024;
  // Registers per consumer thread at D = 128: dK and dV accumulators 64 x 128
  // fp32 per warpgroup = 2 x 64; S^T (then P^T) and dP^T (then dS^T), 64 x 64
  // fp32 = 2 x 32; the 16-bit A operand of 64 keys x 64 queries = 16: 208 +
  // addresses, under 240 (D = 64: 144). kAccumulateDq adds dQ's 64 x kD / 2
  // fp32 per warpgroup (32 at D = 128), live once S^T and dP^T are dead: the
  // peak stays 208. 384 x 168 = 64512 = 128 x 24 + 256 x 240, as in the
  // forward.
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
  static_assert(sm90_registers_fit<kThreads, kProducerRegs, kConsumerRegs>(), "setmaxnreg over the block's registers");
  static_assert(kSmemBytes + 2048 <= 227 * 1024, "shared memory over the sm_90 per-block limit");
  static dim3 grid(const FlashAttnParams& p) {
    return head_block_grid(p.batch, p.heads_kv, (p.seq_k + kBlockN - 1) / kBlockN);
  }
};

template <typename T, int kD, bool kAccumulateDq>
__global__ void __launch_bounds__(FlashBwdDkDvSm90Traits<kD>::kThreads, 1)
    flash_bwd_dkdv_sm90_kernel(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                               const __grid_constant__ CUtensorMap tm_v, const __grid_constant__ CUtensorMap tm_do,
                               const FlashAttnParams p) {
#if PYEXT_SM90A
  using Tr = FlashBwdDkDvSm90Traits<kD, kAccumulateDq>;
  constexpr int kM = Tr::kBlockM, kN = Tr::kBlockN, kStages = Tr::kStages, kBox = kSm90BoxCols;
  __shared__ uint64_t bars[1 + 2 * kStages];  // see sm90_barriers_init; the stub below has none
  __shared__ float s_lse[kStages][kM];  // lse * log2(e) of the step's rows, +inf: no contribution
  __shared__ float s_delta[kStages][kM];
  uint64_t* kv_full = bars;
  uint64_t* full = bars + 1;
  uint64_t* empty = bars + 1 + kStages;
  T* sk = reinterpret_cast<T*>(dynamic_smem_1024());  // [kD / 64][kN][64]
  T* sv = sk + kN * kD;                                      // [kD / 64][kN][64]
  T* sq = sv + kN * kD;                                      // [kStages][kD / 64][kM][64]
  T* sdo = sq + kStages * kM * kD;                           // [kStages][kD / 64][kM][64]
  T* sds = sdo + kStages * kM * kD;                          // kAccumulateDq: [2][kN][kM], dS^T

  const int tid = threadIdx.x, warpgroup = tid / 128;
  const int b = blockIdx.z, hk = blockIdx.y, bhk = b * p.heads_kv + hk;
  const int group = p.heads_q / p.heads_kv;
  const int n0 = blockIdx.x * kN;  // causal: a head's first keys, seen by the most queries, start first
  // The steps: queries before n0 - causal_offset see none of these keys (as
  // Stage 1); step i is query head hk * group + i / m_blocks, block
  // dkdv_step_block(i, m_blocks). Computed by each role after its
  // setmaxnreg: ptxas spills values that live across it.
  auto schedule = [&](int& m_lo, int& m_blocks) {
    m_lo = queries_begin(p, n0, kM);
    m_blocks = m_lo < p.seq_q ? (p.seq_q - m_lo + kM - 1) / kM : 0;
    return group * m_blocks;
  };

  if (tid == 0) sm90_barriers_init<kStages>(bars, 1 + 32, Tr::kConsumerWarps);  // TMA issuer + warp 1's lanes
  __syncthreads();

  if (warpgroup == 0) {
    // ---- producer ----
    setmaxnreg_dec<Tr::kProducerRegs>();
    const int warp = tid / 32, lane = tid % 32;
    int m_lo, m_blocks;
    const int steps = schedule(m_lo, m_blocks);
    if (tid == 0 && steps > 0) {
      prefetch_tensor_map(&tm_q);
      prefetch_tensor_map(&tm_k);
      prefetch_tensor_map(&tm_v);
      prefetch_tensor_map(&tm_do);
      mbarrier_arrive_expect_tx(kv_full, 2 * Tr::kKVBytes);
      tma_load_tile<kD, kN>(sk, &tm_k, kv_full, n0, hk, b);
      tma_load_tile<kD, kN>(sv, &tm_v, kv_full, n0, hk, b);
      for (int i = 0; i < steps; ++i) {
        const int s = i % kStages, h = hk * group + i / m_blocks;
        const int m0 = m_lo + dkdv_step_block(i, m_blocks) * kM;
        // Slot s last held step i - kStages: its release is the
        // (i / kStages - 1)-th completion of empty[s].
        if (i >= kStages) mbarrier_wait(&empty[s], (i / kStages - 1) & 1);
        mbarrier_arrive_expect_tx(&full[s], 2 * Tr::kStepBytes);
        tma_load_tile<kD, kM>(sq + s * kM * kD, &tm_q, &full[s], m0, h, b);
        tma_load_tile<kD, kM>(sdo + s * kM * kD, &tm_do, &full[s], m0, h, b);
      }
    } else if (warp == 1) {
      // lse and delta rows of each step, two per lane; the arrival (release)
      // publishes this lane's stores to the consumers' wait (acquire).
      for (int i = 0; i < steps; ++i) {
        const int s = i % kStages, h = hk * group + i / m_blocks;
        const int m0 = m_lo + dkdv_step_block(i, m_blocks) * kM;
        const int64_t row0 = (int64_t(b) * p.heads_q + h) * p.seq_q + m0;
        if (i >= kStages) mbarrier_wait(&empty[s], (i / kStages - 1) & 1);
#pragma unroll
        for (int r = lane; r < kM; r += 32) {
          const bool ok = m0 + r < p.seq_q;
          const float lse = ok ? p.lse[row0 + r] : -INFINITY;
          s_lse[s][r] = lse == -INFINITY ? INFINITY : lse * kLog2e;
          s_delta[s][r] = ok ? p.delta[row0 + r] : 0.f;
        }
        mbarrier_arrive(&full[s]);
      }
    }
  } else {
    // ---- consumers ----
    setmaxnreg_inc<Tr::kConsumerRegs>();
    int m_lo, m_blocks;
    const int steps = schedule(m_lo, m_blocks);
    const int wg = warpgroup - 1, lane = tid % 32, warp = (tid % 128) / 32;
    const int n0w = n0 + wg * 64;                // this warpgroup's first key
    const int key = n0w + warp * 16 + lane / 4;  // this lane's keys: key, key + 8

    // Descriptors (wgmma.cuh). K, V as A (K-major): this warpgroup's 64 rows
    // of each 128-row box, k step ks in box ks / 4 at byte 32 (ks % 4) of the
    // row. Q, dO as B of S^T, dP^T (K-major): the 64 rows of a box, same k
    // stepping. Q, dO as B of dK, dV (MN-major): k step = 16 queries = 2048
    // bytes, the second 64 head-dim columns (D = 128) one box (kM x 128
    // bytes) further: LBO.
    const uint64_t dk_a = smem_desc_sw128(sk + wg * 64 * kBox, 16, 1024);
    const uint64_t dv_a = smem_desc_sw128(sv + wg * 64 * kBox, 16, 1024);
    const uint64_t dq_k = smem_desc_sw128(sq, 16, 1024), ddo_k = smem_desc_sw128(sdo, 16, 1024);
    const uint64_t dq_mn = smem_desc_sw128(sq, kM * kBox * 2, 1024), ddo_mn = smem_desc_sw128(sdo, kM * kBox * 2, 1024);
    constexpr uint64_t kKVBox = kN * kBox * 2 >> 4, kStepBox = kM * kBox * 2 >> 4, kStage = kM * kD * 2 >> 4;
    constexpr uint64_t kRows16 = 16 * kBox * 2 >> 4;  // 16 rows (k) of an MN-major operand
    // kAccumulateDq: dS (A of dQ = dS K) is the dS^T buffer read MN-major,
    // k step = 16 keys = 16 rows; its 64 queries are one 128-byte row (LBO
    // unused). K as B (MN-major, as V in the forward): this warpgroup's kD /
    // 2 columns, box w at D = 128, byte 64 w of the one box at D = 64.
    constexpr int kDqCols = kD / 2;
    const uint64_t dds_mn = smem_desc_sw128(sds, Tr::kDsBytes, 1024);
    const uint64_t dk_mn = smem_desc_sw128(sk + (wg * kDqCols / kBox) * kN * kBox + wg * kDqCols % kBox,
                                           kN * kBox * 2, 1024);
    constexpr uint64_t kDsBuffer = Tr::kDsBytes >> 4;

    const float scale2 = p.scale * kLog2e;
    float dk[kD / 8][4], dv[kD / 8][4];
    zero(dk);
    zero(dv);
    float st[kM / 8][4];   // S^T, then P^T in fp32 (rows keys, columns queries)
    float dpt[kM / 8][4];  // dP^T, then dS^T
    uint32_t pa[kM / 16][4];  // P^T, then dS^T, rounded to T: the A operand
    float dq_part[kDqCols / 8][4];  // kAccumulateDq: this warpgroup's columns of the step's dQ
    if (steps > 0) mbarrier_wait(kv_full, 0);

    for (int i = 0; i < steps; ++i) {
      const int s = i % kStages, h = hk * group + i / m_blocks;
      const int m0 = m_lo + dkdv_step_block(i, m_blocks) * kM;
      mbarrier_wait(&full[s], (i / kStages) & 1);
      // S^T = K Q^T and dP^T = V dO^T, two groups.
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kD / 16; ++ks) {
        const uint64_t a = kmajor_k_step(ks, kKVBox), bk = s * kStage + kmajor_k_step(ks, kStepBox);
        Wgmma<T, kM>::template ss<0, 0>(st, dk_a + a, dq_k + bk, ks > 0);
      }
      wgmma_commit();
#pragma unroll
      for (int ks = 0; ks < kD / 16; ++ks) {
        const uint64_t a = kmajor_k_step(ks, kKVBox), bk = s * kStage + kmajor_k_step(ks, kStepBox);
        Wgmma<T, kM>::template ss<0, 0>(dpt, dv_a + a, ddo_k + bk, ks > 0);
      }
      wgmma_commit();
      wgmma_wait<1>();
      wgmma_fence_operand(st);
      // P^T with Stage 1's masking: keys past Sk, queries past Sq, causal.
      const bool edge = n0w + 64 > p.seq_k || m0 + kM > p.seq_q || (p.causal && n0w + 63 > m0 + p.causal_offset);
#pragma unroll
      for (int j = 0; j < kM / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int qc = 8 * j + 2 * (lane % 4) + e % 2;
          const float x = exp2f(st[j][e] * scale2 - s_lse[s][qc]);
          if (edge) {
            const int qi = m0 + qc, kj = key + 8 * (e / 2);
            const bool visible = qi < p.seq_q && kj < p.seq_k && (!p.causal || kj <= qi + p.causal_offset);
            st[j][e] = visible ? x : 0.f;
          } else {
            st[j][e] = x;
          }
        }
      }
      acc_to_a<T, kM>(st, pa);
      // dV += P^T dO, a third group.
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kM / 16; ++ks) Wgmma<T, kD>::template rs<1>(dv, pa[ks], ddo_mn + s * kStage + ks * kRows16, 1);
      wgmma_commit();
      wgmma_wait<1>();  // groups complete in order: dP^T is done, dV may run on
      wgmma_fence_operand(dpt);
#pragma unroll
      for (int j = 0; j < kM / 8; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) dpt[j][e] = st[j][e] * (dpt[j][e] - s_delta[s][8 * j + 2 * (lane % 4) + e % 2]);
      }
      wgmma_wait<0>();
      wgmma_fence_operand(dv);
      wgmma_fence_operand(pa);
      acc_to_a<T, kM>(dpt, pa);
      if constexpr (kAccumulateDq) {
        // This warpgroup's 64 rows of the step's dS^T, ordered before the
        // wgmma that reads them (async proxy).
        store_a_sw128(smem_u32(sds + (i % 2) * kN * kM + wg * 64 * kM), pa, warp, lane);
        fence_proxy_async();
      }
      // dK += dS^T Q. (The fence also orders the last step's reads of dq_part.)
      wgmma_fence();
#pragma unroll
      for (int ks = 0; ks < kM / 16; ++ks) Wgmma<T, kD>::template rs<1>(dk, pa[ks], dq_mn + s * kStage + ks * kRows16, 1);
      wgmma_commit();
      if constexpr (kAccumulateDq) {
        // dQ = dS K once both warpgroups' dS^T are in (named barrier 1).
        named_barrier_sync(1, 2 * 128);
        const uint64_t ds = dds_mn + (i % 2) * kDsBuffer;
#pragma unroll
        for (int ks = 0; ks < kN / 16; ++ks)
          Wgmma<T, kDqCols>::template ss<1, 1>(dq_part, ds + ks * kRows16, dk_mn + ks * kRows16, ks > 0);
        wgmma_commit();
        wgmma_wait<1>();  // dK done (groups complete in order): slot s may go
      } else {
        wgmma_wait<0>();
      }
      wgmma_fence_operand(dk);
      wgmma_fence_operand(pa);
      // This warp's reads of slot s are done: one arrival per warp.
      __syncwarp();
      if (lane == 0) mbarrier_arrive(&empty[s]);
      if constexpr (kAccumulateDq) {
        wgmma_wait<0>();
        wgmma_fence_operand(dq_part);
        float* dq_rows = p.dq_accum + ((int64_t(b) * p.heads_q + h) * p.seq_q + m0) * p.head_dim;
        red_add_acc<kDqCols / 8>(dq_rows, dq_part, warp * 16 + lane / 4, p.seq_q - m0, wg * kDqCols, p.head_dim,
                                 p.scale, lane);
      }
    }

    const int64_t row_base = int64_t(bhk) * p.seq_k;
    const float one[2] = {1.f, 1.f}, scale[2] = {p.scale, p.scale};
    store_acc<T, kD / 8>(static_cast<T*>(p.dv) + row_base * p.head_dim, dv, key, p.seq_k, 0, p.head_dim, one, lane);
    store_acc<T, kD / 8>(static_cast<T*>(p.dk) + row_base * p.head_dim, dk, key, p.seq_k, 0, p.head_dim, scale, lane);
  }
#else
  // Built for an arch without sm_90a features: never launched (the host
  // checks for the static shared memory above first).
  __trap();
#endif
}

}  // namespace pyext
