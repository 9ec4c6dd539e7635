// FlashAttention forward, Stage 2: sm_90a (Hopper) with wgmma, TMA and warp
// specialisation. Same math, masking and outputs as Stage 1
// (flash_fwd_kernel.cuh: base-2 online softmax with log2(e) folded into the
// scale, rows that see no key -> out 0, lse -inf); head dims 64 and 128 (a
// head dim that pads to one of them, TMA zero-filling the columns past d).
//
// Query tile = 128 query rows of one (batch, query head). CTA = 384 threads,
// one an SM, persistent: it loops over query tiles (the schedule below), so
// that the loads of its next tile run under the last products and the
// epilogue of this one, where a CTA a tile would leave the SM to wait for
// the next CTA's first loads.
//   warpgroup 0, producer: gives registers back (setmaxnreg.dec to 24); one
//     thread issues the TMA copies: a tile's Q, then its K and V tiles of
//     kBlockN keys into a ring of kStages shared buffers, the ring going on
//     from tile to tile. full[s] completes when tile data has landed (1
//     arrival with expect_tx + the bytes); empty[s] when all 8 consumer
//     warps are done reading buffer s (8 arrivals); q_full when Q has
//     landed, q_free when the 8 consumer warps' last S = Q K^T of the tile
//     is done, so the next Q may overwrite it.
//   warpgroups 1, 2, consumers (setmaxnreg.inc to 240): each owns 64 query
//     rows. Per key tile: S = Q K^T (wgmma, A = Q and B = K from shared
//     memory, both K-major), masking and online softmax in fp32 registers, P
//     rounded to 16 bits in registers, O += P V (wgmma, A = P from registers,
//     B = V from shared memory, MN-major: the transpose bit), then the buffer
//     is released. The epilogue stores O / l and lse with plain stores.
// Schedule: tile t is query block t % n of (batch, head) t / n (n query
// blocks a head; head_block_grid, flash_tile.cuh, says why the block is
// fastest), counted from the last, so that a head's longest causal rows
// come first. CTA c of G takes round r's tile r G + c when r is even and
// r G + G - 1 - c when odd, which evens out the CTAs' work where it varies
// from tile to tile (causal).
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
// 2 n_blocks one tile at a time (each S and each PV), tile after tile.
// Warpgroup 1 arrives once on warpgroup 0's turn before the first tile, so 0
// goes first, and 0 waits on its turn once more after the last, for 1's last
// arrival, so every barrier phase completes before the block ends: 0 waits
// as often as 1 arrives, and 1 as often as 0 arrives.
// Warpgroup 0 then does its softmax while 1's wgmmas, issued just after its
// own, keep the tensor cores busy, and the other way round.
#pragma once

#include <cmath>
#include <cstdlib>
#include <cstring>

#include "common/grid.h"
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
  __host__ __device__ static int tiles(const FlashAttnParams& p) {
    return p.batch * p.heads_q * ((p.seq_q + kBlockM - 1) / kBlockM);
  }
  // CTAs: as many as are resident at once (one an SM: its registers and
  // shared memory leave room for no second), no more than there are tiles.
  // With PYEXT_FLASH_SM90_PERSISTENT=0 in the environment (read per call, to
  // time one schedule against the other) one CTA a tile instead: the
  // hardware's schedule.
  template <typename Kernel>
  static int ctas(Kernel kernel, const FlashAttnParams& p) {
    const char* env = std::getenv("PYEXT_FLASH_SM90_PERSISTENT");
    if (env != nullptr && std::strcmp(env, "0") == 0) return tiles(p);
    return resident_blocks(kernel, kThreads, tiles(p), kSmemBytes);
  }
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
};

// Tile `round` of CTA `cta` of `ctas` (the schedule at the top).
__device__ __forceinline__ int fwd_sm90_tile(int round, int cta, int ctas) {
  return round * ctas + (round % 2 == 0 ? cta : ctas - 1 - cta);
}

// What a query tile (the schedule at the top) covers.
struct FwdSm90Tile {
  int b, h, hk, m0;  // batch, query head, key head, first query row
  int n_blocks;      // key tiles its rows see (keys past them are masked for every row)
};

template <int kM, int kN>
__device__ __forceinline__ FwdSm90Tile fwd_sm90_tile_at(const FlashAttnParams& p, int t) {
  const int q_blocks = (p.seq_q + kM - 1) / kM, bh = t / q_blocks, h = bh % p.heads_q;
  const int m0 = (q_blocks - 1 - t % q_blocks) * kM;
  return {bh / p.heads_q, h, h / (p.heads_q / p.heads_kv), m0, (keys_end(p, m0, kM) + kN - 1) / kN};
}

