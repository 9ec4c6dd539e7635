"""The attention backward (FlashAttention-2): delta = rowsum(dO * O), then
dK and dV per key block (and dQ by atomics), or dQ in a second kernel."""
import functools

import torch
import triton
import triton.language as tl

from .._utils import cdiv, dot, on_device, round_to
from ..chosen_configs import ChosenConfigs
from .launch import (_INTERPRET, _configs, _cu_seqlens, _logit_scales, _prepare, _tuning_key, _unit_last_stride,
                     _window_bounds)
from .mask_spans import col_spans, row_spans
from .tiles import (_dropout_keep, _key_range, _load_tile, _low_part, _masked_scores, _query_block, _sequence,
                    _soft_capped, _stats_start, _visible)


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
def _row_stats(lse_ptr, row, valid, MASK: tl.constexpr):
    """(shift, scale) of these rows for P = exp2(s - shift) * scale (_recomputed_p).
    Without a mask: lse in base 2 (rows that saw no key get +inf, so P is 0),
    and a scale of 1 that goes unused. With one: the forward's (m, 1 / l)
    (rows that saw no key get (0, 0))."""
    if MASK:
        m = tl.load(lse_ptr + row * 2, mask=valid, other=0.0)
        l_sum = tl.load(lse_ptr + row * 2 + 1, mask=valid, other=0.0)
        seen = l_sum > 0.0
        return tl.where(seen, m, 0.0), tl.where(seen, 1.0 / tl.where(seen, l_sum, 1.0), 0.0)
    lse = tl.load(lse_ptr + row, mask=valid, other=0.0)
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634), tl.full(row.shape, 1.0, tl.float32)


@triton.jit
def _recomputed_p(s, shift, scale, MASK: tl.constexpr):
    """P of base-2 logits s, from _row_stats broadcast to s's shape."""
    p = tl.exp2(s - shift)
    if MASK:
        p = p * scale
    return p


@triton.jit
def _query_step(i, first, steps, key_block, ROTATE: tl.constexpr, BLOCK_M: tl.constexpr):
    """The first query row of step i of a key block's walk over query blocks
    first, first + BLOCK_M, ... (steps of them). ROTATE (the atomic-dQ
    backward): each key block starts at its own query block and wraps round.
    The grid runs a head's key blocks at once, and walking from one start
    they would add into the same dQ rows at the same moments."""
    if ROTATE:
        i = (i + key_block) % steps
    return first + i * BLOCK_M


