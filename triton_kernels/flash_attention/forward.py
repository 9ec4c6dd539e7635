"""The attention forward: the online softmax over key blocks, through
pointers (_fwd_kernel) or tensor descriptors (_fwd_tma_kernel, TMA on
sm_90 and up), and the choice between the two."""
import math

import torch
import triton
import triton.language as tl

from .._utils import FMA, cdiv, dot, on_device, round_to
from ..chosen_configs import ChosenConfigs, autotune
from .launch import _configs, _cu_seqlens, _logit_scales, _prepare, _tuning_key, _window_bounds, empty_out
from . import loads
from .loads import descriptor, forward_loads
from .mask_spans import row_spans
from .tiles import (_dropout_keep, _key_block, _key_range, _keys_end, _load_tile, _low_part, _masked_scores,
                    _query_block, _soft_capped, _visible)

def _fitting_configs(configs, named_args, **kwargs):
    """The descriptor forward's configs whose buffers fit in shared memory (at
    least the smallest). Per program, in tiles of the input dtype: Q, and
    num_stages buffers of K and of V (the TMA pipeline's ring; O's store
    reuses Q's space); warp specialisation adds two more [BLOCK_M, BLOCK_D]
    tiles for the hand-off between its warp groups; plus 1 KiB of barriers.
    Checked against the compiler's own figure for every config
    (tests/triton_compile_check.py): exact to within that KiB for Triton 3.6
    and 3.8 at head dims 64, 128 and 256. With a value head dim BLOCK_DV
    other than BLOCK_D, the Q, O and hand-off tiles are counted at the wider
    of the two (an upper bound: the compile check holds every kept config to
    the limit).
    The pointer kernels have no such prune: their buffers depend on how the
    compiler pipelines cp.async, and the autotuner skips a config that does
    not launch for want of shared memory."""
    def need(c):
        m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        d, dv = kwargs["BLOCK_D"], kwargs["BLOCK_DV"]
        elements = m * (3 if c.kwargs["WARP_SPECIALIZE"] else 1) * max(d, dv) + c.num_stages * n * (d + dv)
        return elements * named_args["q_desc"].base.element_size() + 1024
    return loads.fitting(configs, named_args["q_desc"].base, need)


