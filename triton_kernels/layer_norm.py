"""LayerNorm and RMSNorm, forward and backward, in Triton.

Rows of n = cols elements (cols = the product of normalized_shape); all math
in fp32 (fp64 for fp64 input); mean and rstd saved in that type.

Forward:
  LayerNorm  m = sum(x) / n,  d = x - m,  e = sum(d) / n,  mean = m + e
             var = sum((d - e)^2) / n,  rstd = 1 / sqrt(var + eps)
             y = (d - e) * rstd * w + b
             e is what m's rounding left (0 in exact arithmetic): d is exact
             where x is near m, so x - mean is (d - e), exact to the ulp of
             the row's spread, not of its offset from zero (x = 3000 +- 1:
             the float32 mean alone is 1.2e-4 off). A row of one value gets
             d = e and y = b exactly, as torch's Welford update gives it.
  RMSNorm    rstd = 1 / sqrt(sum(x^2) / n + eps),  y = x * rstd * w
  Bytes: read x, write y (plus w, b and the per-row statistics).

Backward, with xhat = (x - mean) * rstd (x * rstd for RMSNorm) and g = dy * w,
x - mean centered again as d - e, e = sum(d) / n (the saved mean is rounded
at the row's offset, as in the forward):
  dbias = sum over rows of dy,  dweight = sum over rows of dy * xhat
  LayerNorm  dx = rstd * (g - mean(g) - xhat * mean(g * xhat))
             (d xhat_i / d x_j = rstd * (delta_ij - 1/n - xhat_i xhat_j / n))
  RMSNorm    dx = rstd * (g - xhat * mean(g * xhat))
             (d xhat_i / d x_j = rstd * (delta_ij - xhat_i xhat_j / n))
  Bytes: read x and dy, write dx (plus w, statistics, and the partials below).

dweight and dbias are reduced in two stages without atomics: each program of
the backward owns a contiguous run of rows and writes one row of partial sums;
`_sum_partials_kernel` adds the partial rows in a fixed order (dweight and dbias
in one launch). Deterministic.

Fast path: a row of up to FWD_FUSED_COLS (forward) / BWD_FUSED_COLS (backward)
elements is loaded whole, once (short rows several per program). Longer rows go
through the chunked kernels, which loop over the row in CHUNK-element pieces:
the forward reads x three times (twice for RMSNorm), the backward reads x and
dy twice, and the backward adds each row into its program's partials in memory.
They sum d on the same pass as what needs e: var = sum(d^2) / n - e^2 and
sum(g (d - e)) = sum(g d) - e sum(g).

Groups (`group_size`: Cohere's per-head QK norms, a weight of (heads,
head_dim); Qwen4-Exp's norms over its hyper-connection streams): a row of
n = groups * cols elements is normalized over each of its groups of cols
consecutive elements, the weight and bias still spanning all n. The
statistics are (rows, groups); dweight's partial rows are n long. The fused
kernels run on a grid (programs, groups): program (p, g) walks group g of
its rows, groups * cols elements apart, so it loads one slice of the weight
and sums into one slice of partials, columns g * cols of partial row p; any
number of groups. The chunked kernels take one row of cols at a time, row r
(of rows * groups) being group r % groups.
"""
import math

import torch
import triton
import triton.language as tl

from ._utils import FMA, cdiv, float32_pair, mul_rn, next_power_of_2, on_device, round_to, to_compute

FWD_FUSED_COLS = 16384
BWD_FUSED_COLS = 8192
CHUNK = 4096
TILE = 4096            # elements per program on the fused path, short rows batched
MAX_ROWS_PER_TILE = 64
PARTIALS_TILE = 4096  # elements per step of stage two
PROGRAMS_PER_SM = 2    # backward programs (rows of partials) per SM


@triton.jit
def _rsqrt(v):
    # rsqrt.approx is within ~1 ulp in fp32; fp64 has no precise rsqrt, so it
    # takes the IEEE square root and division (fp64 input meets torch's fp64).
    if v.dtype == tl.float64:
        return 1.0 / tl.sqrt(v)
    return tl.math.rsqrt(v)


