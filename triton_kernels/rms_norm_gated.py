"""Gated RMSNorm, forward and backward, in Triton: the norm of the linear
attention and Mamba layers (Qwen3-Next, Qwen3.5, OLMo hybrid, GLM-5 Next,
Kimi Linear, Mamba 2, Bamba, Granite 4), fused with its gate.

Rows of n elements, gate z of x's shape, act silu or sigmoid, all math in
fp32 (fp64 for fp64 input), y rounded once:
  norm before gate   y = x * rstd(x) * w * act(z)           (Qwen3-Next's order)
  gate before norm   h = x * act(z),  y = h * rstd(h) * w   (Mamba 2's)
  with rstd(v) = 1 / sqrt(sum(v^2) / n + eps). Bytes: read x and z, write y.

Backward, with u = dy * w, a = act(z), a' = act'(z) (silu' = s (1 + z (1 - s)),
sigmoid' = s (1 - s), s = sigmoid(z)), and the RMSNorm rule
d(v * rstd(v)) = rstd * (g - vhat * mean(g * vhat)) for an incoming g:
  norm before gate   xhat = x rstd:  dx = rstd (u a - xhat mean(u a xhat)),
                     dz = u xhat a',  dweight = sum over rows of dy xhat a
  gate before norm   hhat = h rstd:  dh = rstd (u - hhat mean(u hhat)),
                     dx = dh a,  dz = dh x a',  dweight = sum over rows of dy hhat
  Bytes: read x, z and dy, write dx and dz.

Rows (or groups) up to FUSED_COLS elements, loaded whole, once; dweight
reduced in two deterministic stages as in layer_norm.py. Longer ones go through the chunked
kernels: one row (or group) a program, CHUNK elements at a time, reading x
(and z, gate first) twice forward and x, z, dy twice backward, each backward
program adding its rows' dweight terms into its own row of partials.

Groups (Mamba 2's norm over n / G groups of G features, Nemotron-H's 8),
any number of them, as in layer_norm.py: the fused kernels run on a grid
(programs, groups), program (p, g) walking group g of its rows; the chunked
kernels take one group of a row at a time, its weight and partials at its
group's columns.
"""
import math

import torch
import triton
import triton.language as tl

from ._utils import FMA, cdiv, float32_pair, next_power_of_2, on_device, round_to, to_compute
from .layer_norm import (_backward_programs, _fused_tile, _grad_for, _groups, _row_tile, _rsqrt,
                         _stat_dtype, _sum_partials_kernel, _sum_tile, _take)

FUSED_COLS = 8192  # the backward holds x, z and dy of a row (a group) in registers
# The fused backward's tiles: short rows batched to 2048 elements, 8 a thread (8 warps; a row of 8192 on
# 32). Its gate keeps more live per element than the plain norms. Widths that 16 divides spill nothing up
# to 2048 on either these or the forward's 4096-element tiles (16 a thread), but 4 B at 2048 on these
# (sm_80); other widths (no vector loads) spilled up to 316 B a thread on those (ptxas, sm_90), up to
# 152 B on these, and a row of 8190 336-436 B on 16 warps, 8-84 B on 32.
BWD_TILE, BWD_PER_THREAD = 2048, 8
CHUNK = 4096  # elements of a row a chunked kernel holds at a time
ACTIVATIONS = {"silu": 0, "sigmoid": 1}


@triton.jit
def _gate(z, ACT: tl.constexpr):
    """(act(z), act'(z)) for ACT 0 (silu) or 1 (sigmoid)."""
    s = 1.0 / (1.0 + tl.exp(-z))
    if ACT == 0:
        return z * s, s * (1.0 + z * (1.0 - s))
    return s, s * (1.0 - s)


@triton.jit
def _normalized_and_incoming(x, z, u, rstd, ACT: tl.constexpr, GATE_FIRST: tl.constexpr):
    """(vhat, g, a, a'): the normalized vector v * rstd (v = x * act(z) gate
    first, x otherwise) and the gradient g reaching it, from u = dy * w."""
    a, da = _gate(z, ACT)
    if GATE_FIRST:
        return x * a * rstd, u, a, da
    return x * rstd, u * a, a, da


@triton.jit
def _input_grads(dv, x, dy, u, vhat, a, da, GATE_FIRST: tl.constexpr):
    """(dx, dz, dweight's term) from dv, the gradient of v."""
    if GATE_FIRST:
        return dv * a, dv * x * da, dy * vhat
    return dv, u * vhat * da, dy * vhat * a