@triton.jit
def _attend(q, k, v, m_i, l_i, acc, offs_m, start_n, seq_q, seq_k, qk_scale, SOFTCAP: tl.constexpr, cap_log2e,
            causal_offset, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, left, right, DROPOUT: tl.constexpr, seed_ptr,
            bh, keep, MASK: tl.constexpr, mask_ptr, mask_off, smm, smn, BLOCK_M: tl.constexpr,
            BLOCK_N: tl.constexpr):
    """One key block of the online softmax: (m, l, acc) updated with keys
    start_n..; with SOFTCAP, the logits soft-capped (_soft_capped); with
    DROPOUT, acc sums the kept P only (out divides by keep); with MASK, the
    scores masked after the cap (_masked_scores), as Gemma 2 applies them."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    s, _ = _soft_capped(dot(q, tl.trans(k)) * qk_scale, SOFTCAP, cap_log2e)
    if MASK:
        s = _masked_scores(s, mask_ptr, mask_off, offs_m, smm, offs_n, smn, seq_q, seq_k, MASK)
    s = tl.where(_visible(offs_m, offs_n, seq_q, seq_k, CAUSAL, causal_offset, WINDOW, left, right), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        p = tl.where(_dropout_keep(seed_ptr, bh, offs_m, start_n, seq_k, keep, BLOCK_M, BLOCK_N), p, 0.0)
    acc = acc * alpha[:, None] + dot(round_to(p, v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _softmax_start(sink_ptr, h, SINK: tl.constexpr, BLOCK_M: tl.constexpr):
    """(m, l) of each row before any key: (-inf, 0); with SINK, head h's sink
    counted as a key of its own with value 0, seen first: m its base-2
    logit, l = exp2(m - m) = 1 (so out and lse include it)."""
    if SINK:
        m_i = tl.full([BLOCK_M], 0.0, tl.float32) + tl.load(sink_ptr + h).to(tl.float32) * 1.4426950408889634
        l_i = tl.full([BLOCK_M], 1.0, tl.float32)
    else:
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
    return m_i, l_i


@triton.jit
def _finish(m_i, l_i, acc):
    """(out, lse) of the rows once every key block is in; rows that saw no key get (0, -inf)."""
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    return out, lse


@ChosenConfigs
@autotune(configs=_configs("fwd"), key=["HEAD_DIM", "V_DIM", "SQ_BUCKET", "SK_BUCKET", "CAUSAL", "WINDOW",
                                        "DROPOUT", "MASK", "SOFTCAP", "SINK", "VARLEN", "LOW_PART"])
@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, out_ptr, out_lo_ptr, lse_ptr, seed_ptr, mask_ptr, row_span_ptr, sink_ptr,
                cu_seqlens_q, cu_seqlens_k,
                sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
                seq_q, seq_k, heads_q, group, smb, smh, smm, smn, sob, soh, som, qk_scale, cap_log2e,
                causal_offset, left, right, keep, SQ_BUCKET, SK_BUCKET,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, V_DIM: tl.constexpr, BLOCK_DV: tl.constexpr,
                CAUSAL: tl.constexpr, WINDOW: tl.constexpr, DROPOUT: tl.constexpr, MASK: tl.constexpr,
                SOFTCAP: tl.constexpr, SINK: tl.constexpr, VARLEN: tl.constexpr, LOW_PART: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The forward through pointers. With MASK, lse_ptr takes each row's
    (m, l), the stats the masked backward reads (see the module docstring),
    and with LOW_PART out_lo_ptr (out's strides) what rounding out left out
    (_low_part, stores_low_part).
    With SINK, head h's sink logit sink_ptr[h] starts each row's softmax.
    With VARLEN, batch entry b is sequence b of a packed batch (varlen.py)."""
    start_m, h, b, bh, hk, offs_m, first_q, seq_q, first_k, seq_k, causal_offset, stats = _query_block(
        heads_q, group, cu_seqlens_q, cu_seqlens_k, seq_q, seq_k, causal_offset, VARLEN, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_tile(q_ptr + b * sqb + h * sqh + first_q * sqm, offs_m, sqm, offs_d, seq_q, HEAD_DIM)
    k_base = k_ptr + b * skb + hk * skh + first_k * skn
    v_base = v_ptr + b * svb + hk * svh + first_k * svn
    mask_off = b * smb + h * smh

    m_i, l_i = _softmax_start(sink_ptr, h, SINK, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    first, end = _key_range(start_m, seq_q, seq_k, causal_offset, WINDOW, left, right, row_span_ptr, bh, CAUSAL,
                            MASK, BLOCK_M, BLOCK_N)
    for start_n in range(first, end, BLOCK_N):
        k, v = _key_block(k_base, v_base, start_n, skn, svn, offs_d, offs_dv, seq_k, HEAD_DIM, V_DIM, BLOCK_N)
        m_i, l_i, acc = _attend(q, k, v, m_i, l_i, acc, offs_m, start_n, seq_q, seq_k, qk_scale, SOFTCAP, cap_log2e,
                                causal_offset, CAUSAL, WINDOW, left, right, DROPOUT, seed_ptr, bh, keep, MASK,
                                mask_ptr, mask_off, smm, smn, BLOCK_M, BLOCK_N)

    if DROPOUT:
        acc = acc / keep
    out, lse = _finish(m_i, l_i, acc)
    out_offs = b * sob + h * soh + (first_q + offs_m[:, None]) * som + offs_dv[None, :]
    out_mask = (offs_m[:, None] < seq_q) & (offs_dv[None, :] < V_DIM)
    out_hi = round_to(out, out_ptr.dtype.element_ty)
    tl.store(out_ptr + out_offs, out_hi, mask=out_mask)
    if LOW_PART:
        tl.store(out_lo_ptr + out_offs, _low_part(out, out_hi), mask=out_mask)
    if MASK:
        tl.store(lse_ptr + stats * 2, m_i, mask=offs_m < seq_q)
        tl.store(lse_ptr + stats * 2 + 1, l_i, mask=offs_m < seq_q)
    else:
        tl.store(lse_ptr + stats, lse, mask=offs_m < seq_q)


@ChosenConfigs
@autotune(configs=_configs("fwd_tma"), key=["HEAD_DIM", "V_DIM", "SQ_BUCKET", "SK_BUCKET", "CAUSAL", "SOFTCAP", "SINK",
                                            "LOW_PART"],
          prune_configs_by={"early_config_prune": _fitting_configs})
@triton.jit
def _fwd_tma_kernel(q_desc, k_desc, v_desc, out_desc, lse_ptr, sink_ptr, out_lo_ptr, sob, soh, som,
                    seq_q, seq_k, heads_q, group, qk_scale, cap_log2e, causal_offset,
                    SQ_BUCKET, SK_BUCKET,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, V_DIM: tl.constexpr, BLOCK_DV: tl.constexpr,
                    CAUSAL: tl.constexpr, SOFTCAP: tl.constexpr, SINK: tl.constexpr, LOW_PART: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    """The forward with Q, K, V read and O written through 4-D tensor descriptors
    (B, H, S, D) with boxes [1, 1, rows, BLOCK_D] (BLOCK_DV for V and O): TMA on sm_90. The hardware
    bounds each box by the tensor's extents, per head: rows past S and columns
    past D read as zeros (what the padded dot needs) and are not written, so
    no masks, and no address arithmetic per element. Box coordinates are int32
    (what TMA takes); only the lse and out_lo pointers need int64 offsets.
    With LOW_PART, out_lo_ptr (out's strides sob, soh, som) takes
    what rounding out left out (_low_part, stores_low_part), through
    pointers."""
    start_m = tl.program_id(0) * BLOCK_M
    h, b = tl.program_id(1), tl.program_id(2)
    bh = b * heads_q + h
    hk = h // group
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = q_desc.load([b, h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)

    m_i, l_i = _softmax_start(sink_ptr, h, SINK, BLOCK_M)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    end = _keys_end(start_m, seq_k, causal_offset, CAUSAL, BLOCK_M)
    for start_n in tl.range(0, end, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        k = k_desc.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        v = v_desc.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_DV)
        m_i, l_i, acc = _attend(q, k, v, m_i, l_i, acc, offs_m, start_n, seq_q, seq_k, qk_scale, SOFTCAP,
                                cap_log2e, causal_offset, CAUSAL, False, 0, 0, False, lse_ptr, bh, 1.0, 0, lse_ptr,
                                0, 0, 0, BLOCK_M, BLOCK_N)  # no window, no dropout, no mask

    out, lse = _finish(m_i, l_i, acc)
    out_hi = round_to(out, out_desc.dtype)
    out_desc.store([b, h, start_m, 0], out_hi.reshape(1, 1, BLOCK_M, BLOCK_DV))
    tl.store(lse_ptr + bh.to(tl.int64) * seq_q + offs_m, lse, mask=offs_m < seq_q)
    if LOW_PART:
        offs_dv = tl.arange(0, BLOCK_DV)
        out_offs = b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m[:, None] * som + offs_dv[None, :]
        tl.store(out_lo_ptr + out_offs, _low_part(out, out_hi),
                 mask=(offs_m[:, None] < seq_q) & (offs_dv[None, :] < V_DIM))


def peaky_scale(scale: float, head_dim: int) -> bool:
    """A softmax scale at least twice the default 1/sqrt(head_dim): logits
    spread twice as wide as unit-variance q and k give at the default, so
    rows of P can be nearly one-hot on any data. The rule's tail showed
    from there (2.3x, 2.8x, 12.6x the default; benchmarks/NOTES.md, "a tail
    of test_custom_scale"); below it, as at the default, plain attention
    keeps no out_lo, as FlashAttention (DeepSeek-V3's YaRN scale, 1.9x, and
    heads zero-padded to a multiple of 8, at most 1.13x from 25 on, among them)."""
    return scale * math.sqrt(head_dim) >= 2.0


def stores_low_part(dropout_p: float, mask, softcap: float, sinks, scale: float, head_dim: int) -> bool:
    """Whether flash_attn_fwd writes out_lo beside out, for the backward's
    D = rowsum(dO * (out + out_lo)): with dropout, a mask, a soft cap, sinks
    or a scale twice the default (peaky_scale), each of which can leave a
    row with few keys or a peaky P, where out's rounding in D costs dq and
    dk the rule (tiles._low_part). Not for plain attention at scales below
    that: out_lo costs a saved out-sized tensor per call."""
    return dropout_p > 0 or mask is not None or softcap > 0 or sinks is not None or peaky_scale(scale, head_dim)


def flash_attn_fwd(q, k, v, scale: float, causal: bool, causal_offset: int, out=None, lse=None,
                   dropout_p: float = 0.0, seed=None, mask=None, window=None, softcap: float = 0.0, sinks=None,
                   packed=None, out_lo=None):
    """(out, lse) of attention; `out`/`lse` may be passed in (poisoned, by tests).
    dropout_p > 0 needs `seed`, a one-element int64 tensor on q's device.
    `mask` (boolean or additive, broadcastable to (B, Hq, Sq, Sk)) makes the
    second output each row's (m, l), (B, Hq, Sq, 2), in place of lse.
    Dropout, a mask, a soft cap, sinks or a scale of 2/sqrt(D) or more add a third output, out_lo: what
    rounding out to its dtype left out, in that dtype and out's strides
    (tiles._low_part, stores_low_part), for flash_attn_bwd's delta (may be
    passed in, as out).
    `window` (left, right): a local window; softcap > 0, a logit soft cap;
    `sinks` (Hq,), attention sinks (see the package docstring). `packed`
    (a launch.Packed): q, k, v are a packed batch's views, out and lse
    given (varlen.py). Dropout, masks, windows and packed batches run the
    pointer forward."""
    q, k, v, mask, args, sizes, meta, buckets = _prepare(q, k, v, causal, dropout_p, mask, softcap, packed)
    left, right = _window_bounds(window, q, k)
    batch, heads_q, seq_q, head_dim = q.shape
    out = empty_out(q, v.shape[3]) if out is None else out
    if lse is None:
        stats_shape = (batch, heads_q, seq_q) + ((2,) if meta["MASK"] else ())
        lse = torch.empty(stats_shape, dtype=torch.float32, device=q.device)
    low_part = stores_low_part(dropout_p, mask, softcap, sinks, scale, head_dim)
    if low_part and out_lo is None:  # in out's strides: the kernel writes both with them
        out_lo = torch.empty_strided(out.shape, out.stride(), dtype=out.dtype, device=out.device)
    outputs = (out, lse, out_lo) if low_part else (out, lse)
    if out.numel() == 0:
        return outputs
    if k.shape[2] == 0:  # no keys at all: every row sees none (but its sink)
        start = float("-inf") if sinks is None else sinks.float().view(1, -1, 1)
        if meta["MASK"]:  # (m, l) = (-inf, 0), or (sink * log2(e), 1)
            lse[..., 0], lse[..., 1] = start * 1.4426950408889634, 0.0 if sinks is None else 1.0
        else:
            lse.copy_(torch.broadcast_to(torch.as_tensor(start, device=lse.device), lse.shape))
        out.zero_()
        if low_part:
            out_lo.zero_()
        return outputs
    rows = packed.max_seqlen_q if packed else seq_q
    grid = lambda meta_: (cdiv(rows, meta_["BLOCK_M"]), heads_q, batch)  # noqa: E731
    key = _tuning_key(buckets, q, mask, sinks)
    with on_device(q):
        sink = None if sinks is None else sinks.contiguous()
        if not meta["DROPOUT"] and not meta["MASK"] and window is None and packed is None and \
                forward_loads(q, k, v, out) == "descriptor":
            meta.pop("DROPOUT"), meta.pop("MASK"), meta.pop("VARLEN")
            _fwd_tma_kernel.launch(grid, key, *(descriptor(t) for t in (q, k, v, out)), lse, sink, out_lo,
                                   *out.stride()[:3], *sizes,
                                   *_logit_scales(scale, softcap), causal_offset, *buckets, SINK=sinks is not None,
                                   LOW_PART=low_part, **meta, **FMA)
        else:
            _fwd_kernel.launch(grid, key, q, k, v, out, out_lo, lse, seed, mask, row_spans(mask), sink,
                               *_cu_seqlens(packed), *args, *out.stride()[:3],
                               *_logit_scales(scale, softcap), causal_offset, left, right, 1.0 - dropout_p, *buckets,
                               WINDOW=window is not None, SINK=sinks is not None, LOW_PART=low_part, **meta,
                               **FMA)
    return outputs
