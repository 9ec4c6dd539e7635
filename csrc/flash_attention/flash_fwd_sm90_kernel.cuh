// FlashAttention forward, Stage 2: sm_90a (Hopper) with wgmma, TMA and warp
// specialisation. Same math, masking and outputs as Stage 1
// (flash_fwd_kernel.cuh: base-2 online softmax with log2(e) folded into the
// scale, rows that see no key -> out 0, lse -inf); head dims 64 and 128 (a
// head dim that pads to one of them, TMA zero-filling the columns past d).
//
// CTA = 128 query rows of one (batch, query head), 384 threads:
//   warpgroup 0, producer: gives registers back (setmaxnreg.dec to 24); one
//     thread issues the TMA copies: Q once, then K and V tiles of kBlockN keys
//     into a ring of kStages shared buffers. full[s] completes when tile data
//     has landed (1 arrival with expect_tx + the bytes); empty[s] when all 8
//     consumer warps are done reading buffer s (8 arrivals).
//   warpgroups 1, 2, consumers (setmaxnreg.inc to 240): each owns 64 query
//     rows. Per tile: S = Q K^T (wgmma, A = Q and B = K from shared memory,
//     both K-major), masking and online softmax in fp32 registers, P rounded
//     to 16 bits in registers, O += P V (wgmma, A = P from registers, B = V
//     from shared memory, MN-major: the transpose bit). Then the buffer is
//     released and the epilogue stores O / l and lse with plain stores.
// Shared tiles are TMA boxes of 64 head-dim elements (128 bytes, the 128-byte
// swizzle width) by the tile's rows; a D = 128 tile is two boxes one after
// the other. See wgmma.cuh for the descriptor of each operand.
//
// Overlap: the producer keeps the next K/V tiles in flight (3 buffers) while
// a tile is used; within a consumer warpgroup, tile nb's S = Q K^T is issued
// together with tile nb - 1's P V, and tile nb's softmax starts while that
// P V runs (kIntraWgOverlap; see the loop for what ptxas keeps of it); and
// the two consumer warpgroups take turns issuing their wgmmas (kPingPong),
// so that the tensor cores work for one while the other does its softmax.
//
// Ping-pong: turn[wg] is named barrier kTurnBarrier + wg over both consumer
// warpgroups' 256 threads. Before each group of wgmmas it issues, warpgroup
// wg waits on its own (bar.sync: its 128 threads and the other's 128
// arrivals), and once they are issued it arrives on the other's (bar.arrive),
// so the two issue alternately: 0, 1, 0, 1, ... The issues are the points
// of the loop below: n_blocks + 1 of them in each warpgroup (overlapped:
// S(0); S(nb) with PV(nb - 1) for nb = 1 .. n_blocks - 1; PV(n_blocks - 1)),
// 2 n_blocks one tile at a time (each S and each PV). Warpgroup 1 arrives
// once on warpgroup 0's turn before its first issue, so 0 goes first, and
// not after its last, so every barrier phase completes before the block
// ends: 0 waits as often as 1 arrives, and 1 as often as 0 arrives.
// Warpgroup 0 then does its softmax while 1's wgmmas, issued just after its
// own, keep the tensor cores busy, and the other way round.
#pragma once

#include <cmath>

#include "common/named_barrier.cuh"
#include "common/wgmma.cuh"
#include "flash_attention/flash_attention.h"
#include "flash_attention/flash_sm90_tile.cuh"
#include "flash_attention/flash_softmax.cuh"
#include "flash_attention/flash_tile.cuh"

