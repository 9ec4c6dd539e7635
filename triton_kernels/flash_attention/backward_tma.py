"""The attention backward with its tiles read and its gradients written
through 4-D tensor descriptors (B, H, S, D): TMA on sm_90. The same two
passes and per-tile math as the pointer kernels (backward.py,
backward_steps.py), for what the descriptor forward covers: causal or not,
GQA, a soft cap, sinks; no dropout, mask, window or packed batch.

Per tile the pointer kernels compute a 64-bit address and a bounds
predicate for each element of Q and dO (per query block, in the inner loop)
and of K and V; here one thread issues a copy per box, the hardware bounds
it by the tensor's extents (rows past S and columns past D read as zeros,
are not written), and the tiles land in shared memory in the swizzled
layout wgmma reads, asynchronously. Box coordinates are int32 (what TMA
takes); lse, delta, dq_acc and the sink shares stay pointers (int64 rows)."""
import triton
import triton.language as tl

from .._utils import round_to
from ..chosen_configs import ChosenConfigs, autotune
from . import loads
from .backward_steps import _dq_step, _kv_step, _query_step, _row_stats
from .launch import _configs
from .tiles import _keys_end, _query_range

_DQ_KEY = ["HEAD_DIM", "V_DIM", "SQ_BUCKET", "SK_BUCKET", "CAUSAL", "SOFTCAP"]
_BWD_KEY = _DQ_KEY + ["SINK"]


def _fitting_configs(configs, named_args, **kwargs):
    """The configs whose buffers fit in the GPU's shared memory (at least the
    smallest), counted as the compiler lays them out. In tiles of the input
    dtype: the block loaded once (K and V of the dK/dV kernel, Q and dO of
    the dQ kernel) and num_stages buffers of the block its loop loads (Q and
    dO; K and V), both over BLOCK_D + BLOCK_DV columns; with ATOMIC_DQ an
    fp32 [BLOCK_M, BLOCK_D] tile more (dS K, through shared memory to the
    atomics' layout); plus 2 KiB of barriers. An upper bound on the
    compiler's figure for every config at head dims 64-256 under Triton 3.6
    and 3.8 (tests/triton_compile_check.py holds each kept config to the
    limit); exact to within that margin where the loop's loads are double
    buffered."""
    columns, size = kwargs["BLOCK_D"] + kwargs["BLOCK_DV"], named_args["q_desc"].base.element_size()
    dkdv = "dk_desc" in named_args

    def need(c):
        m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        once, looped = (n, m) if dkdv else (m, n)
        atomic = m * kwargs["BLOCK_D"] * 4 if dkdv and kwargs["ATOMIC_DQ"] else 0
        return (once + c.num_stages * looped) * columns * size + atomic + 2048
    return loads.fitting(configs, named_args["q_desc"].base, need)


