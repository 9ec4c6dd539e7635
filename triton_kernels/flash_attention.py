"""FlashAttention forward and backward in Triton (FlashAttention-2 scheme).

Shapes: q (B, Hq, Sq, D); k, v (B, Hkv, Sk, D), Hq a multiple of Hkv (query
head h reads key head h // (Hq / Hkv): GQA/MQA with no copies). Any strides
with a unit last stride, dout's too. out (B, Hq, Sq, D) in q's memory order
(as torch's flash SDPA: for q a (B, S, H, D) view, out is one too, so the
caller's out.transpose(1, 2).contiguous() copies nothing); lse (B, Hq, Sq)
fp32, natural log. Causal: key j is visible to query i iff j <= i + causal_offset
(0: top-left, as torch's SDPA; Sk - Sq: bottom-right, as FlashAttention).
A row that sees no key gets out = 0, lse = -inf and zero gradients.
Dropout (dropout_p > 0): each P element is kept with probability
keep = 1 - dropout_p and scaled by 1 / keep; the keep mask is drawn from
Philox (four uniforms per call, see _dropout_keep) under the key
seed + (b * Hq + h), the seed a device tensor (so torch's RNG, CUDA graphs
and torch.compile handle it): the backward draws the same mask, never
stored. lse is that of the undropped P.
Mask (SDPA's attn_mask, broadcast to (B, Hq, Sq, Sk), any strides): boolean
(False: the key is not attended) or additive (added to the scores, in fp32).
The masked kernels keep each row's max m and sum l apart, (B, Hq, Sq, 2) fp32
in place of lse: a row masked everywhere with a huge finite value (finfo.min,
as HF writes masks) has m near -3.4e38, where m + log2(l) would lose l, and
the backward's P = exp2(s - m) / l needs it.

Forward, per block of queries, over blocks of keys (never an S x S tensor):
    s = q k^T * scale * log2(e)              (base-2 logits: exp2 is one instruction)
    m' = max(m, rowmax(s));  p = exp2(s - m')
    l' = l * exp2(m - m') + rowsum(p)        (rescale what was summed so far)
    acc' = acc * exp2(m - m') + p v
    out = acc / l;  lse = (m + log2 l) / log2(e)
Backward, with P recomputed from lse: D_i = rowsum(dO * O) (a first pass), then
    dV = P^T dO;  dP = dO V^T;  dS = P * (dP - D);  dQ = scale dS K;  dK = scale dS^T Q
With dropout, Z = mask / keep: O = (P Z) V, so dV = (P Z)^T dO and dP = (dO V^T) Z;
D = rowsum(dO * O) is still rowsum(P * dP), and dS = P * (dP - D) as before.
dK and dV are accumulated per key block over every query block and every
query head of its group (GQA without atomics). dQ two ways (flash_attn_bwd's
`deterministic`):
  False: in the same pass, each tile's dS K added into an fp32 dQ buffer with
    atomics (5 matmuls per tile), then scaled and converted to dq's dtype. The
    order of the additions, so dQ's last bits, vary run to run.
  True: a second kernel per query block over every key block, which computes
    S, P and dP again (7 matmuls per tile); same bits run to run.

Two forwards compute the same thing: _fwd_kernel loads tiles through pointers
(masked loads; Ampere, and the fallback), _fwd_tma_kernel through tensor
descriptors (TMA copies on sm_90 and up, pipelined and optionally warp
specialised). forward_loads() picks one per call (use_loads() and
$PYEXT_TRITON_ATTN_LOADS override it); the backward uses pointers.
"""
import contextlib
import os

import torch
import triton
import triton.language as tl

from ._utils import dot, on_device, round_to

try:  # host-side tensor descriptors (Triton 3.4 on): TMA on sm_90 and up
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:
    TensorDescriptor = None

LOG2E = 1.4426950408889634
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _configs(kind):
    """Block sizes to try on a GPU; one small fixed shape under the interpreter.
    "fwd_tma" (the descriptor forward) also says whether its key loop is warp
    specialised, and sets each config's descriptor boxes before a launch."""
    if _INTERPRET:
        shapes = [(16, 16, 1, 1, False)]
    elif kind == "fwd":
        shapes = [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 128, 8, 2), (64, 32, 4, 2)]
    elif kind == "fwd_tma":  # (BLOCK_M, BLOCK_N, warps, stages, warp-specialised)
        # Warp specialisation (the key loop split into a TMA producer partition
        # and the consumer's math) only with 4 warps and 64 rows: with 8 warps
        # Triton 3.6 and 3.8 leave the loop unspecialised, and with 128 rows on
        # 4 warps their Hopper pass fails to compile (NVGPUWarpSpecialization).
        shapes = [(128, 64, 8, 3, False), (128, 128, 8, 2, False), (64, 64, 4, 3, False), (128, 32, 4, 4, False),
                  (64, 64, 4, 3, True), (64, 128, 4, 2, True), (64, 32, 4, 4, True)]
    else:
        shapes = [(64, 64, 4, 2), (32, 64, 4, 2), (64, 32, 4, 2), (128, 64, 8, 2), (32, 32, 4, 1)]
    if kind != "fwd_tma":
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s, *_ in shapes]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "WARP_SPECIALIZE": ws}, num_warps=w, num_stages=s,
                          pre_hook=_set_boxes) for m, n, w, s, ws in shapes]


