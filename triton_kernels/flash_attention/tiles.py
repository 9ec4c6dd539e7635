"""Per-tile device helpers of the attention kernels, forward and backward:
which (query, key) pairs exist and are visible, a tile's mask and dropout,
the keys a query block reads."""
import triton
import triton.language as tl

from .._utils import round_to, tanh


@triton.jit
def _visible(offs_m, offs_n, seq_q, seq_k, CAUSAL: tl.constexpr, causal_offset, WINDOW: tl.constexpr, left, right):
    """[M, N] mask of (query, key) pairs that exist and that causality (key
    j <= i + causal_offset) and a local window (i + causal_offset - left
    <= j <= i + causal_offset + right) let through."""
    ok = (offs_m[:, None] < seq_q) & (offs_n[None, :] < seq_k)
    if CAUSAL:
        ok = ok & (offs_n[None, :] <= offs_m[:, None] + causal_offset)
    if WINDOW:
        diagonal = offs_m[:, None] + causal_offset
        ok = ok & (offs_n[None, :] >= diagonal - left) & (offs_n[None, :] <= diagonal + right)
    return ok


@triton.jit
def _soft_capped(x, SOFTCAP: tl.constexpr, cap_log2e):
    """(s, t) of a tile's x = q k^T * qk_scale. Without SOFTCAP, s = x, the
    base-2 logits (qk_scale = scale * log2(e)), and t is unused. With a soft
    cap c (Gemma 2's; qk_scale = scale / c, cap_log2e = c * log2(e)):
    t = tanh(x), s = t * cap_log2e, the base-2 logits of c tanh(q k^T scale / c);
    the backward multiplies dS by their derivative in q k^T scale, 1 - t^2."""
    if SOFTCAP:
        t = tanh(x)
        return t * cap_log2e, t
    return x, x


@triton.jit
def _query_block(heads_q, group, cu_seqlens_q, cu_seqlens_k, seq_q, seq_k, causal_offset, VARLEN: tl.constexpr,
                 BLOCK_M: tl.constexpr):
    """This program's query block, of grid (query blocks, query heads, batch),
    in its sequence: (start_m, h, b, bh = b * Hq + h, its key head hk, offs_m,
    then _sequence's first_q, seq_q, first_k, seq_k, causal_offset, then
    `row`, its rows' index in lse and delta), ids int64."""
    start_m = tl.program_id(0) * BLOCK_M
    h, b = tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    rows_q = seq_q
    first_q, seq_q, first_k, seq_k, causal_offset = _sequence(cu_seqlens_q, cu_seqlens_k, b, seq_q, seq_k,
                                                              causal_offset, VARLEN)
    row = _stats_start(b, h, heads_q, rows_q, first_q, VARLEN) + offs_m
    return start_m, h, b, b * heads_q + h, h // group, offs_m, first_q, seq_q, first_k, seq_k, causal_offset, row


@triton.jit
def _sequence(cu_seqlens_q, cu_seqlens_k, b, seq_q, seq_k, causal_offset, VARLEN: tl.constexpr):
    """(first query row, Sq, first key row, Sk, causal_offset) of batch entry
    b. With VARLEN (a packed batch, varlen.py): sequence b's, query rows
    cu_seqlens_q[b] .. cu_seqlens_q[b + 1] - 1 of the tensor all sequences
    share (keys by cu_seqlens_k), causal bottom-right within it, as
    FlashAttention's varlen; else all rows from 0, and the caller's offset.
    (One return: the compiler types every return of a function, even one in
    a branch a constexpr rules out.)"""
    if VARLEN:
        first_q, first_k = tl.load(cu_seqlens_q + b).to(tl.int64), tl.load(cu_seqlens_k + b).to(tl.int64)
        seq_q = (tl.load(cu_seqlens_q + b + 1) - first_q).to(tl.int32)
        seq_k = (tl.load(cu_seqlens_k + b + 1) - first_k).to(tl.int32)
        causal_offset = seq_k - seq_q
    else:
        first_q, first_k = 0, 0
    return first_q, seq_q, first_k, seq_k, causal_offset


