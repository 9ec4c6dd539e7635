"""The backward's per-tile math, shared by its pointer kernels (backward.py)
and its descriptor kernels (backward_tma.py), which differ only in how
tiles reach them: one (query block, key block) tile of dK, dV (and of dQ
by atomics), or of dQ."""
import triton
import triton.language as tl

from .._utils import dot, round_to
from .tiles import _dropout_keep, _low_part, _masked_scores, _soft_capped, _visible


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
def _kv_step(dk, dv, sink_share, k, v, q, do, row, offs_m, offs_n, start_n, h, bh, lse_ptr, delta_ptr, dq_acc_ptr,
             sink_ptr, seed_ptr, mask_ptr, mask_off, smm, smn, dmask_ptr, seq_q, seq_k, qk_scale, cap_log2e,
             causal_offset, left, right, keep, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
             WINDOW: tl.constexpr, DROPOUT: tl.constexpr, MASK: tl.constexpr, SOFTCAP: tl.constexpr,
             SINK: tl.constexpr, DMASK: tl.constexpr, ATOMIC_DQ: tl.constexpr, BLOCK_M: tl.constexpr,
             BLOCK_N: tl.constexpr):
    """(dk, dv, sink_share) with one query block's tile of a key block added
    (q, do: its rows offs_m, stats at `row`; k, v: keys offs_n), in
    transposed tiles [BLOCK_N, BLOCK_M], keys along rows. With ATOMIC_DQ,
    also the tile's dS K (unscaled) added into dq_acc (fp32, rows as lse's,
    HEAD_DIM contiguous). With SINK, sink_share gains, per row, P_sink *
    sum over these keys of P dP (the sink's gradient before its sign).
    With DMASK, the tile's gradient of the additive mask goes to dmask_ptr,
    (B, Hq, Sq, Sk) contiguous: the mask is added to the logits after the
    scale and the soft cap, so its gradient is dS = P (dP - D) itself, before
    the cap's derivative (and 0 where P is)."""
    shift, p_scale = _row_stats(lse_ptr, row, offs_m < seq_q, MASK)
    delta = tl.load(delta_ptr + row, mask=offs_m < seq_q, other=0.0)
    s_t, t_t = _soft_capped(dot(k, tl.trans(q)) * qk_scale, SOFTCAP, cap_log2e)
    if MASK:
        s_t = _masked_scores(s_t, mask_ptr, mask_off, offs_n, smn, offs_m, smm, seq_k, seq_q, MASK)
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
    if DMASK:
        tl.store(dmask_ptr + bh * seq_q * seq_k + offs_m.to(tl.int64)[None, :] * seq_k + offs_n[:, None],
                 round_to(ds_exact, dmask_ptr.dtype.element_ty),
                 mask=(offs_m[None, :] < seq_q) & (offs_n[:, None] < seq_k))
    if SOFTCAP:
        ds_exact = ds_exact * (1.0 - t_t * t_t)
    ds_t = round_to(ds_exact, q.dtype)
    dk += dot(ds_t, q)
    if DROPOUT or MASK or HEAD_DIM < 16:  # dS as hi + lo (_low_part)
        ds_lo_t = _low_part(ds_exact, ds_t)
        dk += dot(ds_lo_t, q)
    if ATOMIC_DQ:
        dq_part = dot(tl.trans(ds_t), k)
        if DROPOUT or MASK or HEAD_DIM < 16:
            dq_part += dot(tl.trans(ds_lo_t), k)
        offs_d = tl.arange(0, BLOCK_D)
        tl.atomic_add(dq_acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], dq_part,
                      mask=(offs_m[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM), sem="relaxed")
    return dk, dv, sink_share


@triton.jit
def _p_and_dp(q, do, k, v, shift, p_scale, offs_m, start_n, bh, seed_ptr, mask_ptr, mask_off, smm, smn, seq_q, seq_k,
              qk_scale, cap_log2e, causal_offset, left, right, keep, CAUSAL: tl.constexpr, WINDOW: tl.constexpr,
              DROPOUT: tl.constexpr, MASK: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """(P, dP, t) of the tile of query rows offs_m and keys start_n..,
    recomputed: P from the rows' stats (_row_stats), dP = dO V^T with the
    forward's dropout (dP / keep where kept, 0 where dropped), and t, the
    soft cap's tanh (_soft_capped; unused without SOFTCAP)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    s, t = _soft_capped(dot(q, tl.trans(k)) * qk_scale, SOFTCAP, cap_log2e)
    if MASK:
        s = _masked_scores(s, mask_ptr, mask_off, offs_m, smm, offs_n, smn, seq_q, seq_k, MASK)
    p = tl.where(_visible(offs_m, offs_n, seq_q, seq_k, CAUSAL, causal_offset, WINDOW, left, right),
                 _recomputed_p(s, shift[:, None], p_scale[:, None], MASK), 0.0)
    dp = dot(do, tl.trans(v))
    if DROPOUT:
        dp = tl.where(_dropout_keep(seed_ptr, bh, offs_m, start_n, seq_k, keep, BLOCK_M, BLOCK_N), dp / keep, 0.0)
    return p, dp, t


@triton.jit
def _dq_step(dq, q, do, k, v, shift, p_scale, delta, offs_m, start_n, bh, seed_ptr, mask_ptr, mask_off, smm, smn,
             seq_q, seq_k, qk_scale, cap_log2e, causal_offset, left, right, keep, HEAD_DIM: tl.constexpr,
             CAUSAL: tl.constexpr, WINDOW: tl.constexpr, DROPOUT: tl.constexpr, MASK: tl.constexpr,
             SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dq (unscaled) with the tile of keys start_n.. added: dS K, S, P and dP recomputed."""
    p, dp, t = _p_and_dp(q, do, k, v, shift, p_scale, offs_m, start_n, bh, seed_ptr, mask_ptr, mask_off, smm, smn,
                         seq_q, seq_k, qk_scale, cap_log2e, causal_offset, left, right, keep, CAUSAL, WINDOW,
                         DROPOUT, MASK, SOFTCAP, BLOCK_M, BLOCK_N)
    ds_exact = p * (dp - delta[:, None])
    if SOFTCAP:
        ds_exact = ds_exact * (1.0 - t * t)
    ds = round_to(ds_exact, k.dtype)
    dq += dot(ds, k)
    if DROPOUT or MASK or HEAD_DIM < 16:
        dq += dot(_low_part(ds_exact, ds), k)
    return dq
