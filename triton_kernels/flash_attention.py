"""FlashAttention forward and backward in Triton (FlashAttention-2 scheme).

Shapes: q (B, Hq, Sq, D); k, v (B, Hkv, Sk, D), Hq a multiple of Hkv (query
head h reads key head h // (Hq / Hkv): GQA/MQA with no copies). Any strides
with a unit last stride. out (B, Hq, Sq, D) contiguous; lse (B, Hq, Sq) fp32,
natural log. Causal: key j is visible to query i iff j <= i + causal_offset
(0: top-left, as torch's SDPA; Sk - Sq: bottom-right, as FlashAttention).
A row that sees no key gets out = 0, lse = -inf and zero gradients.

Forward, per block of queries, over blocks of keys (never an S x S tensor):
    s = q k^T * scale * log2(e)              (base-2 logits: exp2 is one instruction)
    m' = max(m, rowmax(s));  p = exp2(s - m')
    l' = l * exp2(m - m') + rowsum(p)        (rescale what was summed so far)
    acc' = acc * exp2(m - m') + p v
    out = acc / l;  lse = (m + log2 l) / log2(e)
Backward, with P recomputed from lse: D_i = rowsum(dO * O) (a first pass), then
    dV = P^T dO;  dP = dO V^T;  dS = P * (dP - D);  dQ = scale dS K;  dK = scale dS^T Q
dK and dV are accumulated per key block over every query block and every
query head of its group; dQ per query block over every key block. No atomics:
the backward is deterministic (same bits run to run) always.
"""
import os

import torch
import triton
import triton.language as tl

from ._utils import dot, on_device, to_out

LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs(kind):
    """Block sizes to try on a GPU; one small fixed shape under the interpreter."""
    if _INTERPRET:
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=1, num_stages=1)]
    if kind == "fwd":
        shapes = [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 32, 4, 2)]
    else:
        shapes = [(64, 64, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2), (32, 32, 4, 1)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in shapes]


def _seq_bucket(n):
    """Autotune key: sequence lengths rounded up to a power of two."""
    return triton.next_power_of_2(max(int(n), 1))


@triton.jit
def _visible(offs_m, offs_n, seq_q, seq_k, CAUSAL: tl.constexpr, causal_offset):
    """[M, N] mask of (query, key) pairs that exist and that the mask lets through."""
    ok = (offs_m[:, None] < seq_q) & (offs_n[None, :] < seq_k)
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
    return ok