namespace pyext {

template <int kD>
struct FlashFwdSm90Traits {
  static_assert(kD == 64 || kD == 128, "Stage 2 forward covers head dims 64 and 128");
  static constexpr int kBlockM = 128;  // two consumer warpgroups x 64 rows
  static constexpr int kBlockN = 128;  // keys per K/V tile (wgmma N of S = Q K^T)
  // Tile nb - 1's P V overlaps tile nb's softmax (see the consumer loop);
  // false: one tile at a time, S, softmax, P V.
  static constexpr bool kIntraWgOverlap = true;
  // The consumer warpgroups issue their wgmmas in turns (see the top).
  static constexpr bool kPingPong = true;
  static constexpr int kTurnBarrier = 1;  // named barriers 1, 2: the turns of warpgroups 0, 1
  // K/V ring depth. With the overlap, buffer nb - 1 is released only after
  // tile nb's softmax: a third buffer lets tile nb + 1 load meanwhile.
  static constexpr int kStages = kIntraWgOverlap ? 3 : 2;
  static constexpr int kThreads = 384;
  static constexpr int kConsumerWarps = 8;
  static constexpr int kQBytes = kBlockM * kD * 2;
  static constexpr int kTileBytes = kBlockN * kD * 2;  // one K (or V) tile
  // Q + kStages x (K + V) + 1 KB to align the base to 1024 (128-byte swizzle
  // atoms). 3 stages: D 64: 16 + 3 x 32 + 1 = 113 KB; D 128: 32 + 3 x 64 + 1
  // = 225 KB, with the barriers and the 1 KB ptxas reserves 226 KB of the
  // 227 KB a block may have (2 stages: 81 and 161 KB).
  static constexpr int kSmemBytes = kQBytes + 2 * kStages * kTileBytes + 1024;
  // 384 threads x 168 (the cap that __launch_bounds__(384, 1) gives) = 64512
  // registers = 128 x 24 + 256 x 240: the producer's give-back pays for the
  // consumers' raise.
  static constexpr int kProducerRegs = 24;
  static constexpr int kConsumerRegs = 240;
  static_assert(sm90_registers_fit<kThreads, kProducerRegs, kConsumerRegs>(), "setmaxnreg over the block's registers");
  static_assert(kSmemBytes + 2048 <= 227 * 1024, "shared memory over the sm_90 per-block limit");
  static dim3 grid(const FlashAttnParams& p) { return dim3(p.batch * p.heads_q, (p.seq_q + kBlockM - 1) / kBlockM); }
};

template <typename T, int kD>
__global__ void __launch_bounds__(FlashFwdSm90Traits<kD>::kThreads, 1)
    flash_fwd_sm90_kernel(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                          const __grid_constant__ CUtensorMap tm_v, const FlashAttnParams p) {
#if PYEXT_SM90A
  using Tr = FlashFwdSm90Traits<kD>;
  constexpr int kM = Tr::kBlockM, kN = Tr::kBlockN, kStages = Tr::kStages, kBox = kSm90BoxCols;
  __shared__ uint64_t bars[1 + 2 * kStages];  // see sm90_barriers_init; the stub below has none
  uint64_t* q_full = bars;
  uint64_t* full = bars + 1;
  uint64_t* empty = bars + 1 + kStages;
  T* sq = reinterpret_cast<T*>(dynamic_smem_1024());  // [kD / 64][kM][64]
  T* sk = sq + kM * kD;                                      // [kStages][kD / 64][kN][64]
  T* sv = sk + kStages * kN * kD;                            // [kStages][kD / 64][kN][64]

  const int tid = threadIdx.x, warpgroup = tid / 128;
  const int bh = blockIdx.x, b = bh / p.heads_q, h = bh % p.heads_q;
  const int hk = h / (p.heads_q / p.heads_kv);
  const int m0 = (gridDim.y - 1 - blockIdx.y) * kM;  // the longest causal rows start first
  // Keys past n_end are masked for every row of this block; both consumer
  // warpgroups walk all n_blocks tiles (each release needs all 8 warps).
  const int n_end = keys_end(p, m0, kM);
  const int n_blocks = (n_end + kN - 1) / kN;

  if (tid == 0) sm90_barriers_init<kStages>(bars, 1, Tr::kConsumerWarps);
  __syncthreads();

  if (warpgroup == 0) {
    // ---- producer ----
    setmaxnreg_dec<Tr::kProducerRegs>();
    if (tid == 0 && n_blocks > 0) {
      prefetch_tensor_map(&tm_q);
      prefetch_tensor_map(&tm_k);
      prefetch_tensor_map(&tm_v);
      mbarrier_arrive_expect_tx(q_full, Tr::kQBytes);
      tma_load_tile<kD, kM>(sq, &tm_q, q_full, m0, h, b);
      produce_kv_ring<kD, kN, kStages>(sk, sv, &tm_k, &tm_v, full, empty, n_blocks, hk, b);
    }
  } else {
    // ---- consumers ----
    setmaxnreg_inc<Tr::kConsumerRegs>();
    const int wg = warpgroup - 1, lane = tid % 32, warp = (tid % 128) / 32;
    const int m0w = m0 + wg * 64;                // this warpgroup's first row
    const int row = m0w + warp * 16 + lane / 4;  // this lane's rows: row, row + 8

    // Descriptors (wgmma.cuh). Q: this warpgroup's 64 rows of each box, k
    // step ks in box ks / 4 at byte 32 (ks % 4) of the row. K: the 128 rows
    // of a box, same k stepping. V (MN-major): k step = 16 keys = 2048 bytes,
    // the second 64 columns (D = 128) one box (kN x 128 bytes) further: LBO.
    const uint64_t dq = smem_desc_sw128(sq + wg * 64 * kBox, 16, 1024);
    const uint64_t dk = smem_desc_sw128(sk, 16, 1024);
    const uint64_t dv = smem_desc_sw128(sv, kN * kBox * 2, 1024);
    constexpr uint64_t kQBox = kM * kBox * 2 >> 4, kTileBox = kN * kBox * 2 >> 4, kStage = kD * kN * 2 >> 4;

    const float scale2 = p.scale * kLog2e;
    float o[kD / 8][4];
    zero(o);
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // l: this lane's partial row sums
    if (n_blocks > 0) mbarrier_wait(q_full, 0);

    float sacc[kN / 8][4];   // S of the current tile, then P in fp32
    uint32_t pa[kN / 16][4];  // P rounded to T: the A operand of P V
    // S = Q K^T for the tile in buffer s, issued and committed (one group).
    auto issue_s = [&](int s) {
#pragma unroll
      for (int ks = 0; ks < kD / 16; ++ks) {
        Wgmma<T, kN>::template ss<0, 0>(sacc, dq + kmajor_k_step(ks, kQBox), dk + s * kStage + kmajor_k_step(ks, kTileBox),
                                     ks > 0);
      }
      wgmma_commit();
    };
    // O += P V for the tile in buffer s, issued and committed (one group).
    auto issue_pv = [&](int s) {
#pragma unroll
      for (int ks = 0; ks < kN / 16; ++ks)
        Wgmma<T, kD>::template rs<1>(o, pa[ks], dv + s * kStage + ks * (16 * kBox * 2 >> 4), 1);
      wgmma_commit();
    };
    // Masking and online softmax of tile nb on sacc (complete): m, l updated,
    // sacc = exp2(s - m'), and alpha = exp2(m - m') for O, left to the caller.
    auto softmax = [&](int nb, float (&alpha)[2]) {
      scale_and_mask<kN>(sacc, p, scale2, nb * kN, m0w, row, lane);
      online_softmax_step<kN>(sacc, m, l, [&](int r, float a) { alpha[r] = a; });
    };
    auto rescale_o = [&](const float (&alpha)[2]) {
      rescale_row(o, 0, alpha[0]);
      rescale_row(o, 1, alpha[1]);
    };
    // This warp's reads of buffer s are done (wait_group in every lane): one
    // arrival per warp.
    auto release = [&](int s) {
      __syncwarp();
      if (lane == 0) mbarrier_arrive(&empty[s]);
    };
    auto wait_full = [&](int nb) { mbarrier_wait(&full[nb % kStages], (nb / kStages) & 1); };
    // issue() in this warpgroup's turn (see the top), then the other's turn.
    int issues_left = Tr::kIntraWgOverlap ? n_blocks + 1 : 2 * n_blocks;
    auto in_turn = [&](auto&& issue) {
      if constexpr (Tr::kPingPong) named_barrier_sync(Tr::kTurnBarrier + wg, 256);
      issue();
      if constexpr (Tr::kPingPong) {
        if (--issues_left > 0 || wg == 0) named_barrier_arrive(Tr::kTurnBarrier + 1 - wg, 256);
      }
    };
    if (Tr::kPingPong && wg == 1 && n_blocks > 0) named_barrier_arrive(Tr::kTurnBarrier, 256);

    if constexpr (Tr::kIntraWgOverlap) {
      // Tile nb's softmax runs while the tensor cores do tile nb - 1's P V:
      //   issue S(nb); issue PV(nb - 1); wait S(nb) (wait_group 1: groups
      //   complete in order); softmax(nb); wait PV(nb - 1); release nb - 1;
      //   O *= alpha(nb); P(nb) -> pa.
      // pa and o belong to the PV in flight until its wait: nothing writes
      // them before, and wgmma_fence_operand keeps the compiler from reusing
      // their registers early.
      // SASS (ptxas 13.0): ptxas hoists the PV wait (WARPGROUP.DEPBAR.LE 0)
      // above the exp2s, to round each P right after its exp2 into pa, so
      // only the scaling, masking and row maxima overlap the P V; P into
      // registers of its own (copied to pa after the wait) made ptxas
      // serialise every wgmma instead. See benchmarks/NOTES.md.
      if (n_blocks > 0) {
        float alpha[2];
        wait_full(0);
        wgmma_fence();
        in_turn([&] { issue_s(0); });
        wgmma_wait<0>();
        wgmma_fence_operand(sacc);
        softmax(0, alpha);  // O is still zero: no rescale
        acc_to_a<T, kN>(sacc, pa);
        for (int nb = 1; nb < n_blocks; ++nb) {
          wait_full(nb);
          wgmma_fence();
          in_turn([&] {
            issue_s(nb % kStages);
            issue_pv((nb - 1) % kStages);
          });
          wgmma_wait<1>();
          wgmma_fence_operand(sacc);
          softmax(nb, alpha);
          wgmma_wait<0>();
          wgmma_fence_operand(o);
          wgmma_fence_operand(pa);
          release((nb - 1) % kStages);
          rescale_o(alpha);
          acc_to_a<T, kN>(sacc, pa);
        }
        wgmma_fence();
        in_turn([&] { issue_pv((n_blocks - 1) % kStages); });
        wgmma_wait<0>();
        wgmma_fence_operand(o);
        wgmma_fence_operand(pa);
        release((n_blocks - 1) % kStages);
      }
    } else {
      // One tile at a time: S, softmax, P V, release.
      for (int nb = 0; nb < n_blocks; ++nb) {
        const int s = nb % kStages;
        float alpha[2];
        wait_full(nb);
        wgmma_fence();
        in_turn([&] { issue_s(s); });
        wgmma_wait<0>();
        wgmma_fence_operand(sacc);
        softmax(nb, alpha);
        rescale_o(alpha);
        acc_to_a<T, kN>(sacc, pa);
        wgmma_fence();
        in_turn([&] { issue_pv(s); });
        wgmma_wait<0>();
        wgmma_fence_operand(o);
        wgmma_fence_operand(pa);
        release(s);
      }
    }

    float inv[2];
    const int64_t row_base = int64_t(bh) * p.seq_q;
    softmax_finish(m, l, inv, p.lse + row_base, row, p.seq_q, lane);
    store_acc<T, kD / 8>(static_cast<T*>(p.out) + row_base * p.head_dim, o, row, p.seq_q, 0, p.head_dim, inv, lane);
  }
#else
  // Built for an arch without sm_90a features: never launched (the host
  // checks for the static shared memory above first).
  __trap();
#endif
}

}  // namespace pyext