template <typename T, int kD>
__global__ void __launch_bounds__(FlashFwdSm90Traits<kD>::kThreads, 1)
    flash_fwd_sm90_kernel(const __grid_constant__ CUtensorMap tm_q, const __grid_constant__ CUtensorMap tm_k,
                          const __grid_constant__ CUtensorMap tm_v, const FlashAttnParams p) {
#if PYEXT_SM90A
  using Tr = FlashFwdSm90Traits<kD>;
  constexpr int kM = Tr::kBlockM, kN = Tr::kBlockN, kStages = Tr::kStages, kBox = kSm90BoxCols;
  __shared__ uint64_t bars[1 + 2 * kStages];  // see sm90_barriers_init; the stub below has none
  __shared__ uint64_t q_free;  // both consumer warpgroups are done reading Q: 8 warp arrivals
  uint64_t* q_full = bars;
  uint64_t* full = bars + 1;
  uint64_t* empty = bars + 1 + kStages;
  T* sq = reinterpret_cast<T*>(dynamic_smem_1024());  // [kD / 64][kM][64]
  T* sk = sq + kM * kD;                                      // [kStages][kD / 64][kN][64]
  T* sv = sk + kStages * kN * kD;                            // [kStages][kD / 64][kN][64]

  const int tid = threadIdx.x, warpgroup = tid / 128, tiles = Tr::tiles(p);

  if (tid == 0) {
    mbarrier_init(&q_free, Tr::kConsumerWarps);
    sm90_barriers_init<kStages>(bars, 1, Tr::kConsumerWarps);
  }
  __syncthreads();

  // Every tile with a key to see loads Q once (q_loads so far: the parity of
  // q_full and q_free) and n_blocks ring slots (ring: the slots so far).
  if (warpgroup == 0) {
    // ---- producer ----
    setmaxnreg_dec<Tr::kProducerRegs>();
    if (tid == 0) {
      prefetch_tensor_map(&tm_q);
      prefetch_tensor_map(&tm_k);
      prefetch_tensor_map(&tm_v);
      int q_loads = 0, ring = 0;
      for (int round = 0;; ++round) {
        const int t = fwd_sm90_tile(round, blockIdx.x, gridDim.x);
        if (t >= tiles) break;
        const FwdSm90Tile tile = fwd_sm90_tile_at<kM, kN>(p, t);
        if (tile.n_blocks == 0) continue;
        // The previous tile's last S = Q K^T is done with Q's buffer.
        if (q_loads > 0) mbarrier_wait(&q_free, (q_loads - 1) & 1);
        mbarrier_arrive_expect_tx(q_full, Tr::kQBytes);
        tma_load_tile<kD, kM>(sq, &tm_q, q_full, tile.m0, tile.h, tile.b);
        produce_kv_ring<kD, kN, kStages>(sk, sv, &tm_k, &tm_v, full, empty, tile.n_blocks, ring, tile.hk, tile.b);
        ++q_loads;
        ring += tile.n_blocks;
      }
    }
  } else {
    // ---- consumers ----
    setmaxnreg_inc<Tr::kConsumerRegs>();
    const int wg = warpgroup - 1, lane = tid % 32, warp = (tid % 128) / 32;

    // Descriptors (wgmma.cuh). Q: this warpgroup's 64 rows of each box, k
    // step ks in box ks / 4 at byte 32 (ks % 4) of the row. K: the 128 rows
    // of a box, same k stepping. V (MN-major): k step = 16 keys = 2048 bytes,
    // the second 64 columns (D = 128) one box (kN x 128 bytes) further: LBO.
    const uint64_t dq = smem_desc_sw128(sq + wg * 64 * kBox, 16, 1024);
    const uint64_t dk = smem_desc_sw128(sk, 16, 1024);
    const uint64_t dv = smem_desc_sw128(sv, kN * kBox * 2, 1024);
    constexpr uint64_t kQBox = kM * kBox * 2 >> 4, kTileBox = kN * kBox * 2 >> 4, kStage = kD * kN * 2 >> 4;
    const float scale2 = p.scale * kLog2e;

    // This warp's reads of a buffer are done (wait_group in every lane): one
    // arrival per warp on the barrier that frees it.
    auto release = [&](uint64_t* bar) {
      __syncwarp();
      if (lane == 0) mbarrier_arrive(bar);
    };
    // issue() in this warpgroup's turn (see the top), then the other's turn.
    auto in_turn = [&](auto&& issue) {
      if constexpr (Tr::kPingPong) named_barrier_sync(Tr::kTurnBarrier + wg, 256);
      issue();
      if constexpr (Tr::kPingPong) named_barrier_arrive(Tr::kTurnBarrier + 1 - wg, 256);
    };
    if (Tr::kPingPong && wg == 1) named_barrier_arrive(Tr::kTurnBarrier, 256);

    int q_loads = 0, ring = 0;
    for (int round = 0;; ++round) {
      const int t = fwd_sm90_tile(round, blockIdx.x, gridDim.x);
      if (t >= tiles) break;
      const FwdSm90Tile tile = fwd_sm90_tile_at<kM, kN>(p, t);
      const int n_blocks = tile.n_blocks;
      const int m0w = tile.m0 + wg * 64;           // this warpgroup's first row
      const int row = m0w + warp * 16 + lane / 4;  // this lane's rows: row, row + 8

      float o[kD / 8][4];
      zero(o);
      float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // l: this lane's partial row sums
      float sacc[kN / 8][4];   // S of the current key tile, then P in fp32
      uint32_t pa[kN / 16][4];  // P rounded to T: the A operand of P V
      // Key tile nb sits in ring slot ring + nb.
      auto buffer = [&](int nb) { return (ring + nb) % kStages; };
      auto wait_full = [&](int nb) { mbarrier_wait(&full[buffer(nb)], ((ring + nb) / kStages) & 1); };
      // S = Q K^T for key tile nb, issued and committed (one group).
      auto issue_s = [&](int nb) {
#pragma unroll
        for (int ks = 0; ks < kD / 16; ++ks) {
          Wgmma<T, kN>::template ss<0, 0>(sacc, dq + kmajor_k_step(ks, kQBox),
                                       dk + buffer(nb) * kStage + kmajor_k_step(ks, kTileBox), ks > 0);
        }
        wgmma_commit();
      };
      // O += P V for key tile nb, issued and committed (one group).
      auto issue_pv = [&](int nb) {
#pragma unroll
        for (int ks = 0; ks < kN / 16; ++ks)
          Wgmma<T, kD>::template rs<1>(o, pa[ks], dv + buffer(nb) * kStage + ks * (16 * kBox * 2 >> 4), 1);
        wgmma_commit();
      };
      // S of key tile nb is complete: after the tile's last, Q is free.
      auto s_done = [&](int nb) {
        wgmma_fence_operand(sacc);
        if (nb == n_blocks - 1) release(&q_free);
      };
      // Masking and online softmax of key tile nb on sacc (complete): m, l
      // updated, sacc = exp2(s - m'), and alpha = exp2(m - m') for O, left
      // to the caller.
      auto softmax = [&](int nb, float (&alpha)[2]) {
        scale_and_mask<kN>(sacc, p, scale2, nb * kN, m0w, row, lane);
        online_softmax_step<kN>(sacc, m, l, [&](int r, float a) { alpha[r] = a; });
      };
      auto rescale_o = [&](const float (&alpha)[2]) {
        rescale_row(o, 0, alpha[0]);
        rescale_row(o, 1, alpha[1]);
      };

      if (n_blocks > 0) mbarrier_wait(q_full, q_loads & 1);
      if constexpr (Tr::kIntraWgOverlap) {
        // Key tile nb's softmax runs while the tensor cores do tile nb - 1's
        // P V:
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
          s_done(0);
          softmax(0, alpha);  // O is still zero: no rescale
          acc_to_a<T, kN>(sacc, pa);
          for (int nb = 1; nb < n_blocks; ++nb) {
            wait_full(nb);
            wgmma_fence();
            in_turn([&] {
              issue_s(nb);
              issue_pv(nb - 1);
            });
            wgmma_wait<1>();
            s_done(nb);
            softmax(nb, alpha);
            wgmma_wait<0>();
            wgmma_fence_operand(o);
            wgmma_fence_operand(pa);
            release(&empty[buffer(nb - 1)]);
            rescale_o(alpha);
            acc_to_a<T, kN>(sacc, pa);
          }
          wgmma_fence();
          in_turn([&] { issue_pv(n_blocks - 1); });
          wgmma_wait<0>();
          wgmma_fence_operand(o);
          wgmma_fence_operand(pa);
          release(&empty[buffer(n_blocks - 1)]);
        }
      } else {
        // One key tile at a time: S, softmax, P V, release.
        for (int nb = 0; nb < n_blocks; ++nb) {
          float alpha[2];
          wait_full(nb);
          wgmma_fence();
          in_turn([&] { issue_s(nb); });
          wgmma_wait<0>();
          s_done(nb);
          softmax(nb, alpha);
          rescale_o(alpha);
          acc_to_a<T, kN>(sacc, pa);
          wgmma_fence();
          in_turn([&] { issue_pv(nb); });
          wgmma_wait<0>();
          wgmma_fence_operand(o);
          wgmma_fence_operand(pa);
          release(&empty[buffer(nb)]);
        }
      }
      if (n_blocks > 0) ++q_loads;
      ring += n_blocks;

      float inv[2];
      const int64_t row_base = (int64_t(tile.b) * p.heads_q + tile.h) * p.seq_q;
      softmax_finish(m, l, inv, p.lse + row_base, row, p.seq_q, lane);
      store_out<T, kD / 8>(static_cast<T*>(p.out) + row_base * p.head_dim,
                           p.out_lo ? static_cast<T*>(p.out_lo) + row_base * p.head_dim : nullptr, o, row, p.seq_q,
                           p.head_dim, inv, lane);
    }
    // Warpgroup 1's arrival after its last issue (or before the first tile,
    // when there was none) completes this last phase of 0's turn.
    if (Tr::kPingPong && wg == 0) named_barrier_sync(Tr::kTurnBarrier, 256);
  }
#else
  // Built for an arch without sm_90a features: never launched (the host
  // checks for the static shared memory above first).
  __trap();
#endif
}

}  // namespace pyext