@triton.jit
def _stats_start(b, h, heads_q, rows, first, VARLEN: tl.constexpr):
    """Index in lse (and delta, dq's fp32 buffer by rows) of query `first`
    of (batch b, head h): (B, Hq, rows) dense; (Hq, total rows) packed."""
    if VARLEN:
        return h * rows + first
    return (b * heads_q + h) * rows


@triton.jit
def _load_tile(base, offs_rows, row_stride, offs_d, n_rows, HEAD_DIM: tl.constexpr):
    """[rows, BLOCK_D] tile of a (rows, HEAD_DIM) matrix with unit column stride; zeros outside."""
    mask = (offs_rows[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM)
    return tl.load(base + offs_rows[:, None] * row_stride + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _key_block(k_base, v_base, start_n, skn, svn, offs_d, offs_dv, seq_k, HEAD_DIM: tl.constexpr,
               V_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """(k, v): the tiles of keys start_n.. that a query block's walk visits (_load_tile)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    return (_load_tile(k_base, offs_n, skn, offs_d, seq_k, HEAD_DIM),
            _load_tile(v_base, offs_n, svn, offs_dv, seq_k, V_DIM))


@triton.jit
def _keys_end(start_m, seq_k, causal_offset, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr):
    """One past the last key that a query block starting at start_m can see."""
    if CAUSAL:
        return tl.maximum(tl.minimum(seq_k, start_m + BLOCK_M + causal_offset), 0)
    return seq_k


@triton.jit
def _key_range(start_m, seq_q, seq_k, causal_offset, WINDOW: tl.constexpr, left, right, row_span_ptr, bh,
               CAUSAL: tl.constexpr, MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(first, end) of the keys a query block starting at start_m visits:
    (0, _keys_end), within its rows' local window (WINDOW), and with a
    boolean mask (MASK 1) from the key block of its rows' first attended key
    to their last (see mask_spans.row_spans); none for a block past the
    queries. first is a multiple of BLOCK_N, as the dropout mask's counter
    needs."""
    start = 0
    end = _keys_end(start_m, seq_k, causal_offset, CAUSAL, BLOCK_M)
    if WINDOW:
        start = tl.maximum(start_m + causal_offset - left, 0) // BLOCK_N * BLOCK_N
        end = tl.maximum(tl.minimum(end, start_m + BLOCK_M + causal_offset + right), 0)
    if MASK == 1:
        offs_m = start_m + tl.arange(0, BLOCK_M)
        spans = row_span_ptr + (bh * seq_q + offs_m) * 2
        start = tl.maximum(start, tl.min(tl.load(spans, mask=offs_m < seq_q, other=seq_k)) // BLOCK_N * BLOCK_N)
        end = tl.minimum(end, tl.max(tl.load(spans + 1, mask=offs_m < seq_q, other=0)))
    return start, tl.where(start_m < seq_q, end, start)  # none past the queries (a packed batch's short ones)


@triton.jit
def _query_range(start_n, seq_q, seq_k, causal_offset, CAUSAL: tl.constexpr, WINDOW: tl.constexpr, left, right,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(first, end) of the queries that can see a key block starting at
    start_n, the backward's walk: first a multiple of BLOCK_M, from the
    first row causality (queries before start_n - causal_offset see none of
    these keys) and a local window let through; none for a block past the
    keys (a packed batch's short ones)."""
    first, end = 0, tl.where(start_n < seq_k, seq_q, 0)
    if CAUSAL:
        first = tl.maximum(start_n - causal_offset, 0) // BLOCK_M * BLOCK_M
    if WINDOW:  # query i sees keys i + causal_offset - left .. i + causal_offset + right
        first = tl.maximum(first, tl.maximum(start_n - causal_offset - right, 0) // BLOCK_M * BLOCK_M)
        end = tl.maximum(tl.minimum(end, start_n + BLOCK_N - causal_offset + left), 0)
    return first, end


@triton.jit
def _dropout_keep(seed_ptr, bh, offs_m, start_n, seq_k, keep, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_M, BLOCK_N] dropout mask of keys start_n.. (a multiple of 4),
    True where P is kept: Philox uniforms < keep, under the key seed + bh
    (a stream per (batch, head)). One Philox call (10 rounds of 32-bit
    products) gives four uniforms, those of keys 4j..4j+3 of query m, at
    counter m * ceil(Sk / 4) + j (int32: the host keeps Sq * Sk below 2^31):
    a function of (m, n) alone, so every kernel and block size draws the
    same mask."""
    counter = offs_m[:, None] * ((seq_k + 3) // 4) + (start_n // 4 + tl.arange(0, BLOCK_N // 4))[None, :]
    r0, r1, r2, r3 = tl.rand4x(tl.load(seed_ptr) + bh, counter)
    # [M, N/4, 2, 2] indexed [m, j, a, b] = r_{2a+b}, so row-major key 4j + 2a + b
    uniform = tl.reshape(tl.join(tl.join(r0, r2), tl.join(r1, r3)), (BLOCK_M, BLOCK_N))
    return uniform < keep


BIAS_FLOOR = tl.constexpr(-2.35e38)  # times log2(e), just inside float32's range (-3.4e38)


@triton.jit
def _masked_scores(s, mask_ptr, mask_off, rows, row_stride, cols, col_stride, n_rows, n_cols, MASK: tl.constexpr):
    """Base-2 logits s with the attention mask of these (rows, cols) applied.
    MASK 1, boolean: -inf where False. MASK 2, additive: plus bias * log2(e),
    a finite bias raised to BIAS_FLOOR first so that it stays finite (-3.4e38
    rather than -inf; finfo(float32).min is past it): a row that finite bias
    masks everywhere is then an even average, as in torch."""
    inside = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)
    offsets = mask_off + rows.to(tl.int64)[:, None] * row_stride + cols.to(tl.int64)[None, :] * col_stride
    if MASK == 1:
        s = tl.where(tl.load(mask_ptr + offsets, mask=inside, other=0) != 0, s, float("-inf"))
    else:
        bias = tl.load(mask_ptr + offsets, mask=inside, other=float("-inf")).to(tl.float32)
        floored = tl.maximum(bias, BIAS_FLOOR, propagate_nan=tl.PropagateNan.ALL)
        s = s + tl.where(bias == float("-inf"), float("-inf"), floored * 1.4426950408889634)
    return s


@triton.jit
def _low_part(x, hi):
    """What rounding fp32 x to hi's dtype left out, in that dtype: hi + lo
    holds x to about 16 significant bits. Two uses where 8 bits cost the
    gradients the rule (DESIGN.md section 4), each where P can be peaky:
    - dS of the dropout and masked backwards goes to the tensor cores as hi
      + lo (two products instead of one). With dropout, dS's dropped terms
      (-P D) and kept ones (P (dP / keep - D)) cancel in dK and dQ; with a
      mask, a bias makes P peaky and a few large dS terms carry dQ and dK.
      One rounding of dS put dq or dk past the rule in about 1 of 250
      random cases. Head dims under 16 too: there dK and dQ are sums of few
      large terms, each carrying dS's rounding (a dk past the rule in CI at
      head dim 4), and the kernels pad the head dim to 16 anyway, so the
      second product is small.
    - The dropout, masked, capped and sink forwards store out's lo beside
      out (forward.stores_low_part), and the backward's D = rowsum(dO * O)
      reads hi + lo. For a nearly one-hot row the dominant key's dP - D is
      a small difference of near-equal terms, so O's rounding in D became
      a large relative error in that dS: in 80 random cases of a normal
      bias of spread 2, the worst dk went from 0.84 of the rule's bound to
      0.49. With dropout a row that
      sees one key has O = v / keep exactly, which its dtype rounds, where
      v alone it would not: that row's dq, 0, came out at up to 1.5 times
      the bound; with a cap or sinks, random small cases came out at up
      to 2.4 times it (benchmarks/NOTES.md)."""
    return round_to(x - hi.to(tl.float32), hi.dtype)