@triton.jit
def _load_tile(base, offs_rows, row_stride, offs_d, n_rows, HEAD_DIM: tl.constexpr):
    """[rows, BLOCK_D] tile of a (rows, HEAD_DIM) matrix with unit column stride; zeros outside."""
    mask = (offs_rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM)
    return tl.load(base + offs_rows[:, None] * row_stride + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _keys_end(start_m, seq_k, causal_offset, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """One past the last key that a query block starting at start_m can see."""
    if CAUSAL:
        return tl.maximum(tl.minimum(seq_k, start_m + BLOCK_M + causal_offset), 0)
    return seq_k


@triton.jit
def _attend(q, k, v, m_i, l_i, acc, offs_m, offs_n, seq_q, seq_k, qk_scale, causal_offset, CAUSAL: tl.constexpr):
    """One key block of the online softmax: (m, l, acc) updated with keys offs_n."""
    s = dot(q, tl.trans(k)) * qk_scale
    s = tl.where(_visible(offs_m, offs_n, seq_q, seq_k, CAUSAL, causal_offset), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _finish(m_i, l_i, acc):
    """(out, lse) of the rows once every key block is in; rows that saw no key get (0, -inf)."""
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    return out, lse


@triton.autotune(configs=_configs("fwd"), key=["HEAD_DIM", "SQ_BUCKET", "SK_BUCKET", "CAUSAL"])
@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr,
                sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
                seq_q, seq_k, heads_q, group, qk_scale, causal_offset,
                SQ_BUCKET, SK_BUCKET,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // heads_q, bh % heads_q
    hk = h // group
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(q_ptr + b * sqb + h * sqh, offs_m, sqm, offs_d, seq_q, HEAD_DIM)
    k_base = k_ptr + b * skb + hk * skh
    v_base = v_ptr + b * svb + hk * svh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, _keys_end(start_m, seq_k, causal_offset, CAUSAL, BLOCK_M), BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, skn, offs_d, seq_k, HEAD_DIM)
        v = _load_tile(v_base, offs_n, svn, offs_d, seq_k, HEAD_DIM)
        m_i, l_i, acc = _attend(q, k, v, m_i, l_i, acc, offs_m, offs_n, seq_q, seq_k, qk_scale,
                                causal_offset, CAUSAL)

    out, lse = _finish(m_i, l_i, acc)
    row = bh * seq_q + offs_m
    tl.store(out_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], to_out(out, out_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM))
    tl.store(lse_ptr + row, lse, mask=offs_m < seq_q)


@triton.jit
def _bwd_delta_kernel(out_ptr, dout_ptr, delta_ptr, rows,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O), over contiguous (rows, HEAD_DIM) out and dout."""
    offs_m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < rows) & (offs_d[None, :] < HEAD_DIM)
    idx = offs_m[:, None] * HEAD_DIM + offs_d[None, :]
    o = tl.load(out_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(dout_ptr + idx, mask=mask, other=0.0).to(tl.float32)
    tl.store(delta_ptr + offs_m, tl.sum(o * do, 1), mask=offs_m < rows)


@triton.jit
def _load_lse2(lse_ptr, row, mask):
    """lse in base 2; rows that saw no key get +inf so that their P is 0."""
    lse = tl.load(lse_ptr + row, mask=mask, other=0.0)
    return tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)


@triton.autotune(configs=_configs("bwd"), key=["HEAD_DIM", "SQ_BUCKET", "SK_BUCKET", "CAUSAL"])
@triton.jit
def _bwd_dkdv_kernel(q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr,
                     sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
                     seq_q, seq_k, heads_q, group, qk_scale, scale, causal_offset,
                     SQ_BUCKET, SK_BUCKET,
                     HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV of one key block of one key head, summed over its query heads."""
    start_n = tl.program_id(0) * BLOCK_N
    bhk = tl.program_id(1).to(tl.int64)
    heads_k = heads_q // group
    b, hk = bhk // heads_k, bhk % heads_k
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    k = _load_tile(k_ptr + b * skb + hk * skh, offs_n, skn, offs_d, seq_k, HEAD_DIM)
    v = _load_tile(v_ptr + b * svb + hk * svh, offs_n, svn, offs_d, seq_k, HEAD_DIM)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    lo = 0
    if CAUSAL:  # queries before start_n - causal_offset see none of these keys
        lo = tl.maximum(start_n - causal_offset, 0) // BLOCK_M * BLOCK_M
    for g in range(group):
        h = hk * group + g
        bh = b * heads_q + h
        for start_m in range(lo, seq_q, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = _load_tile(q_ptr + b * sqb + h * sqh, offs_m, sqm, offs_d, seq_q, HEAD_DIM)
            row = bh * seq_q + offs_m
            do = _load_tile(dout_ptr + bh * seq_q * HEAD_DIM, offs_m, HEAD_DIM, offs_d, seq_q, HEAD_DIM)
            lse2 = _load_lse2(lse_ptr, row, offs_m < seq_q)
            delta = tl.load(delta_ptr + row, mask=offs_m < seq_q, other=0.0)
            # transposed tiles, [BLOCK_N, BLOCK_M]: keys along rows
            s_t = dot(k, tl.trans(q)) * qk_scale
            visible_t = tl.trans(_visible(offs_m, offs_n, seq_q, seq_k, CAUSAL, causal_offset))
            p_t = tl.where(visible_t, tl.exp2(s_t - lse2[None, :]), 0.0)
            dv += dot(p_t.to(do.dtype), do)
            dp_t = dot(v, tl.trans(do))
            ds_t = p_t * (dp_t - delta[None, :])
            dk += dot(ds_t.to(q.dtype), q)
    out_mask = (offs_n[:, None] < seq_k) & d_ok[None, :]
    idx = (bhk * seq_k + offs_n)[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(dk_ptr + idx, to_out(dk * scale, dk_ptr.dtype.element_ty), mask=out_mask)
    tl.store(dv_ptr + idx, to_out(dv, dv_ptr.dtype.element_ty), mask=out_mask)


@triton.autotune(configs=_configs("bwd"), key=["HEAD_DIM", "SQ_BUCKET", "SK_BUCKET", "CAUSAL"])
@triton.jit
def _bwd_dq_kernel(q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr,
                   sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
                   seq_q, seq_k, heads_q, group, qk_scale, scale, causal_offset,
                   SQ_BUCKET, SK_BUCKET,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of one query block, over every key block it sees."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1).to(tl.int64)
    b, h = bh // heads_q, bh % heads_q
    hk = h // group
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_mask = (offs_m[:, None] < seq_q) & d_ok[None, :]
    q = _load_tile(q_ptr + b * sqb + h * sqh, offs_m, sqm, offs_d, seq_q, HEAD_DIM)
    row = bh * seq_q + offs_m
    do = _load_tile(dout_ptr + bh * seq_q * HEAD_DIM, offs_m, HEAD_DIM, offs_d, seq_q, HEAD_DIM)
    lse2 = _load_lse2(lse_ptr, row, offs_m < seq_q)
    delta = tl.load(delta_ptr + row, mask=offs_m < seq_q, other=0.0)
    k_base = k_ptr + b * skb + hk * skh
    v_base = v_ptr + b * svb + hk * svh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, _keys_end(start_m, seq_k, causal_offset, CAUSAL, BLOCK_M), BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, skn, offs_d, seq_k, HEAD_DIM)
        v = _load_tile(v_base, offs_n, svn, offs_d, seq_k, HEAD_DIM)
        s = dot(q, tl.trans(k)) * qk_scale
        p = tl.where(_visible(offs_m, offs_n, seq_q, seq_k, CAUSAL, causal_offset),
                     tl.exp2(s - lse2[:, None]), 0.0)
        dp = dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dq += dot(ds.to(k.dtype), k)
    tl.store(dq_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], to_out(dq * scale, dq_ptr.dtype.element_ty),
             mask=q_mask)


def _unit_last_stride(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _block_d(head_dim):
    return max(16, triton.next_power_of_2(head_dim))


def _prepare(q, k, v, causal):
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    batch, heads_q, seq_q, head_dim = q.shape
    heads_k, seq_k = k.shape[1], k.shape[2]
    args = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), seq_q, seq_k, heads_q, heads_q // heads_k)
    meta = dict(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), CAUSAL=bool(causal))
    buckets = (_seq_bucket(seq_q), _seq_bucket(seq_k))
    return q, k, v, args, meta, buckets


def flash_attn_fwd(q, k, v, scale: float, causal: bool, causal_offset: int, out=None, lse=None):
    """(out, lse) of attention; `out`/`lse` may be passed in (poisoned, by tests)."""
    q, k, v, args, meta, buckets = _prepare(q, k, v, causal)
    batch, heads_q, seq_q, head_dim = q.shape
    out = torch.empty((batch, heads_q, seq_q, head_dim), dtype=q.dtype, device=q.device) if out is None else out
    lse = torch.empty((batch, heads_q, seq_q), dtype=torch.float32, device=q.device) if lse is None else lse
    if out.numel() == 0:
        return out, lse
    if k.shape[2] == 0:  # no keys at all: every row sees none
        return out.zero_(), lse.fill_(float("-inf"))
    grid = lambda meta_: (triton.cdiv(seq_q, meta_["BLOCK_M"]), batch * heads_q)  # noqa: E731
    with on_device(q):
        _fwd_kernel[grid](q, k, v, out, lse, *args, scale * LOG2E, causal_offset, *buckets, **meta)
    return out, lse


def flash_attn_bwd(dout, q, k, v, out, lse, scale: float, causal: bool, causal_offset: int,
                   dq=None, dk=None, dv=None):
    """(dq, dk, dv); deterministic. Gradients may be passed in (poisoned, by tests)."""
    q, k, v, args, meta, buckets = _prepare(q, k, v, causal)
    batch, heads_q, seq_q, head_dim = q.shape
    heads_k, seq_k = k.shape[1], k.shape[2]
    dout, out = dout.contiguous(), out.contiguous()
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device) if dq is None else dq
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device) if dk is None else dk
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device) if dv is None else dv
    if seq_q == 0 or seq_k == 0 or batch * heads_q == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    rows = batch * heads_q * seq_q
    delta = torch.empty(rows, dtype=torch.float32, device=q.device)
    with on_device(q):
        block = 16 if _INTERPRET else 64
        _bwd_delta_kernel[(triton.cdiv(rows, block),)](out, dout, delta, rows, HEAD_DIM=head_dim,
                                                       BLOCK_D=meta["BLOCK_D"], BLOCK_M=block)
        grid_kv = lambda m: (triton.cdiv(seq_k, m["BLOCK_N"]), batch * heads_k)  # noqa: E731
        _bwd_dkdv_kernel[grid_kv](q, k, v, dout, lse, delta, dk, dv, *args, scale * LOG2E, scale,
                                  causal_offset, *buckets, **meta)
        grid_q = lambda m: (triton.cdiv(seq_q, m["BLOCK_M"]), batch * heads_q)  # noqa: E731
        _bwd_dq_kernel[grid_q](q, k, v, dout, lse, delta, dq, *args, scale * LOG2E, scale,
                               causal_offset, *buckets, **meta)
    return dq, dk, dv
