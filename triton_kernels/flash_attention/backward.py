"""The attention backward (FlashAttention-2): delta = rowsum(dO * O), then
dK and dV per key block (and dQ by atomics), or dQ in a second kernel; the
kernels that load through pointers, and the launch function, which runs
them or their descriptor versions (backward_tma.py)."""
import functools

import torch
import triton
import triton.language as tl

from .._utils import FMA, cdiv, on_device, round_to
from ..chosen_configs import ChosenConfigs, autotune
from .backward_steps import _dq_step, _kv_step, _p_and_dp, _query_step, _row_stats
from .backward_tma import _bwd_dkdv_dq_tma_kernel, _bwd_dkdv_tma_kernel, _bwd_dq_tma_kernel
from .launch import (_INTERPRET, _configs, _cu_seqlens, _logit_scales, _prepare, _tuning_key, _unit_last_stride,
                     _window_bounds)
from .loads import backward_loads, descriptor
from .mask_spans import col_spans, row_spans
from .tiles import _key_block, _key_range, _load_tile, _query_block, _query_range, _sequence, _stats_start


@triton.jit
def _bwd_delta_kernel(out_ptr, out_lo_ptr, dout_ptr, delta_ptr, sob, soh, som, slb, slh, slm, sdb, sdh, sdm, seq_q,
                      heads_q, V_DIM: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr,
                      LOW_PART: tl.constexpr):
    """delta = rowsum(dO * O) of one block of query rows of one (batch, head),
    into a contiguous (B, Hq, Sq) delta; with LOW_PART, O = out + out_lo
    (the dropout or masked forward's, tiles._low_part)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h, b = tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)  # grid (query blocks, heads, batch)
    bh = b * heads_q + h
    offs_dv = tl.arange(0, BLOCK_DV)
    o = _load_tile(out_ptr + b * sob + h * soh, offs_m, som, offs_dv, seq_q, V_DIM).to(tl.float32)
    if LOW_PART:
        o += _load_tile(out_lo_ptr + b * slb + h * slh, offs_m, slm, offs_dv, seq_q, V_DIM).to(tl.float32)
    do = _load_tile(dout_ptr + b * sdb + h * sdh, offs_m, sdm, offs_dv, seq_q, V_DIM).to(tl.float32)
    tl.store(delta_ptr + bh * seq_q + offs_m, tl.sum(o * do, 1), mask=offs_m < seq_q)


@triton.jit
def _bwd_kv_kernel(q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dq_acc_ptr, seed_ptr, mask_ptr,
                   col_span_ptr, dmask_ptr, sink_ptr, dsink_ptr, sink_slots, cu_seqlens_q, cu_seqlens_k,
                   sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
                   seq_q, seq_k, heads_q, group, smb, smh, smm, smn, sdb, sdh, sdm,
                   sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, qk_scale, cap_log2e, scale, causal_offset, left, right, keep,
                   SQ_BUCKET, SK_BUCKET,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, V_DIM: tl.constexpr, BLOCK_DV: tl.constexpr,
                   CAUSAL: tl.constexpr, WINDOW: tl.constexpr, DROPOUT: tl.constexpr, MASK: tl.constexpr,
                   SOFTCAP: tl.constexpr, SINK: tl.constexpr, DMASK: tl.constexpr, VARLEN: tl.constexpr,
                   ATOMIC_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV of one key block of one key head, summed over its query heads.
    With ATOMIC_DQ, also each query block's share of dQ, dS K (unscaled),
    atomically added into dq_acc, fp32, rows as lse's, HEAD_DIM contiguous.
    With SINK, each query head's share of its sink's gradient (before the
    sign): sum over rows i of P_sink_i * sum over these keys j of P_ij dP_ij
    (D_i, summed in fp32 from the tiles, exact where rowsum(dO * O) sees O
    rounded), into dsink_ptr[b, h, key block] (sink_slots per head). With
    DMASK (an additive mask, so every query block is walked), the mask's
    gradient of each tile into dmask_ptr (_kv_step)."""
    start_n = tl.program_id(0) * BLOCK_N
    hk, b = tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)  # grid (key blocks, key heads, batch)
    rows_q = seq_q
    first_q, seq_q, first_k, seq_k, causal_offset = _sequence(cu_seqlens_q, cu_seqlens_k, b, seq_q, seq_k,
                                                              causal_offset, VARLEN)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_ok = offs_d < HEAD_DIM
    k = _load_tile(k_ptr + b * skb + hk * skh + first_k * skn, offs_n, skn, offs_d, seq_k, HEAD_DIM)
    v = _load_tile(v_ptr + b * svb + hk * svh + first_k * svn, offs_n, svn, offs_dv, seq_k, V_DIM)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    lo, hi = _query_range(start_n, seq_q, seq_k, causal_offset, CAUSAL, WINDOW, left, right, BLOCK_M, BLOCK_N)
    for g in range(group):
        h = hk * group + g
        bh = b * heads_q + h
        sink_share = tl.zeros([BLOCK_M], tl.float32)
        first, end = lo, hi
        if MASK == 1:  # only the query blocks between the keys' first and last attending rows (mask_spans.col_spans)
            spans = col_span_ptr + (bh * seq_k + offs_n) * 2
            first = tl.maximum(lo, tl.min(tl.load(spans, mask=offs_n < seq_k, other=seq_q)) // BLOCK_M * BLOCK_M)
            end = tl.max(tl.load(spans + 1, mask=offs_n < seq_k, other=0))
        steps = tl.cdiv(end - first, BLOCK_M)
        for i in range(0, steps):
            start_m = _query_step(i, first, steps, tl.program_id(0), ATOMIC_DQ, BLOCK_M)
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = _load_tile(q_ptr + b * sqb + h * sqh + first_q * sqm, offs_m, sqm, offs_d, seq_q, HEAD_DIM)
            do = _load_tile(dout_ptr + b * sdb + h * sdh + first_q * sdm, offs_m, sdm, offs_dv, seq_q, V_DIM)
            row = _stats_start(b, h, heads_q, rows_q, first_q, VARLEN) + offs_m
            dk, dv, sink_share = _kv_step(dk, dv, sink_share, k, v, q, do, row, offs_m, offs_n, start_n, h, bh,
                                          lse_ptr, delta_ptr, dq_acc_ptr, sink_ptr, seed_ptr, mask_ptr,
                                          b * smb + h * smh, smm, smn, dmask_ptr, seq_q, seq_k, qk_scale,
                                          cap_log2e, causal_offset, left, right, keep, HEAD_DIM, BLOCK_D, CAUSAL,
                                          WINDOW, DROPOUT, MASK, SOFTCAP, SINK, DMASK, ATOMIC_DQ, BLOCK_M, BLOCK_N)
        if SINK:
            tl.store(dsink_ptr + bh * sink_slots + tl.program_id(0), tl.sum(sink_share, 0))
    tl.store(dk_ptr + b * sdkb + hk * sdkh + (first_k + offs_n[:, None]) * sdkn + offs_d[None, :],
             round_to(dk * scale, dk_ptr.dtype.element_ty), mask=(offs_n[:, None] < seq_k) & d_ok[None, :])
    tl.store(dv_ptr + b * sdvb + hk * sdvh + (first_k + offs_n[:, None]) * sdvn + offs_dv[None, :],
             round_to(dv, dv_ptr.dtype.element_ty), mask=(offs_n[:, None] < seq_k) & (offs_dv[None, :] < V_DIM))


_DQ_KEY = ["HEAD_DIM", "V_DIM", "SQ_BUCKET", "SK_BUCKET", "CAUSAL", "WINDOW", "DROPOUT", "MASK", "SOFTCAP", "VARLEN"]
_BWD_KEY = _DQ_KEY + ["SINK", "DMASK"]  # summed or written in the dK/dV pass: the dQ kernel has neither
# Timing a config adds into dq_acc, and leaves sink shares in the slots of its key blocks, which a
# config of wider blocks does not overwrite: the autotuner zeroes both before each run (and the last).
_bwd_dkdv_kernel = ChosenConfigs(autotune(configs=_configs("bwd"), key=_BWD_KEY, reset_to_zero=["dsink_ptr"])(
    _bwd_kv_kernel))
_bwd_dkdv_dq_kernel = ChosenConfigs(autotune(configs=_configs("bwd"), key=_BWD_KEY,
                                             reset_to_zero=["dq_acc_ptr", "dsink_ptr"])(_bwd_kv_kernel))
# the narrowest key block of any config: the most key blocks, so sink slots, a head can have
_MIN_BLOCK_N = min(c.kwargs["BLOCK_N"] for kind in ("bwd", "bwd_tma") for c in _configs(kind))


@ChosenConfigs
@autotune(configs=_configs("bwd"), key=_DQ_KEY)
@triton.jit
def _bwd_dq_kernel(q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr, seed_ptr, mask_ptr, row_span_ptr,
                   cu_seqlens_q, cu_seqlens_k,
                   sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
                   seq_q, seq_k, heads_q, group, smb, smh, smm, smn, sdb, sdh, sdm, sdqb, sdqh, sdqm,
                   qk_scale, cap_log2e, scale, causal_offset, left, right, keep, SQ_BUCKET, SK_BUCKET,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, V_DIM: tl.constexpr, BLOCK_DV: tl.constexpr,
                   CAUSAL: tl.constexpr, WINDOW: tl.constexpr, DROPOUT: tl.constexpr, MASK: tl.constexpr,
                   SOFTCAP: tl.constexpr, VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of one query block, over every key block it sees."""
    start_m, h, b, bh, hk, offs_m, first_q, seq_q, first_k, seq_k, causal_offset, row = _query_block(
        heads_q, group, cu_seqlens_q, cu_seqlens_k, seq_q, seq_k, causal_offset, VARLEN, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_mask = (offs_m[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM)
    q = _load_tile(q_ptr + b * sqb + h * sqh + first_q * sqm, offs_m, sqm, offs_d, seq_q, HEAD_DIM)
    do = _load_tile(dout_ptr + b * sdb + h * sdh + first_q * sdm, offs_m, sdm, offs_dv, seq_q, V_DIM)
    shift, p_scale = _row_stats(lse_ptr, row, offs_m < seq_q, MASK)
    delta = tl.load(delta_ptr + row, mask=offs_m < seq_q, other=0.0)
    k_base = k_ptr + b * skb + hk * skh + first_k * skn
    v_base = v_ptr + b * svb + hk * svh + first_k * svn
    mask_off = b * smb + h * smh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    first, end = _key_range(start_m, seq_q, seq_k, causal_offset, WINDOW, left, right, row_span_ptr, bh, CAUSAL,
                            MASK, BLOCK_M, BLOCK_N)
    for start_n in range(first, end, BLOCK_N):
        k, v = _key_block(k_base, v_base, start_n, skn, svn, offs_d, offs_dv, seq_k, HEAD_DIM, V_DIM, BLOCK_N)
        dq = _dq_step(dq, q, do, k, v, shift, p_scale, delta, offs_m, start_n, bh, seed_ptr, mask_ptr, mask_off, smm,
                      smn, seq_q, seq_k, qk_scale, cap_log2e, causal_offset, left, right, keep, HEAD_DIM, CAUSAL,
                      WINDOW, DROPOUT, MASK, SOFTCAP, BLOCK_M, BLOCK_N)
    tl.store(dq_ptr + b * sdqb + h * sdqh + (first_q + offs_m[:, None]) * sdqm + offs_d[None, :],
             round_to(dq * scale, dq_ptr.dtype.element_ty), mask=q_mask)


@ChosenConfigs
@autotune(configs=_configs("bwd"), key=_DQ_KEY)
@triton.jit
def _bwd_delta_from_tiles_kernel(q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, seed_ptr, mask_ptr, row_span_ptr,
                                 cu_seqlens_q, cu_seqlens_k,
                                 sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
                                 seq_q, seq_k, heads_q, group, smb, smh, smm, smn, sdb, sdh, sdm,
                                 qk_scale, cap_log2e, scale, causal_offset, left, right, keep, SQ_BUCKET, SK_BUCKET,
                                 HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, V_DIM: tl.constexpr,
                                 BLOCK_DV: tl.constexpr, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
                                 DROPOUT: tl.constexpr, MASK: tl.constexpr, SOFTCAP: tl.constexpr,
                                 VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """delta of one query block as sum over keys j of P_ij dP_ij, in fp32
    over its key tiles (two products a tile), for the mask's gradient: D =
    rowsum(dO * O) is the same sum, but O came from P rounded to the
    inputs' dtype in the forward's P V, which puts 2^-9 of relative error
    into D, so into dS = P (dP - D). dS is the mask's gradient: for a
    float32 mask, torch computes it in float32."""
    start_m, h, b, bh, hk, offs_m, first_q, seq_q, first_k, seq_k, causal_offset, row = _query_block(
        heads_q, group, cu_seqlens_q, cu_seqlens_k, seq_q, seq_k, causal_offset, VARLEN, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_tile(q_ptr + b * sqb + h * sqh + first_q * sqm, offs_m, sqm, offs_d, seq_q, HEAD_DIM)
    do = _load_tile(dout_ptr + b * sdb + h * sdh + first_q * sdm, offs_m, sdm, offs_dv, seq_q, V_DIM)
    shift, p_scale = _row_stats(lse_ptr, row, offs_m < seq_q, MASK)
    k_base = k_ptr + b * skb + hk * skh + first_k * skn
    v_base = v_ptr + b * svb + hk * svh + first_k * svn
    delta = tl.zeros([BLOCK_M], tl.float32)
    first, end = _key_range(start_m, seq_q, seq_k, causal_offset, WINDOW, left, right, row_span_ptr, bh, CAUSAL,
                            MASK, BLOCK_M, BLOCK_N)
    for start_n in range(first, end, BLOCK_N):
        k, v = _key_block(k_base, v_base, start_n, skn, svn, offs_d, offs_dv, seq_k, HEAD_DIM, V_DIM, BLOCK_N)
        p, dp, _ = _p_and_dp(q, do, k, v, shift, p_scale, offs_m, start_n, bh, seed_ptr, mask_ptr, b * smb + h * smh,
                             smm, smn, seq_q, seq_k, qk_scale, cap_log2e, causal_offset, left, right, keep, CAUSAL,
                             WINDOW, DROPOUT, MASK, SOFTCAP, BLOCK_M, BLOCK_N)
        delta += tl.sum(p * dp, 1)
    tl.store(delta_ptr + row, delta, mask=offs_m < seq_q)


def flash_attn_bwd(dout, q, k, v, out, lse, scale: float, causal: bool, causal_offset: int, deterministic: bool,
                   dq=None, dk=None, dv=None, dropout_p: float = 0.0, seed=None, mask=None, window=None,
                   softcap: float = 0.0, sinks=None, packed=None, out_lo=None, dmask=None):
    """(dq, dk, dv), and dsinks (Hq,) fp32 after them with `sinks` (the
    forward's): d sink_h = -sum over batch and rows of P_sink * D, D
    summed from the tiles (_bwd_kv_kernel), in a fixed order.
    deterministic=True: dK/dV per key block, then dQ per query
    block, each a sum in a fixed order (same bits run to run; S and P computed
    twice). False: one pass that also adds each tile's dS K into an fp32 dQ
    with atomics, in an order that varies run to run. Gradients may be passed
    in (poisoned, by tests). dropout_p, seed and mask: the forward's (with a
    mask, `lse` is the forward's (m, l) stats), window, softcap and packed
    the forward's (packed: the gradients given, views as q, k, v are).
    out_lo, the forward's third output where it has one: D from out + out_lo.
    dmask, with an additive mask: a contiguous (B, Hq, Sq, Sk) tensor the
    dK/dV kernel fills with the mask's gradient, dS (summing it over the
    dims the mask broadcasts is the caller's: autograd's, for a view).
    Where loads.backward_loads says so (sm_90, no dropout, mask, window or
    packed batch), both kernels read and write through tensor descriptors
    (backward_tma.py); the same math either way."""
    q, k, v, mask, args, sizes, meta, buckets = _prepare(q, k, v, causal, dropout_p, mask, softcap, packed)
    meta["WINDOW"] = window is not None
    batch, heads_q, seq_q, head_dim = q.shape
    heads_k, seq_k = k.shape[1], k.shape[2]
    dout, out = _unit_last_stride(dout), _unit_last_stride(out)
    out_lo = None if out_lo is None else _unit_last_stride(out_lo)
    # each gradient in its input's memory order, as torch's flash SDPA gives them: for
    # q, k, v viewed per head from one (B, S, 3 H D) projection, no copy before their sum
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    if seq_q == 0 or seq_k == 0 or batch * heads_q == 0:
        grads = dq.zero_(), dk.zero_(), dv.zero_()
        return grads if sinks is None else (*grads, torch.zeros(heads_q, dtype=torch.float32, device=q.device))
    stats_batch = 1 if packed else batch  # a packed batch's stats: (Hq, total) for every sequence
    delta = torch.empty((stats_batch, heads_q, seq_q), dtype=torch.float32, device=q.device)
    tail = (*_logit_scales(scale, softcap), scale, causal_offset, *_window_bounds(window, q, k), 1.0 - dropout_p,
            *buckets)
    dout_strides = dout.stride()[:3]
    rows_q, rows_k = (packed.max_seqlen_q, packed.max_seqlen_k) if packed else (seq_q, seq_k)
    grid_kv = lambda m: (cdiv(rows_k, m["BLOCK_N"]), heads_k, batch)  # noqa: E731
    spans, cu_seqlens = col_spans(mask), _cu_seqlens(packed)
    key = _tuning_key(buckets, q, dout, mask, sinks)
    # each (batch, head)'s sink shares, one slot per key block; with no sinks a zero the kernels
    # never write (the autotuner zeroes the argument, and Triton 3.6 cannot zero None)
    if sinks is None:
        sink_args = (None, _no_sink_shares(q.device), 1)
    else:
        slots = cdiv(rows_k, _MIN_BLOCK_N)
        sink_args = (sinks.contiguous(), torch.zeros((batch, heads_q, slots), dtype=torch.float32, device=q.device),
                     slots)
    meta["SINK"] = sinks is not None
    meta["DMASK"] = dmask is not None
    descriptors = not meta["DROPOUT"] and not meta["MASK"] and window is None and packed is None and \
        backward_loads(q, k, v, dout, dq, dk, dv) == "descriptor"
    with on_device(q):
        # 64 rows, fewer past a head dim of 128: a program's two [rows, BLOCK_DV] fp32 tiles in 128
        # threads' registers (at a head dim of 129-256 that 16 does not divide, 136 or 200, 64 rows spill
        # 28 B a thread; d256 nothing either way)
        block = 16 if _INTERPRET else min(64, 8192 // meta["BLOCK_DV"])
        if dmask is not None:  # D from the tiles, for dS in float32
            tile_meta = {name: value for name, value in meta.items() if name not in ("SINK", "DMASK")}
            _bwd_delta_from_tiles_kernel.launch(
                lambda m: (cdiv(rows_q, m["BLOCK_M"]), heads_q, batch), key, q, k, v, dout, lse, delta, seed, mask,
                row_spans(mask), *cu_seqlens, *args, *dout_strides, *tail, **tile_meta, **FMA)
        else:  # delta is per row: a packed batch's rows are those of one long sequence
            _bwd_delta_kernel[(cdiv(seq_q, block), heads_q, stats_batch)](
                out, out_lo, dout, delta, *out.stride()[:3], *(out if out_lo is None else out_lo).stride()[:3],
                *dout_strides, seq_q, heads_q, V_DIM=meta["V_DIM"], BLOCK_DV=meta["BLOCK_DV"], BLOCK_M=block,
                LOW_PART=out_lo is not None, **FMA)
        if descriptors:
            _bwd_tma(q, k, v, dout, dq, dk, dv, lse, delta, sink_args, sizes, scale, softcap, causal_offset, buckets,
                     key, deterministic, meta)
        elif not deterministic:
            dq_acc = torch.zeros((stats_batch, *q.shape[1:]), dtype=torch.float32, device=q.device)
            _bwd_dkdv_dq_kernel.launch(grid_kv, key, q, k, v, dout, lse, delta, dk, dv, dq_acc, seed, mask, spans,
                                       dmask, *sink_args, *cu_seqlens, *args, *dout_strides, *dk.stride()[:3],
                                       *dv.stride()[:3], *tail, ATOMIC_DQ=True, **meta, **FMA)
            torch.mul(dq_acc, scale, out=dq[:stats_batch])
        else:
            _bwd_dkdv_kernel.launch(grid_kv, key, q, k, v, dout, lse, delta, dk, dv, None, seed, mask, spans,
                                    dmask, *sink_args, *cu_seqlens, *args, *dout_strides, *dk.stride()[:3],
                                    *dv.stride()[:3], *tail, ATOMIC_DQ=False, **meta, **FMA)
            meta.pop("SINK"), meta.pop("DMASK")
            grid_q = lambda m: (cdiv(rows_q, m["BLOCK_M"]), heads_q, batch)  # noqa: E731
            _bwd_dq_kernel.launch(grid_q, key, q, k, v, dout, lse, delta, dq, seed, mask, row_spans(mask),
                                  *cu_seqlens, *args, *dout_strides, *dq.stride()[:3], *tail, **meta, **FMA)
    return (dq, dk, dv) if sinks is None else (dq, dk, dv, -sink_args[1].sum((0, 2)))


def _bwd_tma(q, k, v, dout, dq, dk, dv, lse, delta, sink_args, sizes, scale, softcap, causal_offset, buckets, key,
             deterministic, meta):
    """flash_attn_bwd's dK/dV and dQ kernels through tensor descriptors (backward_tma.py);
    sizes: (Sq, Sk, Hq, Hq / Hkv), as launch._prepare gives them."""
    batch, heads_q, seq_q, _ = q.shape
    heads_k, seq_k = k.shape[1], k.shape[2]
    scales = (*_logit_scales(scale, softcap), scale, causal_offset, *buckets)
    meta = dict(HEAD_DIM=meta["HEAD_DIM"], BLOCK_D=meta["BLOCK_D"], V_DIM=meta["V_DIM"], BLOCK_DV=meta["BLOCK_DV"],
                CAUSAL=meta["CAUSAL"], SOFTCAP=meta["SOFTCAP"])
    q_desc, k_desc, v_desc, dout_desc = (descriptor(t) for t in (q, k, v, dout))
    grid_kv = lambda m: (cdiv(seq_k, m["BLOCK_N"]), heads_k, batch)  # noqa: E731
    if not deterministic:
        dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        _bwd_dkdv_dq_tma_kernel.launch(grid_kv, key, q_desc, k_desc, v_desc, dout_desc, descriptor(dk),
                                       descriptor(dv), lse, delta, dq_acc, *sink_args, *sizes, *scales,
                                       SINK=sink_args[0] is not None, ATOMIC_DQ=True, **meta, **FMA)
        torch.mul(dq_acc, scale, out=dq)
        return
    _bwd_dkdv_tma_kernel.launch(grid_kv, key, q_desc, k_desc, v_desc, dout_desc, descriptor(dk), descriptor(dv), lse,
                                delta, None, *sink_args, *sizes, *scales, SINK=sink_args[0] is not None,
                                ATOMIC_DQ=False, **meta, **FMA)
    grid_q = lambda m: (cdiv(seq_q, m["BLOCK_M"]), heads_q, batch)  # noqa: E731
    _bwd_dq_tma_kernel.launch(grid_q, key, q_desc, k_desc, v_desc, dout_desc, descriptor(dq), lse, delta, *sizes,
                              *scales, **meta, **FMA)


@functools.lru_cache(maxsize=None)
def _no_sink_shares(device):
    """The sink-shares argument of a backward with no sinks: one zero per device, allocated once."""
    return torch.zeros(1, dtype=torch.float32, device=device)