@triton.jit
def _row_tile(start, last, group, groups, col, cols, BLOCK_M: tl.constexpr):
    """Rows start .. start + BLOCK_M, those before `last`, of a matrix whose
    rows are `groups` groups of `cols`, their group `group`: (row, row_mask,
    mask, offs), row the index of each among all rows' groups (of their
    statistics), offs the elements' offsets. The kernels walk their rows a
    tile at a time with it."""
    row = start + tl.arange(0, BLOCK_M)
    row_mask = row < last
    row = row * groups + group
    mask = row_mask[:, None] & (col < cols)[None, :]
    return row, row_mask, mask, row[:, None] * cols + col[None, :]


@triton.jit
def _norm_fwd_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, rows, cols, groups, eps_high, eps_low,
                     RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    group = tl.program_id(1)
    col = tl.arange(0, BLOCK_N)
    col_mask = col < cols
    row, row_mask, mask, offs = _row_tile(tl.program_id(0).to(tl.int64) * BLOCK_M, rows, group, groups, col, cols,
                                          BLOCK_M)
    x = to_compute(tl.load(x_ptr + offs, mask=mask, other=0.0))
    if RMS:
        xc = x
    else:
        mean = tl.sum(x, axis=1) / cols
        d = tl.where(mask, x - mean[:, None], 0.0)
        e = tl.sum(d, axis=1) / cols
        xc = tl.where(mask, d - e[:, None], 0.0)
        tl.store(mean_ptr + row, mean + e, mask=row_mask)
    rstd = _rsqrt(tl.sum(xc * xc, axis=1) / cols + eps_high + eps_low)
    tl.store(rstd_ptr + row, rstd, mask=row_mask)
    y = xc * rstd[:, None]
    if HAS_W:
        y = y * to_compute(tl.load(w_ptr + group * cols + col, mask=col_mask, other=0.0))[None, :]
    if HAS_B:
        y = y + to_compute(tl.load(b_ptr + group * cols + col, mask=col_mask, other=0.0))[None, :]
    tl.store(y_ptr + offs, round_to(y, y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _norm_fwd_chunked_kernel(x_ptr, w_ptr, b_ptr, y_ptr, mean_ptr, rstd_ptr, cols, groups, eps_high, eps_low,
                             RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                             BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * cols
    y_row = y_ptr + row * cols
    w_row = w_ptr + (row % groups) * cols
    b_row = b_ptr + (row % groups) * cols
    acc_ty = rstd_ptr.dtype.element_ty
    mean = 0.0
    if not RMS:
        total = tl.zeros([BLOCK_N], acc_ty)
        for start in range(0, cols, BLOCK_N):
            col = start + tl.arange(0, BLOCK_N)
            total += to_compute(tl.load(x_row + col, mask=col < cols, other=0.0))
        mean = tl.sum(total, axis=0) / cols
    sums = tl.zeros([BLOCK_N], acc_ty)  # of d (LayerNorm)
    squares = tl.zeros([BLOCK_N], acc_ty)
    for start in range(0, cols, BLOCK_N):
        col = start + tl.arange(0, BLOCK_N)
        x = to_compute(tl.load(x_row + col, mask=col < cols, other=0.0))
        d = tl.where(col < cols, x - mean, 0.0)
        if not RMS:
            sums += d
        squares += d * d
    e = 0.0
    if not RMS:
        e = tl.sum(sums, axis=0) / cols
        tl.store(mean_ptr + row, mean + e)
    rstd = _rsqrt(tl.maximum(tl.sum(squares, axis=0) / cols - e * e, 0.0) + eps_high + eps_low)
    tl.store(rstd_ptr + row, rstd)
    for start in range(0, cols, BLOCK_N):
        col = start + tl.arange(0, BLOCK_N)
        col_mask = col < cols
        y = (to_compute(tl.load(x_row + col, mask=col_mask, other=0.0)) - mean - e) * rstd
        if HAS_W:
            y = y * to_compute(tl.load(w_row + col, mask=col_mask, other=0.0))
        if HAS_B:
            y = y + to_compute(tl.load(b_row + col, mask=col_mask, other=0.0))
        tl.store(y_row + col, round_to(y, y_ptr.dtype.element_ty), mask=col_mask)


@triton.jit
def _norm_bwd_kernel(dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_part_ptr, db_part_ptr,
                     rows, cols, groups, rows_per_program,
                     RMS: tl.constexpr, HAS_W: tl.constexpr, NEED_DW: tl.constexpr,
                     NEED_DB: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, STAGES: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    group = tl.program_id(1)
    acc_ty = rstd_ptr.dtype.element_ty
    col = tl.arange(0, BLOCK_N)
    col_mask = col < cols
    if HAS_W:
        w = to_compute(tl.load(w_ptr + group * cols + col, mask=col_mask, other=0.0))
    dw = tl.zeros([BLOCK_N], acc_ty)
    db = tl.zeros([BLOCK_N], acc_ty)
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, rows)
    # STAGES 2: the next tile's x and dy stream into shared memory (cp.async)
    # while this one is reduced, two tiles in flight a program where there was one.
    for start in tl.range(first, last, BLOCK_M, num_stages=STAGES):
        row, row_mask, mask, offs = _row_tile(start, last, group, groups, col, cols, BLOCK_M)
        x = to_compute(tl.load(x_ptr + offs, mask=mask, other=0.0))
        dy = to_compute(tl.load(dy_ptr + offs, mask=mask, other=0.0))
        rstd = tl.load(rstd_ptr + row, mask=row_mask, other=0.0)
        if RMS:
            xhat = x * rstd[:, None]
        else:
            mean = tl.load(mean_ptr + row, mask=row_mask, other=0.0)
            d = tl.where(mask, x - mean[:, None], 0.0)
            e = tl.sum(d, axis=1) / cols
            xhat = tl.where(mask, (d - e[:, None]) * rstd[:, None], 0.0)
        if HAS_W:
            g = mul_rn(dy, w[None, :])
        else:
            g = dy
        mean_gx = tl.sum(g * xhat, axis=1) / cols
        if RMS:
            dx = rstd[:, None] * (g - xhat * mean_gx[:, None])
        else:
            mean_g = tl.sum(g, axis=1) / cols
            dx = rstd[:, None] * (g - mean_g[:, None] - xhat * mean_gx[:, None])
        tl.store(dx_ptr + offs, round_to(dx, dx_ptr.dtype.element_ty), mask=mask)
        if NEED_DW:
            dw += tl.sum(dy * xhat, axis=0)
        if NEED_DB:
            db += tl.sum(dy, axis=0)
    part = (pid * groups + group) * cols + col  # row pid of partials, its group's columns
    if NEED_DW:
        tl.store(dw_part_ptr + part, dw, mask=col_mask)
    if NEED_DB:
        tl.store(db_part_ptr + part, db, mask=col_mask)


@triton.jit
def _norm_bwd_chunked_kernel(dy_ptr, x_ptr, w_ptr, mean_ptr, rstd_ptr, dx_ptr, dw_part_ptr, db_part_ptr,
                             rows, cols, groups, rows_per_program,
                             RMS: tl.constexpr, HAS_W: tl.constexpr, NEED_DW: tl.constexpr,
                             NEED_DB: tl.constexpr, BLOCK_N: tl.constexpr):
    # The partials start at zero (the host allocates them zeroed); each
    # program adds its rows into its own row of partials, at their group's columns.
    pid = tl.program_id(0).to(tl.int64)
    acc_ty = rstd_ptr.dtype.element_ty
    first = pid * rows_per_program
    last = tl.minimum(first + rows_per_program, rows)
    for row in range(first, last):
        x_row = x_ptr + row * cols
        dy_row = dy_ptr + row * cols
        w_row = w_ptr + (row % groups) * cols
        dw_row = dw_part_ptr + (pid * groups + row % groups) * cols
        db_row = db_part_ptr + (pid * groups + row % groups) * cols
        rstd = tl.load(rstd_ptr + row)
        if RMS:
            mean = 0.0
        else:
            mean = tl.load(mean_ptr + row)
        sum_d = tl.zeros([BLOCK_N], acc_ty)
        sum_g = tl.zeros([BLOCK_N], acc_ty)
        sum_gd = tl.zeros([BLOCK_N], acc_ty)
        for start in range(0, cols, BLOCK_N):
            col = start + tl.arange(0, BLOCK_N)
            col_mask = col < cols
            d = tl.where(col_mask, to_compute(tl.load(x_row + col, mask=col_mask, other=0.0)) - mean, 0.0)
            g = to_compute(tl.load(dy_row + col, mask=col_mask, other=0.0))
            if HAS_W:
                g = mul_rn(g, to_compute(tl.load(w_row + col, mask=col_mask, other=0.0)))
            if not RMS:
                sum_d += d
                sum_g += g
            sum_gd += g * d
        e = 0.0
        mean_g = 0.0
        if not RMS:
            e = tl.sum(sum_d, axis=0) / cols
            mean_g = tl.sum(sum_g, axis=0) / cols
        mean_gx = rstd * (tl.sum(sum_gd, axis=0) / cols - e * mean_g)
        for start in range(0, cols, BLOCK_N):
            col = start + tl.arange(0, BLOCK_N)
            col_mask = col < cols
            xhat = (to_compute(tl.load(x_row + col, mask=col_mask, other=0.0)) - mean - e) * rstd
            dy = to_compute(tl.load(dy_row + col, mask=col_mask, other=0.0))
            if HAS_W:
                g = mul_rn(dy, to_compute(tl.load(w_row + col, mask=col_mask, other=0.0)))
            else:
                g = dy
            dx = rstd * (g - mean_g - xhat * mean_gx)
            tl.store(dx_ptr + row * cols + col, round_to(dx, dx_ptr.dtype.element_ty), mask=col_mask)
            if NEED_DW:
                tl.store(dw_row + col, tl.load(dw_row + col, mask=col_mask) + dy * xhat, mask=col_mask)
            if NEED_DB:
                tl.store(db_row + col, tl.load(db_row + col, mask=col_mask) + dy, mask=col_mask)


@triton.jit
def _sum_partials_kernel(part_ptr, out_ptr, part2_ptr, out2_ptr, parts, cols, BLOCK_P: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    # out[c] = sum over p of part[p, c]: same tree, same order, every run. Grid axis 1 picks
    # the pair, (part, out) then (part2, out2): dweight and dbias in one launch.
    if tl.program_id(1) == 1:
        part_ptr = part2_ptr
        out_ptr = out2_ptr
    col = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = col < cols
    acc = tl.zeros([BLOCK_P, BLOCK_N], part_ptr.dtype.element_ty)
    for start in range(0, parts, BLOCK_P):
        p = (start + tl.arange(0, BLOCK_P)).to(tl.int64)
        mask = (p < parts)[:, None] & col_mask[None, :]
        acc += tl.load(part_ptr + p[:, None] * cols + col[None, :], mask=mask, other=0.0)
    tl.store(out_ptr + col, round_to(tl.sum(acc, axis=0), out_ptr.dtype.element_ty), mask=col_mask)


# ------------------------------------------------------------------ host side

def _stat_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fused_tile(cols: int, limit: int, tile: int = TILE, per_thread: int = 16):
    """(BLOCK_M, BLOCK_N, num_warps) holding whole rows, short rows batched to
    `tile` elements, `per_thread` elements a thread; or None past `limit`."""
    block_n = next_power_of_2(max(cols, 1))
    if block_n > limit:
        return None
    block_m = max(1, min(MAX_ROWS_PER_TILE, tile // block_n))
    num_warps = min(32, max(1, block_m * block_n // (32 * per_thread)))
    return block_m, block_n, num_warps


def _take(out, i, shape, dtype, device):
    """out[i] when the caller passed one (tests pass NaN-filled ones), else new."""
    t = None if out is None else out[i]
    if t is None:
        return torch.empty(shape, dtype=dtype, device=device)
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or not t.is_contiguous():
        raise ValueError(f"out[{i}] must be contiguous {dtype} of shape {tuple(shape)}, "
                         f"got {t.dtype} {tuple(t.shape)}")
    return t


def _programs_to_fill(x: torch.Tensor) -> int:
    """Programs that fill the GPU; 1 under the interpreter (CPU tensors), which
    runs programs one after another."""
    if x.is_cuda:
        return torch.cuda.get_device_properties(x.device).multi_processor_count * PROGRAMS_PER_SM
    return 1


def _backward_programs(x: torch.Tensor, work: int, groups: int = 1) -> int:
    """Programs (rows of partials) for the backward, each taking `groups`
    programs' worth of rows: enough to fill the GPU, no more than the work.
    Under the interpreter 4, to test the reduction."""
    return max(1, min(work, cdiv(_programs_to_fill(x), groups) if x.is_cuda else 4))


def _sum_tile(x: torch.Tensor, cols: int):
    """(BLOCK_P, BLOCK_N) of stage two: columns split over enough programs to
    fill the GPU, at least 32 and at most PARTIALS_TILE columns each."""
    block_n = min(PARTIALS_TILE, max(32, next_power_of_2(cdiv(cols, _programs_to_fill(x)))))
    return PARTIALS_TILE // block_n, block_n


def _groups(n: int, group_size):
    """(cols, groups): a row of n as groups of cols (one group without group_size)."""
    cols = group_size or n
    return cols, n // cols if cols else 1


def _norm_fwd(x, normalized_shape, weight, bias, eps, rms, out, group_size):
    x = x.contiguous()
    weight = weight.contiguous() if weight is not None else None
    bias = bias.contiguous() if bias is not None else None
    k = len(normalized_shape)
    batch = tuple(x.shape[:x.dim() - k])
    cols, groups = _groups(math.prod(normalized_shape), group_size)
    stats = batch + ((groups,) if group_size else ())
    rows = math.prod(batch)
    y = _take(out, 0, x.shape, x.dtype, x.device)
    mean = None if rms else _take(out, 1, stats, _stat_dtype(x), x.device)
    rstd = _take(out, 1 if rms else 2, stats, _stat_dtype(x), x.device)
    if rows == 0:
        return y, mean, rstd
    if cols == 0:  # an empty row: variance 0 by convention, nothing to write in y
        if mean is not None:
            mean.zero_()
        rstd.fill_(1.0 / math.sqrt(eps))
        return y, mean, rstd
    eps_high, eps_low = float32_pair(eps)  # an fp32 eps would be rounded for fp64 input
    flags = dict(RMS=rms, HAS_W=weight is not None, HAS_B=bias is not None)
    # Absent pointers: any tensor stands in; the kernels never read them.
    w_arg = weight if weight is not None else x
    b_arg = bias if bias is not None else x
    mean_arg = mean if mean is not None else rstd
    # 64 bytes of x a thread (16 fp32, 32 fp16/bf16 elements) where 16 divides
    # the width (16-byte loads): four loads in flight whatever the dtype, as the
    # CUDA forward. Other widths load an element at a time, an address each: 16
    # a thread, or 32 fp16/bf16 spill 8-72 B a thread (8-16 warps, Triton 3.8).
    per_thread = 64 // x.element_size() if cols % 16 == 0 else 16
    tile = _fused_tile(cols, FWD_FUSED_COLS, per_thread=per_thread)
    with on_device(x):
        if tile is not None:
            block_m, block_n, num_warps = tile
            _norm_fwd_kernel[(cdiv(rows, block_m), groups)](
                x, w_arg, b_arg, y, mean_arg, rstd, rows, cols, groups, eps_high, eps_low,
                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, **flags, **FMA)
        else:
            _norm_fwd_chunked_kernel[(rows * groups,)](
                x, w_arg, b_arg, y, mean_arg, rstd, cols, groups, eps_high, eps_low, BLOCK_N=CHUNK, num_warps=8,
                **flags, **FMA)
    return y, mean, rstd


def _grad_for(need, param, rows, out, i, x):
    if not need:
        return torch.empty(0, dtype=x.dtype, device=x.device)
    g = _take(out, i, param.shape, param.dtype, param.device)
    if rows == 0:
        g.zero_()  # a sum over no rows
    return g


def _norm_bwd(dy, x, mean, rstd, weight, bias, need_dweight, need_dbias, rms, out, group_size):
    x, dy, rstd = x.contiguous(), dy.contiguous(), rstd.contiguous()
    mean = mean.contiguous() if mean is not None else None
    weight = weight.contiguous() if weight is not None else None
    batch = rstd.shape[:-1] if group_size else rstd.shape
    rows = math.prod(batch)
    n = math.prod(x.shape[len(batch):])
    cols, groups = _groups(n, group_size)
    dx = _take(out, 0, x.shape, x.dtype, x.device)
    dweight = _grad_for(need_dweight, weight, rows, out, 1, x)
    dbias = _grad_for(need_dbias, bias, rows, out, 2, x)
    if rows == 0 or cols == 0:
        return dx, dweight, dbias
    # 16 elements a thread, as the forward, but 8 in the widest rows (32 warps): there a row whose width 16
    # does not divide (no vector loads: an address an element) spilled 60-200 B a thread on 16 warps (128
    # registers each), 0-4 B on 32. Widths 16 divides spill on neither. (8 everywhere spills 4-60 B at
    # such odd widths of 40-100 under Triton 3.6, where 16 spills none.)
    per_thread = 8 if next_power_of_2(cols) == BWD_FUSED_COLS else 16
    tile = _fused_tile(cols, BWD_FUSED_COLS, per_thread=per_thread)
    # fp64 tiles in two stages spill (255 registers, 8-128 B a thread): one.
    stages = 1 if x.dtype == torch.float64 else 2
    if tile is not None:  # a grid (programs, groups), each program walking one group of its rows
        block_m, block_n, num_warps = tile
        programs = _backward_programs(x, cdiv(rows, block_m), groups)
        rows_per_program = cdiv(cdiv(rows, programs), block_m) * block_m
        new_partials = torch.empty
    else:  # each program a run of rows of cols, rows * groups of them
        rows *= groups
        programs = _backward_programs(x, rows)
        rows_per_program = cdiv(rows, programs)
        new_partials = torch.zeros  # the chunked kernel adds into them
    programs = cdiv(rows, rows_per_program)
    stat = _stat_dtype(x)
    dw_part = new_partials((programs, n), dtype=stat, device=x.device) if need_dweight else rstd
    db_part = new_partials((programs, n), dtype=stat, device=x.device) if need_dbias else rstd
    flags = dict(RMS=rms, HAS_W=weight is not None, NEED_DW=need_dweight, NEED_DB=need_dbias)
    w_arg = weight if weight is not None else x
    mean_arg = mean if mean is not None else rstd
    with on_device(x):
        if tile is not None:
            _norm_bwd_kernel[(programs, groups)](
                dy, x, w_arg, mean_arg, rstd, dx, dw_part, db_part, rows, cols, groups, rows_per_program,
                BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, num_warps=num_warps, **flags, **FMA)
        else:
            _norm_bwd_chunked_kernel[(programs,)](
                dy, x, w_arg, mean_arg, rstd, dx, dw_part, db_part, rows, cols, groups, rows_per_program,
                BLOCK_N=CHUNK, num_warps=8, **flags, **FMA)
        sums = [(part, grad) for need, part, grad in ((need_dweight, dw_part, dweight), (need_dbias, db_part, dbias))
                if need]
        if sums:
            block_p, block_n = _sum_tile(x, n)
            _sum_partials_kernel[(cdiv(n, block_n), len(sums))](
                *sums[0], *sums[-1], programs, n, BLOCK_P=block_p, BLOCK_N=block_n, num_warps=4, **FMA)
    return dx, dweight, dbias


def layer_norm_fwd(x, normalized_shape, weight, bias, eps, out=None, group_size=None):
    """(y, mean, rstd); `out` optionally gives them (contiguous, right shape).
    With group_size (a divisor of n), the statistics are over each group of
    group_size elements of a row, and have one more dim: the groups."""
    return _norm_fwd(x, normalized_shape, weight, bias, eps, False, out, group_size)


def layer_norm_bwd(dy, x, mean, rstd, weight, bias, need_dweight, need_dbias, out=None, group_size=None):
    """(dx, dweight, dbias); a gradient not asked for is an empty tensor."""
    return _norm_bwd(dy, x, mean, rstd, weight, bias, need_dweight, need_dbias, False, out, group_size)


def rms_norm_fwd(x, normalized_shape, weight, eps, out=None, group_size=None):
    """(y, rstd)."""
    y, _, rstd = _norm_fwd(x, normalized_shape, weight, None, eps, True, out, group_size)
    return y, rstd


def rms_norm_bwd(dy, x, rstd, weight, need_dweight, out=None, group_size=None):
    """(dx, dweight)."""
    dx, dweight, _ = _norm_bwd(dy, x, None, rstd, weight, None, need_dweight, False, True, out, group_size)
    return dx, dweight