def _set_boxes(nargs):
    """Descriptor boxes of the config about to run: [1, 1, rows, BLOCK_D]."""
    q_box = [1, 1, nargs["BLOCK_M"], nargs["BLOCK_D"]]
    kv_box = [1, 1, nargs["BLOCK_N"], nargs["BLOCK_D"]]
    nargs["q_desc"].block_shape = nargs["out_desc"].block_shape = q_box
    nargs["k_desc"].block_shape = nargs["v_desc"].block_shape = kv_box


def _shared_memory_limit(t):
    """Bytes of shared memory one program may use on t's GPU; None off a GPU."""
    return torch.cuda.get_device_properties(t.device).shared_memory_per_block_optin if t.is_cuda else None


def _fitting_configs(configs, named_args, **kwargs):
    """The descriptor forward's configs whose buffers fit in shared memory (at
    least the smallest). Per program, in [rows, BLOCK_D] tiles of the input
    dtype: Q, and num_stages buffers of K and of V (the TMA pipeline's ring;
    O's store reuses Q's space); warp specialisation adds two more
    [BLOCK_M, BLOCK_D] tiles for the hand-off between its warp groups; plus
    1 KiB of barriers. Checked against the compiler's own figure for every
    config (tests/triton_compile_check.py): exact to within that KiB for
    Triton 3.6 and 3.8 at head dims 64, 128 and 256.
    The pointer kernels have no such prune: their buffers depend on how the
    compiler pipelines cp.async, and the autotuner skips a config that does
    not launch for want of shared memory."""
    limit = _shared_memory_limit(named_args["q_desc"].base)
    if limit is None:
        return configs

    def need(c):
        m, n = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
        rows = m * (3 if c.kwargs["WARP_SPECIALIZE"] else 1) + 2 * c.num_stages * n
        return rows * kwargs["BLOCK_D"] * named_args["q_desc"].base.element_size() + 1024
    return [c for c in configs if need(c) <= limit] or [min(configs, key=need)]


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
def _keys_end_masked(start_m, seq_q, seq_k, causal_offset, row_end_ptr, bh, CAUSAL: tl.constexpr, MASK: tl.constexpr,
                     BLOCK_M: tl.constexpr):
    """_keys_end, and with a boolean mask (MASK 1) no further than the
    block's last attended key (row_end, see _mask_bounds)."""
    end = _keys_end(start_m, seq_k, causal_offset, CAUSAL, BLOCK_M)
    if MASK == 1:
        offs_m = start_m + tl.arange(0, BLOCK_M)
        end = tl.minimum(end, tl.max(tl.load(row_end_ptr + bh * seq_q + offs_m, mask=offs_m < seq_q, other=0)))
    return end


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
def _attend(q, k, v, m_i, l_i, acc, offs_m, start_n, seq_q, seq_k, qk_scale, causal_offset, CAUSAL: tl.constexpr,
            DROPOUT: tl.constexpr, seed_ptr, bh, keep, MASK: tl.constexpr, mask_ptr, mask_off, smm, smn,
            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """One key block of the online softmax: (m, l, acc) updated with keys
    start_n..; with DROPOUT, acc sums the kept P only (out divides by keep);
    with MASK, the scores masked first (_masked_scores)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    s = dot(q, tl.trans(k)) * qk_scale
    if MASK:
        s = _masked_scores(s, mask_ptr, mask_off, offs_m, smm, offs_n, smn, seq_q, seq_k, MASK)
    s = tl.where(_visible(offs_m, offs_n, seq_q, seq_k, CAUSAL, causal_offset), s, float("-inf"))
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
def _finish(m_i, l_i, acc):
    """(out, lse) of the rows once every key block is in; rows that saw no key get (0, -inf)."""
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) / 1.4426950408889634, float("-inf"))
    return out, lse


@triton.autotune(configs=_configs("fwd"), key=["HEAD_DIM", "SQ_BUCKET", "SK_BUCKET", "CAUSAL", "DROPOUT", "MASK"])
@triton.jit
def _fwd_kernel(q_ptr, k_ptr, v_ptr, out_ptr, lse_ptr, seed_ptr, mask_ptr, row_end_ptr,
                sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
                seq_q, seq_k, heads_q, group, smb, smh, smm, smn, sob, soh, som, qk_scale, causal_offset, keep,
                SQ_BUCKET, SK_BUCKET,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The forward through pointers. With MASK, lse_ptr takes each row's
    (m, l), the stats the masked backward reads (see the module docstring)."""
    start_m = tl.program_id(0) * BLOCK_M
    h, b = tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)  # grid (query blocks, heads, batch)
    bh = b * heads_q + h
    hk = h // group
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(q_ptr + b * sqb + h * sqh, offs_m, sqm, offs_d, seq_q, HEAD_DIM)
    k_base = k_ptr + b * skb + hk * skh
    v_base = v_ptr + b * svb + hk * svh
    mask_off = b * smb + h * smh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, _keys_end_masked(start_m, seq_q, seq_k, causal_offset, row_end_ptr, bh, CAUSAL, MASK,
                                             BLOCK_M), BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, skn, offs_d, seq_k, HEAD_DIM)
        v = _load_tile(v_base, offs_n, svn, offs_d, seq_k, HEAD_DIM)
        m_i, l_i, acc = _attend(q, k, v, m_i, l_i, acc, offs_m, start_n, seq_q, seq_k, qk_scale, causal_offset,
                                CAUSAL, DROPOUT, seed_ptr, bh, keep, MASK, mask_ptr, mask_off, smm, smn, BLOCK_M,
                                BLOCK_N)

    if DROPOUT:
        acc = acc / keep
    out, lse = _finish(m_i, l_i, acc)
    tl.store(out_ptr + b * sob + h * soh + offs_m[:, None] * som + offs_d[None, :],
             round_to(out, out_ptr.dtype.element_ty), mask=(offs_m[:, None] < seq_q) & (offs_d[None, :] < HEAD_DIM))
    if MASK:
        tl.store(lse_ptr + (bh * seq_q + offs_m) * 2, m_i, mask=offs_m < seq_q)
        tl.store(lse_ptr + (bh * seq_q + offs_m) * 2 + 1, l_i, mask=offs_m < seq_q)
    else:
        tl.store(lse_ptr + bh * seq_q + offs_m, lse, mask=offs_m < seq_q)


