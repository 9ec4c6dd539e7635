"""FlashAttention forward and backward in Triton (FlashAttention-2 scheme).

Shapes: q (B, Hq, Sq, D); k (B, Hkv, Sk, D); v (B, Hkv, Sk, Dv), Hq a multiple
of Hkv (query head h reads key head h // (Hq / Hkv): GQA/MQA with no copies).
Dv is D, or its own (DeepSeek's MLA: D 192, Dv 128; the host keeps it below
D, see pyext/ops/attention_checks.py). Any strides with a unit last stride, dout's
too. out (B, Hq, Sq, Dv) in q's memory order
(as torch's flash SDPA: for q a (B, S, H, D) view, out is one too, so the
caller's out.transpose(1, 2).contiguous() copies nothing); lse (B, Hq, Sq)
fp32, natural log. Causal: key j is visible to query i iff j <= i + causal_offset
(0: top-left, as torch's SDPA; Sk - Sq: bottom-right, as FlashAttention).
Local window (flash_attention's window_size, WINDOW): key j is visible to query
i iff i + causal_offset - left <= j <= i + causal_offset + right; the kernels
visit only the key blocks of a query block's window and the query blocks of
a key block's (no mask tensor; the pointer forward).
A row that sees no key gets out = 0, lse = -inf and zero gradients.
Soft cap (softcap = c > 0, Gemma 2's and Grok's logit capping, SOFTCAP): the
scores s = q k^T * scale become c tanh(s / c) before any mask and the
softmax, so |logit| < c; the backward multiplies dS by the cap's derivative,
1 - tanh^2(s / c), before dQ and dK (the tanh recomputed with the scores).
The forward stores out_lo too, as the masked one (below): a cap with large
scores leaves rows nearly one-hot.
Sinks (sinks, (Hq,), GPT-OSS's attention sinks, SINK): one more logit per
head in every row's softmax, with no value: the forward starts each row at
(m, l) = (sink * log2(e), 1), so out is divided by a sum that includes it
and lse includes it. P over the keys, recomputed from that lse, is then
right as it is: dQ, dK and dV need no change. The sink's own gradient is
-sum over rows of P_sink * D with P_sink = exp(sink - lse) and D (below)
summed from the dK/dV kernel's fp32 tiles as sum_j P_ij dP_ij, not from
the rounded O (flash_attn_bwd's `sinks`). The forward stores out_lo too, as
the masked one (below): a row that sees one key and its sink has dS =
P (1 - P) dP, a small difference where the sink is small.
Dropout (dropout_p > 0): each P element is kept with probability
keep = 1 - dropout_p and scaled by 1 / keep; the keep mask is drawn from
Philox (four uniforms per call, see _dropout_keep) under the key
seed + (b * Hq + h), the seed a device tensor (so torch's RNG, CUDA graphs
and torch.compile handle it): the backward draws the same mask, never
stored. lse is that of the undropped P. The dropout forward stores out_lo
too, as the masked one (below): a row that sees one key has O = v / keep,
which out rounds where v alone it would not.
Mask (SDPA's attn_mask, broadcast to (B, Hq, Sq, Sk), any strides): boolean
(False: the key is not attended) or additive (added to the scores, in fp32).
The masked kernels keep each row's max m and sum l apart, (B, Hq, Sq, 2) fp32
in place of lse: a row masked everywhere with a huge finite value (finfo.min,
as HF writes masks) has m near -3.4e38, where m + log2(l) would lose l, and
the backward's P = exp2(s - m) / l needs it. They also store out_lo, what
rounding out left out, and the backward's D below is rowsum(dO * (out +
out_lo)): a bias makes rows nearly one-hot, where dP - D is a small
difference that out's 8 bits in D would swamp (tiles._low_part).
An additive mask's gradient (flash_attn_bwd's dmask: a learned bias) is dS
itself, written by the dK/dV pass; D for it is rowsum(P * dP), summed from
the tiles in a pass of its own (two more matmuls a tile), since O came from
P rounded in the forward's P V and D from it is off by 2^-9 relative, where
torch computes a float32 mask's gradient in float32.
A scale of 2/sqrt(D) or more (peaky_scale) spreads the logits as a bias
does, so those calls store out_lo too (LOW_PART); below it, plain
attention stores none, as FlashAttention.

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

Each pass has two versions that compute the same thing: one loads tiles
through pointers (masked loads; Ampere, and the fallback), the other through
tensor descriptors (TMA copies on sm_90 and up, pipelined; the forward's key
loop optionally warp specialised), for calls with no dropout, mask, window
or packed batch. loads.py picks one per call (use_loads() and
$PYEXT_TRITON_ATTN_LOADS override it).

A packed batch (FlashAttention's varlen: sequences of different lengths end
to end, no padding) runs the same kernels with VARLEN; see varlen.py.

Files: tiles.py, the per-tile device helpers both passes share (causal
bounds, masks, dropout); launch.py, the host side both share (autotune
configs, a launch's arguments, a mask's view and block bounds); loads.py,
pointers or descriptors; forward.py, the forward's kernels and launch
function; backward.py, the backward's pointer kernels and launch function,
backward_tma.py its descriptor kernels, backward_steps.py the per-tile math
both share; varlen.py, the packed batch's launches; dropout.py, the dropout
mask as a tensor for the reference.
"""
from .backward import flash_attn_bwd
from .dropout import dropout_keep_mask
from .forward import flash_attn_fwd, peaky_scale, stores_low_part
from .launch import MAX_DROPOUT_SCORES, empty_out
from .loads import LOADS, LOADS_ENV, backward_loads, forward_loads, loads_mode, use_loads
from .varlen import flash_attn_varlen_bwd, flash_attn_varlen_fwd

__all__ = ["LOADS", "LOADS_ENV", "MAX_DROPOUT_SCORES", "backward_loads", "dropout_keep_mask", "empty_out",
           "flash_attn_bwd", "flash_attn_fwd", "flash_attn_varlen_bwd", "flash_attn_varlen_fwd", "forward_loads",
           "loads_mode", "peaky_scale", "stores_low_part", "use_loads"]
