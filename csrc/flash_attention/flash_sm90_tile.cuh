// What the three Stage 2 (sm_90a) attention kernels and their launchers
// share: the tensor maps over q, k, v and dout, a tile loaded as TMA boxes, the producer's K/V ring and
// the k stepping of a K-major wgmma operand. Plain CUDA: no torch header.
//
// A tile of kRows x kD 16-bit elements is kD / 64 boxes of kRows x 64 (128
// bytes a row, the 128-byte swizzle width) one after the other; wgmma.cuh
// gives the descriptor of each operand over such boxes.
#pragma once

#include <type_traits>

#include "common/tma.cuh"
#include "common/tma_host.h"
#include "flash_attention/flash_attention.h"

namespace pyext {

constexpr int kSm90BoxCols = 64;  // head-dim elements per TMA box: 128 bytes

// setmaxnreg's arithmetic for a block of kThreads, one producer warpgroup at
// kProducer registers a thread and the rest at kConsumer: it must fit what
// the block holds at entry under __launch_bounds__(kThreads, 1), the SM's 64K
// registers over kThreads, rounded down to 8 a thread. Past that the
// consumers' setmaxnreg.inc waits forever.
template <int kThreads, int kProducer, int kConsumer>
constexpr bool sm90_registers_fit() {
  return 128 * kProducer + (kThreads - 128) * kConsumer <= kThreads * (65536 / kThreads / 8 * 8);
}

// Tensor maps over q, k, v (and dout) as (D, S, H, B), boxes of 64 head-dim
// elements x q_rows (q, dout) or kv_rows (k, v). dout is contiguous (B, Hq,
// Sq, D); the forward has none (p.dout null) and leaves m.dout unset. False
// when the driver refuses one.
struct Sm90TensorMaps {
  CUtensorMap q, k, v, dout;
};

template <typename T>
bool make_sm90_tensor_maps(const FlashAttnParams& p, int q_rows, int kv_rows, Sm90TensorMaps& m) {
  constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  const uint64_t d = p.head_dim, sq = p.seq_q, sk = p.seq_k, hq = p.heads_q, hkv = p.heads_kv, bs = p.batch;
  const int64_t do_row = p.head_dim, do_head = int64_t(p.seq_q) * p.head_dim, do_batch = p.heads_q * do_head;
  return make_tensor_map_4d_16bit(&m.q, kBf16, p.q, {d, sq, hq, bs}, {p.q_row_stride, p.q_head_stride, p.q_batch_stride},
                                  kSm90BoxCols, q_rows) &&
         make_tensor_map_4d_16bit(&m.k, kBf16, p.k, {d, sk, hkv, bs}, {p.k_row_stride, p.k_head_stride, p.k_batch_stride},
                                  kSm90BoxCols, kv_rows) &&
         make_tensor_map_4d_16bit(&m.v, kBf16, p.v, {d, sk, hkv, bs}, {p.v_row_stride, p.v_head_stride, p.v_batch_stride},
                                  kSm90BoxCols, kv_rows) &&
         (p.dout == nullptr ||
          make_tensor_map_4d_16bit(&m.dout, kBf16, p.dout, {d, sq, hq, bs}, {do_row, do_head, do_batch}, kSm90BoxCols,
                                   q_rows));
}

// The barriers of a Stage 2 kernel, bars = [once, full[kStages],
// empty[kStages]] in static shared memory (the host reads a non-zero static
// size as "this binary holds the sm_90a body"): `once` completes when the
// tiles loaded once have landed (one arrival with their bytes), the ring as
// mbarrier_ring_init says. One thread calls it; a __syncthreads follows.
template <int kStages>
__device__ __forceinline__ void sm90_barriers_init(uint64_t (&bars)[1 + 2 * kStages], uint32_t ring_producers,
                                                   uint32_t consumer_warps) {
  mbarrier_init(bars, 1);
  mbarrier_ring_init(bars + 1, bars + 1 + kStages, kStages, ring_producers, consumer_warps);
  fence_barrier_init();
}

// Rows row0 .. row0 + kRows - 1 of (batch, head), all kD columns, into dst as
// kD / 64 boxes, counted against bar.
template <int kD, int kRows, typename T>
__device__ __forceinline__ void tma_load_tile(T* dst, const CUtensorMap* tm, uint64_t* bar, int row0, int head,
                                              int batch) {
#pragma unroll
  for (int x = 0; x < kD / kSm90BoxCols; ++x)
    tma_load_4d(dst + x * kRows * kSm90BoxCols, tm, bar, x * kSm90BoxCols, row0, head, batch);
}

// The producer of the query-block kernels (forward, dQ): K and V tiles nb =
// 0 .. n_blocks - 1 of kN keys of (batch, head_kv) into a ring of kStages
// buffers (sk, sv: [kStages][kD / 64][kN][64]), as ring slots ring0 ..
// ring0 + n_blocks - 1 (ring0: the tiles loaded into the ring before, by
// this block's earlier query tiles); slot g is buffer g % kStages. full[s]:
// one arrival with the tile's bytes; empty[s]: released by the consumers.
template <int kD, int kN, int kStages, typename T>
__device__ __forceinline__ void produce_kv_ring(T* sk, T* sv, const CUtensorMap* tm_k, const CUtensorMap* tm_v,
                                                uint64_t* full, uint64_t* empty, int n_blocks, int ring0,
                                                int head_kv, int batch) {
  for (int nb = 0; nb < n_blocks; ++nb) {
    const int g = ring0 + nb, s = g % kStages;
    // Buffer s last held slot g - kStages: its release is the
    // (g / kStages - 1)-th completion of empty[s].
    if (g >= kStages) mbarrier_wait(&empty[s], (g / kStages - 1) & 1);
    mbarrier_arrive_expect_tx(&full[s], 2 * kN * kD * 2);
    tma_load_tile<kD, kN>(sk + s * kN * kD, tm_k, &full[s], nb * kN, head_kv, batch);
    tma_load_tile<kD, kN>(sv + s * kN * kD, tm_v, &full[s], nb * kN, head_kv, batch);
  }
}

// Descriptor offset (16-byte units) of k step ks (16 elements) of a K-major
// operand made of boxes `box16` units apart: box ks / 4, 32 bytes per step
// within its 128-byte rows.
__device__ __forceinline__ uint64_t kmajor_k_step(int ks, uint64_t box16) { return (ks / 4) * box16 + (ks % 4) * 2; }

// A warp's A fragments of 16 rows x 64 columns, 16-bit (acc_to_a's layout:
// warp w of the warpgroup holds rows 16w .. 16w + 15 of a[ks] for k step ks)
// into the tile at shared address `tile`, 1024-byte aligned, as rows of 64
// elements (128 bytes) with the 128-byte swizzle: the layout a TMA box of 64
// columns has, so a wgmma descriptor reads it K-major or, transposed,
// MN-major. The swizzle XORs an address's bits 4-6 (the 16-byte chunk of the
// row) with bits 7-9 (the row % 8, here g). Each register is one 4-byte
// store, and the 8 rows of a store land in 8 different chunks: no bank
// conflict. (Addresses as 32-bit shared ones, XORed per store: with generic
// pointers ptxas hoisted 16 64-bit addresses out of the step loop and
// spilled them.)
__device__ __forceinline__ void store_a_sw128(uint32_t tile, const uint32_t (&a)[4][4], int warp, int lane) {
  const uint32_t row = tile + (16 * warp + lane / 4) * 128 + 4 * (lane % 4), swizzle = (lane / 4) << 4;
#pragma unroll
  for (int ks = 0; ks < 4; ++ks)
#pragma unroll
    for (int r = 0; r < 4; ++r) st_shared_b32((row + (r % 2) * 8 * 128 + (2 * ks + r / 2) * 16) ^ swizzle, a[ks][r]);
}

}  // namespace pyext