@triton.jit
def _bwd_kv_kernel(q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dq_acc_ptr, seed_ptr, mask_ptr,
                   col_span_ptr, sink_ptr, dsink_ptr, sink_slots, cu_seqlens_q, cu_seqlens_k,
                   sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
                   seq_q, seq_k, heads_q, group, smb, smh, smm, smn, sdb, sdh, sdm,
                   sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, qk_scale, cap_log2e, scale, causal_offset, left, right, keep,
                   SQ_BUCKET, SK_BUCKET,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, V_DIM: tl.constexpr, BLOCK_DV: tl.constexpr,
                   CAUSAL: tl.constexpr, WINDOW: tl.constexpr, DROPOUT: tl.constexpr, MASK: tl.constexpr,
                   SOFTCAP: tl.constexpr, SINK: tl.constexpr, VARLEN: tl.constexpr, ATOMIC_DQ: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV of one key block of one key head, summed over its query heads.
    With ATOMIC_DQ, also each query block's share of dQ, dS K (unscaled),
    atomically added into dq_acc, fp32, rows as lse's, HEAD_DIM contiguous.
    With SINK, each query head's share of its sink's gradient (before the
    sign): sum over rows i of P_sink_i * sum over these keys j of P_ij dP_ij
    (D_i, summed in fp32 from the tiles, exact where rowsum(dO * O) sees O
    rounded), into dsink_ptr[b, h, key block] (sink_slots per head)."""
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
    lo, hi = 0, tl.where(start_n < seq_k, seq_q, 0)  # no queries for a block past the keys (a packed batch's)
    if CAUSAL:  # queries before start_n - causal_offset see none of these keys
        lo = tl.maximum(start_n - causal_offset, 0) // BLOCK_M * BLOCK_M
    if WINDOW:  # query i sees keys i + causal_offset - left .. i + causal_offset + right
        lo = tl.maximum(lo, tl.maximum(start_n - causal_offset - right, 0) // BLOCK_M * BLOCK_M)
        hi = tl.maximum(tl.minimum(hi, start_n + BLOCK_N - causal_offset + left), 0)
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
            row = _stats_start(b, h, heads_q, rows_q, first_q, VARLEN) + offs_m
            do = _load_tile(dout_ptr + b * sdb + h * sdh + first_q * sdm, offs_m, sdm, offs_dv, seq_q, V_DIM)
            shift, p_scale = _row_stats(lse_ptr, row, offs_m < seq_q, MASK)
            delta = tl.load(delta_ptr + row, mask=offs_m < seq_q, other=0.0)
            # transposed tiles, [BLOCK_N, BLOCK_M]: keys along rows
            s_t, t_t = _soft_capped(dot(k, tl.trans(q)) * qk_scale, SOFTCAP, cap_log2e)
            if MASK:
                s_t = _masked_scores(s_t, mask_ptr, b * smb + h * smh, offs_n, smn, offs_m, smm, seq_k, seq_q, MASK)
            visible_t = tl.trans(_visible(offs_m, offs_n, seq_q, seq_k, CAUSAL, causal_offset, WINDOW, left, right))
            p_t = tl.where(visible_t, _recomputed_p(s_t, shift[None, :], p_scale[None, :], MASK), 0.0)
            dp_t = dot(v, tl.trans(do))
            if DROPOUT:
                kept_t = tl.trans(_dropout_keep(seed_ptr, bh, offs_m, start_n, seq_k, keep, BLOCK_M, BLOCK_N))
                dv += dot(round_to(tl.where(kept_t, p_t / keep, 0.0), do.dtype), do)
                dp_t = tl.where(kept_t, dp_t / keep, 0.0)
            else:
                dv += dot(round_to(p_t, do.dtype), do)
            if SINK:  # the sink's P of each row, from its base-2 logit as the keys' are
                sink2 = tl.load(sink_ptr + h).to(tl.float32) * 1.4426950408889634
                p_sink = _recomputed_p(sink2 + tl.zeros([BLOCK_M], tl.float32), shift, p_scale, MASK)
                sink_share += tl.sum(p_t * dp_t, 0) * p_sink
            ds_exact = p_t * (dp_t - delta[None, :])
            if SOFTCAP:
                ds_exact = ds_exact * (1.0 - t_t * t_t)
            ds_t = round_to(ds_exact, q.dtype)
            dk += dot(ds_t, q)
            if DROPOUT or MASK:  # dS as hi + lo (_low_part): with dropout its terms cancel, a bias makes P peaky
                ds_lo_t = _low_part(ds_exact, ds_t)
                dk += dot(ds_lo_t, q)
            if ATOMIC_DQ:
                dq_part = dot(tl.trans(ds_t), k)
                if DROPOUT or MASK:
                    dq_part += dot(tl.trans(ds_lo_t), k)
                tl.atomic_add(dq_acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], dq_part,
                              mask=(offs_m[:, None] < seq_q) & d_ok[None, :], sem="relaxed")
        if SINK:
            tl.store(dsink_ptr + bh * sink_slots + tl.program_id(0), tl.sum(sink_share, 0))
    tl.store(dk_ptr + b * sdkb + hk * sdkh + (first_k + offs_n[:, None]) * sdkn + offs_d[None, :],
             round_to(dk * scale, dk_ptr.dtype.element_ty), mask=(offs_n[:, None] < seq_k) & d_ok[None, :])
    tl.store(dv_ptr + b * sdvb + hk * sdvh + (first_k + offs_n[:, None]) * sdvn + offs_dv[None, :],
             round_to(dv, dv_ptr.dtype.element_ty), mask=(offs_n[:, None] < seq_k) & (offs_dv[None, :] < V_DIM))


_DQ_KEY = ["HEAD_DIM", "V_DIM", "SQ_BUCKET", "SK_BUCKET", "CAUSAL", "WINDOW", "DROPOUT", "MASK", "SOFTCAP", "VARLEN"]
_BWD_KEY = _DQ_KEY + ["SINK"]  # the sink's gradient is summed in the dK/dV pass: the dQ kernel has no SINK
# Timing a config adds into dq_acc, and leaves sink shares in the slots of its key blocks, which a
# config of wider blocks does not overwrite: the autotuner zeroes both before each run (and the last).
_bwd_dkdv_kernel = ChosenConfigs(triton.autotune(configs=_configs("bwd"), key=_BWD_KEY, reset_to_zero=["dsink_ptr"])(
    _bwd_kv_kernel))
_bwd_dkdv_dq_kernel = ChosenConfigs(triton.autotune(configs=_configs("bwd"), key=_BWD_KEY,
                                                    reset_to_zero=["dq_acc_ptr", "dsink_ptr"])(_bwd_kv_kernel))
# the narrowest key block of any config: the most key blocks, so sink slots, a head can have
_MIN_BLOCK_N = min(c.kwargs["BLOCK_N"] for c in _configs("bwd"))


@ChosenConfigs
@triton.autotune(configs=_configs("bwd"), key=_DQ_KEY)
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
    start_m, h, b, bh, hk, offs_m = _query_block(heads_q, group, BLOCK_M)
    rows_q = seq_q
    first_q, seq_q, first_k, seq_k, causal_offset = _sequence(cu_seqlens_q, cu_seqlens_k, b, seq_q, seq_k,
                                                              causal_offset, VARLEN)
    row = _stats_start(b, h, heads_q, rows_q, first_q, VARLEN) + offs_m
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
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, skn, offs_d, seq_k, HEAD_DIM)
        v = _load_tile(v_base, offs_n, svn, offs_dv, seq_k, V_DIM)
        s, t = _soft_capped(dot(q, tl.trans(k)) * qk_scale, SOFTCAP, cap_log2e)
        if MASK:
            s = _masked_scores(s, mask_ptr, mask_off, offs_m, smm, offs_n, smn, seq_q, seq_k, MASK)
        p = tl.where(_visible(offs_m, offs_n, seq_q, seq_k, CAUSAL, causal_offset, WINDOW, left, right),
                     _recomputed_p(s, shift[:, None], p_scale[:, None], MASK), 0.0)
        dp = dot(do, tl.trans(v))
        if DROPOUT:
            dp = tl.where(_dropout_keep(seed_ptr, bh, offs_m, start_n, seq_k, keep, BLOCK_M, BLOCK_N), dp / keep, 0.0)
        ds_exact = p * (dp - delta[:, None])
        if SOFTCAP:
            ds_exact = ds_exact * (1.0 - t * t)
        ds = round_to(ds_exact, k.dtype)
        dq += dot(ds, k)
        if DROPOUT or MASK:
            dq += dot(_low_part(ds_exact, ds), k)
    tl.store(dq_ptr + b * sdqb + h * sdqh + (first_q + offs_m[:, None]) * sdqm + offs_d[None, :],
             round_to(dq * scale, dq_ptr.dtype.element_ty), mask=q_mask)


def flash_attn_bwd(dout, q, k, v, out, lse, scale: float, causal: bool, causal_offset: int, deterministic: bool,
                   dq=None, dk=None, dv=None, dropout_p: float = 0.0, seed=None, mask=None, window=None,
                   softcap: float = 0.0, sinks=None, packed=None, out_lo=None):
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
    out_lo, the forward's third output where it has one: D from out + out_lo."""
    q, k, v, mask, args, _, meta, buckets = _prepare(q, k, v, causal, dropout_p, mask, softcap, packed)
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
    with on_device(q):
        # 64 rows, fewer past a head dim of 128: a program's two [rows, BLOCK_DV] fp32 tiles in 128
        # threads' registers (at a head dim of 129-256 that 16 does not divide, 136 or 200, 64 rows spill
        # 28 B a thread; d256 nothing either way)
        block = 16 if _INTERPRET else min(64, 8192 // meta["BLOCK_DV"])
        # delta is per row: a packed batch's rows are those of one long sequence
        _bwd_delta_kernel[(cdiv(seq_q, block), heads_q, stats_batch)](
            out, out_lo, dout, delta, *out.stride()[:3], *(out if out_lo is None else out_lo).stride()[:3],
            *dout_strides, seq_q, heads_q, V_DIM=meta["V_DIM"], BLOCK_DV=meta["BLOCK_DV"], BLOCK_M=block,
            LOW_PART=out_lo is not None)
        if not deterministic:
            dq_acc = torch.zeros((stats_batch, *q.shape[1:]), dtype=torch.float32, device=q.device)
            _bwd_dkdv_dq_kernel.launch(grid_kv, key, q, k, v, dout, lse, delta, dk, dv, dq_acc, seed, mask, spans,
                                       *sink_args, *cu_seqlens, *args, *dout_strides, *dk.stride()[:3],
                                       *dv.stride()[:3], *tail, ATOMIC_DQ=True, **meta)
            torch.mul(dq_acc, scale, out=dq[:stats_batch])
        else:
            _bwd_dkdv_kernel.launch(grid_kv, key, q, k, v, dout, lse, delta, dk, dv, None, seed, mask, spans,
                                    *sink_args, *cu_seqlens, *args, *dout_strides, *dk.stride()[:3],
                                    *dv.stride()[:3], *tail, ATOMIC_DQ=False, **meta)
            meta.pop("SINK")
            grid_q = lambda m: (cdiv(rows_q, m["BLOCK_M"]), heads_q, batch)  # noqa: E731
            _bwd_dq_kernel.launch(grid_q, key, q, k, v, dout, lse, delta, dq, seed, mask, row_spans(mask),
                                  *cu_seqlens, *args, *dout_strides, *dq.stride()[:3], *tail, **meta)
    return (dq, dk, dv) if sinks is None else (dq, dk, dv, -sink_args[1].sum((0, 2)))


@functools.lru_cache(maxsize=None)
def _no_sink_shares(device):
    """The sink-shares argument of a backward with no sinks: one zero per device, allocated once."""
    return torch.zeros(1, dtype=torch.float32, device=device)