@triton.jit
def _bwd_kv_tma_kernel(q_desc, k_desc, v_desc, dout_desc, dk_desc, dv_desc, lse_ptr, delta_ptr, dq_acc_ptr, sink_ptr,
                       dsink_ptr, sink_slots, seq_q, seq_k, heads_q, group, qk_scale, cap_log2e, scale,
                       causal_offset, SQ_BUCKET, SK_BUCKET,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, V_DIM: tl.constexpr, BLOCK_DV: tl.constexpr,
                       CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, SINK: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV of one key block of one key head, summed over its query heads
    (and dQ by atomics, and the sinks' shares), as backward._bwd_kv_kernel."""
    start_n = tl.program_id(0) * BLOCK_N
    hk, b = tl.program_id(1), tl.program_id(2)  # grid (key blocks, key heads, batch)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    k = k_desc.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
    v = v_desc.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_DV)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    first, end = _query_range(start_n, seq_q, seq_k, causal_offset, CAUSAL, False, 0, 0, BLOCK_M, BLOCK_N)
    steps = tl.cdiv(end - first, BLOCK_M)
    for g in range(group):
        h = hk * group + g
        bh = b.to(tl.int64) * heads_q + h
        sink_share = tl.zeros([BLOCK_M], tl.float32)
        for i in tl.range(0, steps):
            start_m = _query_step(i, first, steps, tl.program_id(0), ATOMIC_DQ, BLOCK_M)
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = q_desc.load([b, h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
            do = dout_desc.load([b, h, start_m, 0]).reshape(BLOCK_M, BLOCK_DV)
            dk, dv, sink_share = _kv_step(dk, dv, sink_share, k, v, q, do, bh * seq_q + offs_m, offs_m, offs_n,
                                          start_n, h, bh, lse_ptr, delta_ptr, dq_acc_ptr, sink_ptr, lse_ptr, lse_ptr,
                                          0, 0, 0, lse_ptr, seq_q, seq_k, qk_scale, cap_log2e, causal_offset, 0, 0,
                                          1.0, HEAD_DIM, BLOCK_D, CAUSAL, False, False, 0, SOFTCAP, SINK, False,
                                          ATOMIC_DQ, BLOCK_M, BLOCK_N)  # no window, dropout or mask
        if SINK:
            tl.store(dsink_ptr + bh * sink_slots + tl.program_id(0), tl.sum(sink_share, 0))
    dk_desc.store([b, hk, start_n, 0], round_to(dk * scale, dk_desc.dtype).reshape(1, 1, BLOCK_N, BLOCK_D))
    dv_desc.store([b, hk, start_n, 0], round_to(dv, dv_desc.dtype).reshape(1, 1, BLOCK_N, BLOCK_DV))


# as backward.py's: the autotuner zeroes dq_acc and the sink shares before each timed run
_PRUNE = {"early_config_prune": _fitting_configs}
_bwd_dkdv_tma_kernel = ChosenConfigs(autotune(
    configs=_configs("bwd_tma"), key=_BWD_KEY, reset_to_zero=["dsink_ptr"], prune_configs_by=_PRUNE)(
    _bwd_kv_tma_kernel))
_bwd_dkdv_dq_tma_kernel = ChosenConfigs(autotune(
    configs=_configs("bwd_tma"), key=_BWD_KEY, reset_to_zero=["dq_acc_ptr", "dsink_ptr"], prune_configs_by=_PRUNE)(
    _bwd_kv_tma_kernel))


@ChosenConfigs
@autotune(configs=_configs("bwd_tma"), key=_DQ_KEY, prune_configs_by=_PRUNE)
@triton.jit
def _bwd_dq_tma_kernel(q_desc, k_desc, v_desc, dout_desc, dq_desc, lse_ptr, delta_ptr, seq_q, seq_k, heads_q, group,
                       qk_scale, cap_log2e, scale, causal_offset, SQ_BUCKET, SK_BUCKET,
                       HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, V_DIM: tl.constexpr, BLOCK_DV: tl.constexpr,
                       CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of one query block, over every key block it sees, as backward._bwd_dq_kernel."""
    start_m = tl.program_id(0) * BLOCK_M
    h, b = tl.program_id(1), tl.program_id(2)  # grid (query blocks, query heads, batch)
    hk = h // group
    bh = b.to(tl.int64) * heads_q + h
    offs_m = start_m + tl.arange(0, BLOCK_M)
    row = bh * seq_q + offs_m
    q = q_desc.load([b, h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)
    do = dout_desc.load([b, h, start_m, 0]).reshape(BLOCK_M, BLOCK_DV)
    shift, p_scale = _row_stats(lse_ptr, row, offs_m < seq_q, False)
    delta = tl.load(delta_ptr + row, mask=offs_m < seq_q, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in tl.range(0, _keys_end(start_m, seq_k, causal_offset, CAUSAL, BLOCK_M), BLOCK_N):
        k = k_desc.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        v = v_desc.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_DV)
        dq = _dq_step(dq, q, do, k, v, shift, p_scale, delta, offs_m, start_n, bh, lse_ptr, lse_ptr, 0, 0, 0, seq_q,
                      seq_k, qk_scale, cap_log2e, causal_offset, 0, 0, 1.0, HEAD_DIM, CAUSAL, False, False, 0, SOFTCAP,
                      BLOCK_M, BLOCK_N)  # no window, dropout or mask
    dq_desc.store([b, h, start_m, 0], round_to(dq * scale, dq_desc.dtype).reshape(1, 1, BLOCK_M, BLOCK_D))