@triton.autotune(configs=_configs("fwd_tma"), key=["HEAD_DIM", "SQ_BUCKET", "SK_BUCKET", "CAUSAL"],
                 prune_configs_by={"early_config_prune": _fitting_configs})
@triton.jit
def _fwd_tma_kernel(q_desc, k_desc, v_desc, out_desc, lse_ptr,
                    seq_q, seq_k, heads_q, group, qk_scale, causal_offset,
                    SQ_BUCKET, SK_BUCKET,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, WARP_SPECIALIZE: tl.constexpr):
    """The forward with Q, K, V read and O written through 4-D tensor descriptors
    (B, H, S, D) with boxes [1, 1, rows, BLOCK_D]: TMA on sm_90. The hardware
    bounds each box by the tensor's extents, per head: rows past S and columns
    past D read as zeros (what the padded dot needs) and are not written, so
    no masks, and no address arithmetic per element. Box coordinates are int32
    (what TMA takes); only the lse pointer needs int64 offsets."""
    start_m = tl.program_id(0) * BLOCK_M
    h, b = tl.program_id(1), tl.program_id(2)
    bh = b * heads_q + h
    hk = h // group
    offs_m = start_m + tl.arange(0, BLOCK_M)
    q = q_desc.load([b, h, start_m, 0]).reshape(BLOCK_M, BLOCK_D)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    end = _keys_end(start_m, seq_k, causal_offset, CAUSAL, BLOCK_M)
    for start_n in tl.range(0, end, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        k = k_desc.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        v = v_desc.load([b, hk, start_n, 0]).reshape(BLOCK_N, BLOCK_D)
        m_i, l_i, acc = _attend(q, k, v, m_i, l_i, acc, offs_m, start_n, seq_q, seq_k, qk_scale,
                                causal_offset, CAUSAL, False, lse_ptr, bh, 1.0, 0, lse_ptr, 0, 0, 0,
                                BLOCK_M, BLOCK_N)  # no dropout, no mask

    out, lse = _finish(m_i, l_i, acc)
    out_desc.store([b, h, start_m, 0], round_to(out, out_desc.dtype).reshape(1, 1, BLOCK_M, BLOCK_D))
    tl.store(lse_ptr + bh.to(tl.int64) * seq_q + offs_m, lse, mask=offs_m < seq_q)


@triton.jit
def _bwd_delta_kernel(out_ptr, dout_ptr, delta_ptr, sob, soh, som, sdb, sdh, sdm, seq_q, heads_q,
                      HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta = rowsum(dO * O) of one block of query rows of one (batch, head),
    into a contiguous (B, Hq, Sq) delta."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    h, b = tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)  # grid (query blocks, heads, batch)
    bh = b * heads_q + h
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(out_ptr + b * sob + h * soh, offs_m, som, offs_d, seq_q, HEAD_DIM).to(tl.float32)
    do = _load_tile(dout_ptr + b * sdb + h * sdh, offs_m, sdm, offs_d, seq_q, HEAD_DIM).to(tl.float32)
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
def _low_part(x, hi):
    """What rounding fp32 x to hi's dtype left out, in that dtype. With
    dropout, dS's dropped terms (-P D) and kept ones (P (dP / keep - D))
    cancel in dK and dQ, so one rounding of dS to 8 bits costs more of the
    result than without: there dS goes to the tensor cores as hi + lo (about
    16 significant bits, two products instead of one)."""
    return round_to(x - hi.to(tl.float32), hi.dtype)


@triton.jit
def _bwd_kv_kernel(q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dk_ptr, dv_ptr, dq_acc_ptr, seed_ptr, mask_ptr,
                   col_start_ptr,
                   sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
                   seq_q, seq_k, heads_q, group, smb, smh, smm, smn, sdb, sdh, sdm,
                   sdkb, sdkh, sdkn, sdvb, sdvh, sdvn, qk_scale, scale, causal_offset, keep,
                   SQ_BUCKET, SK_BUCKET,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                   MASK: tl.constexpr, ATOMIC_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dK, dV of one key block of one key head, summed over its query heads.
    With ATOMIC_DQ, also each query block's share of dQ, dS K (unscaled),
    atomically added into dq_acc, fp32 (B, Hq, Sq, HEAD_DIM) contiguous."""
    start_n = tl.program_id(0) * BLOCK_N
    hk, b = tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)  # grid (key blocks, key heads, batch)
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
        first = lo
        if MASK == 1:  # no query block before the keys' first attending row (col_start, see _mask_bounds)
            attending = tl.load(col_start_ptr + bh * seq_k + offs_n, mask=offs_n < seq_k, other=seq_q)
            first = tl.maximum(lo, tl.min(attending) // BLOCK_M * BLOCK_M)
        for start_m in range(first, seq_q, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            q = _load_tile(q_ptr + b * sqb + h * sqh, offs_m, sqm, offs_d, seq_q, HEAD_DIM)
            row = bh * seq_q + offs_m
            do = _load_tile(dout_ptr + b * sdb + h * sdh, offs_m, sdm, offs_d, seq_q, HEAD_DIM)
            shift, p_scale = _row_stats(lse_ptr, row, offs_m < seq_q, MASK)
            delta = tl.load(delta_ptr + row, mask=offs_m < seq_q, other=0.0)
            # transposed tiles, [BLOCK_N, BLOCK_M]: keys along rows
            s_t = dot(k, tl.trans(q)) * qk_scale
            if MASK:
                s_t = _masked_scores(s_t, mask_ptr, b * smb + h * smh, offs_n, smn, offs_m, smm, seq_k, seq_q, MASK)
            visible_t = tl.trans(_visible(offs_m, offs_n, seq_q, seq_k, CAUSAL, causal_offset))
            p_t = tl.where(visible_t, _recomputed_p(s_t, shift[None, :], p_scale[None, :], MASK), 0.0)
            dp_t = dot(v, tl.trans(do))
            if DROPOUT:
                kept_t = tl.trans(_dropout_keep(seed_ptr, bh, offs_m, start_n, seq_k, keep, BLOCK_M, BLOCK_N))
                dv += dot(round_to(tl.where(kept_t, p_t / keep, 0.0), do.dtype), do)
                dp_t = tl.where(kept_t, dp_t / keep, 0.0)
            else:
                dv += dot(round_to(p_t, do.dtype), do)
            ds_exact = p_t * (dp_t - delta[None, :])
            ds_t = round_to(ds_exact, q.dtype)
            dk += dot(ds_t, q)
            if DROPOUT:
                ds_lo_t = _low_part(ds_exact, ds_t)
                dk += dot(ds_lo_t, q)
            if ATOMIC_DQ:
                dq_part = dot(tl.trans(ds_t), k)
                if DROPOUT:
                    dq_part += dot(tl.trans(ds_lo_t), k)
                tl.atomic_add(dq_acc_ptr + row[:, None] * HEAD_DIM + offs_d[None, :], dq_part,
                              mask=(offs_m[:, None] < seq_q) & d_ok[None, :], sem="relaxed")
    out_mask = (offs_n[:, None] < seq_k) & d_ok[None, :]
    tl.store(dk_ptr + b * sdkb + hk * sdkh + offs_n[:, None] * sdkn + offs_d[None, :],
             round_to(dk * scale, dk_ptr.dtype.element_ty), mask=out_mask)
    tl.store(dv_ptr + b * sdvb + hk * sdvh + offs_n[:, None] * sdvn + offs_d[None, :],
             round_to(dv, dv_ptr.dtype.element_ty), mask=out_mask)


_BWD_KEY = ["HEAD_DIM", "SQ_BUCKET", "SK_BUCKET", "CAUSAL", "DROPOUT", "MASK"]
_bwd_dkdv_kernel = triton.autotune(configs=_configs("bwd"), key=_BWD_KEY)(_bwd_kv_kernel)
# Timing a config adds into dq_acc: the autotuner zeroes it before each run.
_bwd_dkdv_dq_kernel = triton.autotune(configs=_configs("bwd"), key=_BWD_KEY, reset_to_zero=["dq_acc_ptr"])(
    _bwd_kv_kernel)


@triton.autotune(configs=_configs("bwd"), key=_BWD_KEY)
@triton.jit
def _bwd_dq_kernel(q_ptr, k_ptr, v_ptr, dout_ptr, lse_ptr, delta_ptr, dq_ptr, seed_ptr, mask_ptr, row_end_ptr,
                   sqb, sqh, sqm, skb, skh, skn, svb, svh, svn,
                   seq_q, seq_k, heads_q, group, smb, smh, smm, smn, sdb, sdh, sdm, sdqb, sdqh, sdqm,
                   qk_scale, scale, causal_offset, keep, SQ_BUCKET, SK_BUCKET,
                   HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                   MASK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """dQ of one query block, over every key block it sees."""
    start_m = tl.program_id(0) * BLOCK_M
    h, b = tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)  # grid (query blocks, heads, batch)
    bh = b * heads_q + h
    hk = h // group
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q_mask = (offs_m[:, None] < seq_q) & d_ok[None, :]
    q = _load_tile(q_ptr + b * sqb + h * sqh, offs_m, sqm, offs_d, seq_q, HEAD_DIM)
    row = bh * seq_q + offs_m
    do = _load_tile(dout_ptr + b * sdb + h * sdh, offs_m, sdm, offs_d, seq_q, HEAD_DIM)
    shift, p_scale = _row_stats(lse_ptr, row, offs_m < seq_q, MASK)
    delta = tl.load(delta_ptr + row, mask=offs_m < seq_q, other=0.0)
    k_base = k_ptr + b * skb + hk * skh
    v_base = v_ptr + b * svb + hk * svh
    mask_off = b * smb + h * smh
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, _keys_end_masked(start_m, seq_q, seq_k, causal_offset, row_end_ptr, bh, CAUSAL, MASK,
                                             BLOCK_M), BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, skn, offs_d, seq_k, HEAD_DIM)
        v = _load_tile(v_base, offs_n, svn, offs_d, seq_k, HEAD_DIM)
        s = dot(q, tl.trans(k)) * qk_scale
        if MASK:
            s = _masked_scores(s, mask_ptr, mask_off, offs_m, smm, offs_n, smn, seq_q, seq_k, MASK)
        p = tl.where(_visible(offs_m, offs_n, seq_q, seq_k, CAUSAL, causal_offset),
                     _recomputed_p(s, shift[:, None], p_scale[:, None], MASK), 0.0)
        dp = dot(do, tl.trans(v))
        if DROPOUT:
            dp = tl.where(_dropout_keep(seed_ptr, bh, offs_m, start_n, seq_k, keep, BLOCK_M, BLOCK_N), dp / keep, 0.0)
        ds_exact = p * (dp - delta[:, None])
        ds = round_to(ds_exact, k.dtype)
        dq += dot(ds, k)
        if DROPOUT:
            dq += dot(_low_part(ds_exact, ds), k)
    tl.store(dq_ptr + b * sdqb + h * sdqh + offs_m[:, None] * sdqm + offs_d[None, :],
             round_to(dq * scale, dq_ptr.dtype.element_ty), mask=q_mask)


LOADS_ENV = "PYEXT_TRITON_ATTN_LOADS"
LOADS = ("auto", "pointer", "descriptor")
_loads = None  # set inside use_loads()


def loads_mode():
    """How the forward reads its tiles: use_loads()'s mode, else $PYEXT_TRITON_ATTN_LOADS, else "auto"."""
    mode = _loads or os.environ.get(LOADS_ENV) or "auto"
    if mode not in LOADS:
        raise ValueError(f"{LOADS_ENV}={mode!r}: expected one of {', '.join(LOADS)}")
    return mode


@contextlib.contextmanager
def use_loads(mode: str):
    """Within the block the forward reads tiles `mode`'s way: "auto" (descriptors
    on a GPU of compute capability 9 or more when Triton has them and the
    layouts allow, else pointers), "pointer" (always; the Ampere path), or
    "descriptor" (always; an error where the layouts do not allow; on CPU
    tensors under TRITON_INTERPRET=1 too, which is how the tests run it)."""
    global _loads
    if mode not in LOADS:
        raise ValueError(f"use_loads: mode {mode!r} is not one of {', '.join(LOADS)}")
    previous, _loads = _loads, mode
    try:
        yield
    finally:
        _loads = previous


def _has_tma(t):
    """Whether t lives on a GPU with the Tensor Memory Accelerator (compute capability 9.0 and up)."""
    return t.is_cuda and torch.cuda.get_device_capability(t.device)[0] >= 9


def _descriptor_problem(t):
    """Why TMA cannot address t as a (B, H, S, D) tensor, or None: it needs a
    16-byte aligned base, a unit last stride and the other strides positive
    multiples of 16 bytes (so no broadcast dimension)."""
    size = t.element_size()
    if t.stride(-1) != 1:
        return f"last stride {t.stride(-1)} is not 1"
    if t.data_ptr() % 16:
        return "base address is not 16-byte aligned"
    if any(s <= 0 or s * size % 16 for s in t.stride()[:-1]):
        return f"strides {tuple(t.stride())} of {size}-byte elements are not positive multiples of 16 bytes"
    return None


def forward_loads(q, k, v, out):
    """"descriptor" or "pointer": how flash_attn_fwd reads q, k, v and writes out (see use_loads)."""
    mode = loads_mode()
    if mode == "pointer":
        return "pointer"
    problems = [f"{name}: {why}" for name, t in (("q", q), ("k", k), ("v", v), ("out", out))
                if (why := _descriptor_problem(t)) is not None]
    if mode == "auto":
        return "descriptor" if _has_tma(q) and TensorDescriptor is not None and not problems else "pointer"
    if TensorDescriptor is None:
        raise RuntimeError(f"{LOADS_ENV}=descriptor: Triton {triton.__version__} has no host tensor descriptors")
    if problems:
        raise ValueError(f"{LOADS_ENV}=descriptor: " + "; ".join(problems))
    return "descriptor"


def _descriptor(t):
    """Host descriptor over a (B, H, S, D) tensor; its box is set per config (_set_boxes)."""
    return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, 16, 16])


def _unit_last_stride(t):
    return t if t.stride(-1) == 1 else t.contiguous()


def _block_d(head_dim):
    return max(16, triton.next_power_of_2(head_dim))


# Dropout's Philox counter, m * ceil(Sk / 4) + n / 4, is an int32: Sq * Sk below this keeps it so.
MAX_DROPOUT_SCORES = 2 ** 31


def _mask_view(mask, shape):
    """(tensor, its four strides, MASK) of an attention mask as the kernels
    read it: broadcast to `shape` (B, Hq, Sq, Sk) without a copy (stride 0
    along broadcast dims), booleans as bytes; MASK 0 none, 1 boolean, 2 additive."""
    if mask is None:
        return None, (0, 0, 0, 0), 0
    if mask.dtype != torch.bool and not mask.is_floating_point():
        raise ValueError(f"attention mask: expected bool or floating dtype, got {mask.dtype}")
    mask = torch.broadcast_to(mask, shape)
    kind = 1 if mask.dtype == torch.bool else 2
    return (mask.view(torch.int8) if kind == 1 else mask), tuple(mask.stride()), kind


def _mask_bounds(mask):
    """(row_end, col_start) of a boolean mask's (B, Hq, Sq, Sk) int8 view, or
    (None, None) for no mask or an additive one: one past each query row's
    last attended key, (B, Hq, Sq), and each key's first attending row,
    (B, Hq, Sk), int32 contiguous. The kernels skip the key blocks past a
    query block's last attended key and the query blocks before a key
    block's first attending row, so a causal mask given as a mask (HF's
    decoders with padding) costs a causal attention's work, and padding
    keys none. Computed on the mask's own extent (broadcast dims taken once)."""
    if mask is None or mask.dtype != torch.int8:
        return None, None
    batch, heads, seq_q, seq_k = mask.shape
    attended = mask[tuple(slice(0, 1) if st == 0 else slice(None) for st in mask.stride())] != 0
    rows = torch.arange(1, attended.shape[-1] + 1, device=mask.device, dtype=torch.int32)
    row_end = (torch.where(attended, rows, 0).amax(-1) if attended.shape[-1] > 1 else attended[..., 0] * seq_k)
    cols = torch.arange(attended.shape[-2], device=mask.device, dtype=torch.int32)[:, None]
    col_start = (torch.where(attended, cols, seq_q).amin(-2) if attended.shape[-2] > 1
                 else torch.where(attended[..., 0, :], 0, seq_q))
    return (row_end.to(torch.int32).expand(batch, heads, seq_q).contiguous(),
            col_start.to(torch.int32).expand(batch, heads, seq_k).contiguous())


def _prepare(q, k, v, causal, dropout_p, mask):
    q, k, v = (_unit_last_stride(t) for t in (q, k, v))
    batch, heads_q, seq_q, head_dim = q.shape
    heads_k, seq_k = k.shape[1], k.shape[2]
    if dropout_p > 0 and seq_q * seq_k >= MAX_DROPOUT_SCORES:
        raise ValueError(f"dropout needs Sq * Sk below 2^31, got {seq_q} * {seq_k}")
    mask, mask_strides, mask_kind = _mask_view(mask, (batch, heads_q, seq_q, seq_k))
    strides = (q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
               v.stride(0), v.stride(1), v.stride(2))
    sizes = (seq_q, seq_k, heads_q, heads_q // heads_k if heads_k else 1)  # no heads: nothing launches
    meta = dict(HEAD_DIM=head_dim, BLOCK_D=_block_d(head_dim), CAUSAL=bool(causal), DROPOUT=dropout_p > 0,
                MASK=mask_kind)
    buckets = (_seq_bucket(seq_q), _seq_bucket(seq_k))
    return q, k, v, mask, strides + sizes + mask_strides, sizes, meta, buckets


def flash_attn_fwd(q, k, v, scale: float, causal: bool, causal_offset: int, out=None, lse=None,
                   dropout_p: float = 0.0, seed=None, mask=None):
    """(out, lse) of attention; `out`/`lse` may be passed in (poisoned, by tests).
    dropout_p > 0 needs `seed`, a one-element int64 tensor on q's device.
    `mask` (boolean or additive, broadcastable to (B, Hq, Sq, Sk)) makes the
    second output each row's (m, l), (B, Hq, Sq, 2), in place of lse.
    Dropout and masks run the pointer forward."""
    q, k, v, mask, args, sizes, meta, buckets = _prepare(q, k, v, causal, dropout_p, mask)
    batch, heads_q, seq_q, head_dim = q.shape
    out = torch.empty_like(q) if out is None else out  # q's memory order (see the module docstring)
    if lse is None:
        stats_shape = (batch, heads_q, seq_q) + ((2,) if meta["MASK"] else ())
        lse = torch.empty(stats_shape, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    if k.shape[2] == 0:  # no keys at all: every row sees none
        lse.fill_(float("-inf"))
        if meta["MASK"]:
            lse[..., 1] = 0.0  # (m, l) = (-inf, 0)
        return out.zero_(), lse
    grid = lambda meta_: (triton.cdiv(seq_q, meta_["BLOCK_M"]), heads_q, batch)  # noqa: E731
    with on_device(q):
        if not meta["DROPOUT"] and not meta["MASK"] and forward_loads(q, k, v, out) == "descriptor":
            meta.pop("DROPOUT"), meta.pop("MASK")
            _fwd_tma_kernel[grid](*(_descriptor(t) for t in (q, k, v, out)), lse, *sizes,
                                  scale * LOG2E, causal_offset, *buckets, **meta)
        else:
            row_end, _ = _mask_bounds(mask)
            _fwd_kernel[grid](q, k, v, out, lse, seed, mask, row_end, *args, *out.stride()[:3], scale * LOG2E,
                              causal_offset, 1.0 - dropout_p, *buckets, **meta)
    return out, lse


def flash_attn_bwd(dout, q, k, v, out, lse, scale: float, causal: bool, causal_offset: int, deterministic: bool,
                   dq=None, dk=None, dv=None, dropout_p: float = 0.0, seed=None, mask=None):
    """(dq, dk, dv). deterministic=True: dK/dV per key block, then dQ per query
    block, each a sum in a fixed order (same bits run to run; S and P computed
    twice). False: one pass that also adds each tile's dS K into an fp32 dQ
    with atomics, in an order that varies run to run. Gradients may be passed
    in (poisoned, by tests). dropout_p, seed and mask: the forward's (with a
    mask, `lse` is the forward's (m, l) stats)."""
    q, k, v, mask, args, _, meta, buckets = _prepare(q, k, v, causal, dropout_p, mask)
    batch, heads_q, seq_q, head_dim = q.shape
    heads_k, seq_k = k.shape[1], k.shape[2]
    dout, out = _unit_last_stride(dout), _unit_last_stride(out)
    # each gradient in its input's memory order, as torch's flash SDPA gives them: for
    # q, k, v viewed per head from one (B, S, 3 H D) projection, no copy before their sum
    dq = torch.empty_like(q) if dq is None else dq
    dk = torch.empty_like(k) if dk is None else dk
    dv = torch.empty_like(v) if dv is None else dv
    if seq_q == 0 or seq_k == 0 or batch * heads_q == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    delta = torch.empty((batch, heads_q, seq_q), dtype=torch.float32, device=q.device)
    tail = (scale * LOG2E, scale, causal_offset, 1.0 - dropout_p, *buckets)
    dout_strides = dout.stride()[:3]
    grid_kv = lambda m: (triton.cdiv(seq_k, m["BLOCK_N"]), heads_k, batch)  # noqa: E731
    row_end, col_start = _mask_bounds(mask)
    with on_device(q):
        block = 16 if _INTERPRET else 64
        _bwd_delta_kernel[(triton.cdiv(seq_q, block), heads_q, batch)](
            out, dout, delta, *out.stride()[:3], *dout_strides, seq_q, heads_q, HEAD_DIM=head_dim,
            BLOCK_D=meta["BLOCK_D"], BLOCK_M=block)
        if not deterministic:
            dq_acc = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
            _bwd_dkdv_dq_kernel[grid_kv](q, k, v, dout, lse, delta, dk, dv, dq_acc, seed, mask, col_start, *args,
                                         *dout_strides, *dk.stride()[:3], *dv.stride()[:3], *tail, ATOMIC_DQ=True,
                                         **meta)
            return torch.mul(dq_acc, scale, out=dq), dk, dv
        _bwd_dkdv_kernel[grid_kv](q, k, v, dout, lse, delta, dk, dv, None, seed, mask, col_start, *args,
                                  *dout_strides,
                                  *dk.stride()[:3], *dv.stride()[:3], *tail, ATOMIC_DQ=False, **meta)
        grid_q = lambda m: (triton.cdiv(seq_q, m["BLOCK_M"]), heads_q, batch)  # noqa: E731
        _bwd_dq_kernel[grid_q](q, k, v, dout, lse, delta, dq, seed, mask, row_end, *args, *dout_strides,
                               *dq.stride()[:3], *tail, **meta)
    return dq, dk, dv


@triton.jit
def _dropout_keep_kernel(seed_ptr, keep_ptr, seq_q, seq_k, keep, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    bh = tl.program_id(2).to(tl.int64)
    kept = _dropout_keep(seed_ptr, bh, offs_m, tl.program_id(1) * BLOCK_N, seq_k, keep, BLOCK_M, BLOCK_N)
    tl.store(keep_ptr + (bh * seq_q + offs_m[:, None]) * seq_k + offs_n[None, :], kept.to(tl.int8),
             mask=(offs_m[:, None] < seq_q) & (offs_n[None, :] < seq_k))


def dropout_keep_mask(seed, batch: int, heads_q: int, seq_q: int, seq_k: int, dropout_p: float):
    """The (B, Hq, Sq, Sk) bool mask of the P elements that the kernels keep
    under `seed`: what the reference needs to compute the same dropout (the
    tests, and the double backward)."""
    kept = torch.empty((batch, heads_q, seq_q, seq_k), dtype=torch.int8, device=seed.device)
    if kept.numel():
        grid = (triton.cdiv(seq_q, 16), triton.cdiv(seq_k, 16), batch * heads_q)
        with on_device(seed):
            _dropout_keep_kernel[grid](seed, kept, seq_q, seq_k, 1.0 - dropout_p, BLOCK_M=16, BLOCK_N=16)
    return kept.bool()