@triton.jit
def _rms_norm_gated_fwd_kernel(x_ptr, z_ptr, w_ptr, y_ptr, rstd_ptr, rows, cols, groups, eps_high, eps_low,
                               ACT: tl.constexpr, GATE_FIRST: tl.constexpr, HAS_W: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    group = tl.program_id(1)
    col = tl.arange(0, BLOCK_N)
    col_mask = col < cols
    row, row_mask, mask, offs = _row_tile(tl.program_id(0).to(tl.int64) * BLOCK_M, rows, group, groups, col, cols,
                                          BLOCK_M)
    x = to_compute(tl.load(x_ptr + offs, mask=mask, other=0.0))
    a, _ = _gate(to_compute(tl.load(z_ptr + offs, mask=mask, other=0.0)), ACT)
    h = x
    if GATE_FIRST:
        h = x * a
    rstd = _rsqrt(tl.sum(h * h, axis=1) / cols + eps_high + eps_low)
    tl.store(rstd_ptr + row, rstd, mask=row_mask)
    y = h * rstd[:, None]
    if HAS_W:
        y = y * to_compute(tl.load(w_ptr + group * cols + col, mask=col_mask, other=0.0))[None, :]
    if not GATE_FIRST:
        y = y * a
    tl.store(y_ptr + offs, round_to(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_gated_bwd_kernel(dy_ptr, x_ptr, z_ptr, w_ptr, rstd_ptr, dx_ptr, dz_ptr, dw_part_ptr,
                               rows, cols, groups, rows_per_program,
                               ACT: tl.constexpr, GATE_FIRST: tl.constexpr, HAS_W: tl.constexpr,
                               NEED_DW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    col = tl.arange(0, BLOCK_N)
    col_mask = col < cols
    dw = tl.zeros([BLOCK_N], rstd_ptr.dtype.element_ty)
    if HAS_W:
        w = to_compute(tl.load(w_ptr + group * cols + col, mask=col_mask, other=0.0))[None, :]
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, rows)
    for start in range(first, last, BLOCK_M):
        row, row_mask, mask, offs = _row_tile(start, last, group, groups, col, cols, BLOCK_M)
        x = to_compute(tl.load(x_ptr + offs, mask=mask, other=0.0))
        z = to_compute(tl.load(z_ptr + offs, mask=mask, other=0.0))
        dy = to_compute(tl.load(dy_ptr + offs, mask=mask, other=0.0))
        rstd = tl.load(rstd_ptr + row, mask=row_mask, other=0.0)[:, None]
        u = dy
        if HAS_W:
            u = dy * w
        vhat, g, a, da = _normalized_and_incoming(x, z, u, rstd, ACT, GATE_FIRST)
        dv = rstd * (g - vhat * (tl.sum(g * vhat, axis=1) / cols)[:, None])
        dx, dz, dw_term = _input_grads(dv, x, dy, u, vhat, a, da, GATE_FIRST)
        tl.store(dx_ptr + offs, round_to(dx, dx_ptr.dtype.element_ty), mask=mask)
        tl.store(dz_ptr + offs, round_to(dz, dz_ptr.dtype.element_ty), mask=mask)
        if NEED_DW:
            dw += tl.sum(dw_term, axis=0)
    if NEED_DW:  # row pid of partials, its group's columns
        tl.store(dw_part_ptr + (pid * groups + group) * cols + col, dw, mask=col_mask)


@triton.jit
def _rms_norm_gated_fwd_chunked_kernel(x_ptr, z_ptr, w_ptr, y_ptr, rstd_ptr, cols, groups, eps_high, eps_low,
                                       ACT: tl.constexpr, GATE_FIRST: tl.constexpr, HAS_W: tl.constexpr,
                                       BLOCK_N: tl.constexpr):
    """One row of `cols` (a group's) a program, BLOCK_N at a time: the sum of
    squares, then y."""
    row = tl.program_id(0).to(tl.int64)
    x_row, z_row, y_row = x_ptr + row * cols, z_ptr + row * cols, y_ptr + row * cols
    w_row = w_ptr + (row % groups) * cols
    squares = tl.zeros([BLOCK_N], rstd_ptr.dtype.element_ty)
    for start in range(0, cols, BLOCK_N):
        col = start + tl.arange(0, BLOCK_N)
        h = to_compute(tl.load(x_row + col, mask=col < cols, other=0.0))
        if GATE_FIRST:  # norm first needs no z for rstd
            a, _ = _gate(to_compute(tl.load(z_row + col, mask=col < cols, other=0.0)), ACT)
            h = h * a
        squares += h * h
    rstd = _rsqrt(tl.sum(squares, axis=0) / cols + eps_high + eps_low)
    tl.store(rstd_ptr + row, rstd)
    for start in range(0, cols, BLOCK_N):
        col = start + tl.arange(0, BLOCK_N)
        col_mask = col < cols
        x = to_compute(tl.load(x_row + col, mask=col_mask, other=0.0))
        a, _ = _gate(to_compute(tl.load(z_row + col, mask=col_mask, other=0.0)), ACT)
        if GATE_FIRST:
            y = x * a * rstd
        else:
            y = x * rstd
        if HAS_W:
            y = y * to_compute(tl.load(w_row + col, mask=col_mask, other=0.0))
        if not GATE_FIRST:
            y = y * a
        tl.store(y_row + col, round_to(y, y_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def _chunk_of_row(x_ptr, z_ptr, dy_ptr, w_row, offs_row, col, cols, HAS_W: tl.constexpr):
    """(x, z, dy, u = dy * w) of columns `col` of a row starting at offs_row."""
    col_mask = col < cols
    x = to_compute(tl.load(x_ptr + offs_row + col, mask=col_mask, other=0.0))
    z = to_compute(tl.load(z_ptr + offs_row + col, mask=col_mask, other=0.0))
    dy = to_compute(tl.load(dy_ptr + offs_row + col, mask=col_mask, other=0.0))
    u = dy
    if HAS_W:
        u = dy * to_compute(tl.load(w_row + col, mask=col_mask, other=0.0))
    return x, z, dy, u


@triton.jit
def _rms_norm_gated_bwd_chunked_kernel(dy_ptr, x_ptr, z_ptr, w_ptr, rstd_ptr, dx_ptr, dz_ptr, dw_part_ptr,
                                       rows, cols, groups, rows_per_program,
                                       ACT: tl.constexpr, GATE_FIRST: tl.constexpr, HAS_W: tl.constexpr,
                                       NEED_DW: tl.constexpr, BLOCK_N: tl.constexpr):
    """A run of rows a program, each BLOCK_N at a time: mean(g * vhat), then
    dx, dz and the dweight terms, added into the program's row of partials
    (zeroed by the host) at the row's group's columns."""
    pid = tl.program_id(0).to(tl.int64)
    first = pid * rows_per_program
    for row in range(first, tl.minimum(first + rows_per_program, rows)):
        offs_row = row * cols
        w_row = w_ptr + (row % groups) * cols
        dw_row = dw_part_ptr + (pid * groups + row % groups) * cols
        rstd = tl.load(rstd_ptr + row)
        g_vhat = tl.zeros([BLOCK_N], rstd_ptr.dtype.element_ty)
        for start in range(0, cols, BLOCK_N):
            col = start + tl.arange(0, BLOCK_N)
            x, z, dy, u = _chunk_of_row(x_ptr, z_ptr, dy_ptr, w_row, offs_row, col, cols, HAS_W)
            vhat, g, _, _ = _normalized_and_incoming(x, z, u, rstd, ACT, GATE_FIRST)
            g_vhat += g * vhat
        mean_g_vhat = tl.sum(g_vhat, axis=0) / cols
        for start in range(0, cols, BLOCK_N):
            col = start + tl.arange(0, BLOCK_N)
            col_mask = col < cols
            x, z, dy, u = _chunk_of_row(x_ptr, z_ptr, dy_ptr, w_row, offs_row, col, cols, HAS_W)
            vhat, g, a, da = _normalized_and_incoming(x, z, u, rstd, ACT, GATE_FIRST)
            dx, dz, dw_term = _input_grads(rstd * (g - vhat * mean_g_vhat), x, dy, u, vhat, a, da, GATE_FIRST)
            tl.store(dx_ptr + offs_row + col, round_to(dx, dx_ptr.dtype.element_ty), mask=col_mask)
            tl.store(dz_ptr + offs_row + col, round_to(dz, dz_ptr.dtype.element_ty), mask=col_mask)
            if NEED_DW:
                tl.store(dw_row + col, tl.load(dw_row + col, mask=col_mask) + dw_term, mask=col_mask)


def _chunk(cols):
    """(BLOCK_N, num_warps) of the chunked kernels: CHUNK, or the row's power of two below it."""
    block_n = min(CHUNK, next_power_of_2(cols))
    return block_n, max(1, min(8, block_n // 256))


def rms_norm_gated_fwd(x, z, weight, eps, activation, gate_first, group_size=None, out=None):
    """(y, rstd) over x's last dim n, or over groups of group_size features
    (rstd then has one more dim, the groups); `out` optionally gives them."""
    x, z = x.contiguous(), z.contiguous()
    weight = weight.contiguous() if weight is not None else None
    n = x.shape[-1]
    cols, groups = _groups(n, group_size)
    rows = math.prod(x.shape[:-1])
    y = _take(out, 0, x.shape, x.dtype, x.device)
    rstd = _take(out, 1, x.shape[:-1] + ((groups,) if group_size else ()), _stat_dtype(x), x.device)
    if rows == 0:
        return y, rstd
    if cols == 0:  # an empty row: mean square 0 by convention, nothing to write in y
        rstd.fill_(1.0 / math.sqrt(eps))
        return y, rstd
    args = (x, z, weight if weight is not None else x, y, rstd)
    flags = dict(ACT=ACTIVATIONS[activation], GATE_FIRST=gate_first, HAS_W=weight is not None)
    with on_device(x):
        if cols > FUSED_COLS:
            block_n, num_warps = _chunk(cols)
            _rms_norm_gated_fwd_chunked_kernel[(rows * groups,)](*args, cols, groups, *float32_pair(eps),
                                                                 BLOCK_N=block_n, num_warps=num_warps, **flags, **FMA)
        else:
            block_m, block_n, num_warps = _fused_tile(cols, FUSED_COLS)
            _rms_norm_gated_fwd_kernel[(cdiv(rows, block_m), groups)](
                *args, rows, cols, groups, *float32_pair(eps), BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps,
                **flags, **FMA)
    return y, rstd


def rms_norm_gated_bwd(dy, x, z, rstd, weight, activation, gate_first, need_dweight, group_size=None, out=None):
    """(dx, dz, dweight); dweight an empty tensor unless asked for."""
    dy, x, z, rstd = dy.contiguous(), x.contiguous(), z.contiguous(), rstd.contiguous()
    weight = weight.contiguous() if weight is not None else None
    n = x.shape[-1]
    cols, groups = _groups(n, group_size)
    rows = math.prod(x.shape[:-1])
    chunked = cols > FUSED_COLS
    dx = _take(out, 0, x.shape, x.dtype, x.device)
    dz = _take(out, 1, z.shape, z.dtype, z.device)
    dweight = _grad_for(need_dweight, weight, rows, out, 2, x)
    if rows == 0 or cols == 0:
        return dx, dz, dweight
    if chunked:  # a run of rows of cols a program, each adding into the program's row of n partial sums
        block_n, num_warps = _chunk(cols)
        rows *= groups
        programs = _backward_programs(x, rows)
        rows_per_program = cdiv(rows, programs)
    else:  # a grid (programs, groups), each program walking one group of its rows
        block_m, block_n, num_warps = _fused_tile(cols, FUSED_COLS, BWD_TILE, BWD_PER_THREAD)
        programs = _backward_programs(x, cdiv(rows, block_m), groups)
        rows_per_program = cdiv(cdiv(rows, programs), block_m) * block_m
    programs = cdiv(rows, rows_per_program)
    new_partials = torch.zeros if chunked else torch.empty
    dw_part = new_partials((programs, n), dtype=_stat_dtype(x), device=x.device) if need_dweight else rstd
    args = (dy, x, z, weight if weight is not None else x, rstd, dx, dz, dw_part, rows, cols, groups,
            rows_per_program)
    flags = dict(ACT=ACTIVATIONS[activation], GATE_FIRST=gate_first, HAS_W=weight is not None,
                 NEED_DW=need_dweight)
    with on_device(x):
        if chunked:
            _rms_norm_gated_bwd_chunked_kernel[(programs,)](*args, BLOCK_N=block_n, num_warps=num_warps, **flags,
                                                            **FMA)
        else:
            _rms_norm_gated_bwd_kernel[(programs, groups)](*args, BLOCK_M=block_m, BLOCK_N=block_n,
                                                           num_warps=num_warps, **flags, **FMA)
        if need_dweight:
            block_p, block_n = _sum_tile(x, n)
            _sum_partials_kernel[(cdiv(n, block_n), 1)](
                dw_part, dweight, dw_part, dweight, programs, n, BLOCK_P=block_p, BLOCK_N=block_n, num_warps=4, **FMA)
    return dx, dz, dweight
