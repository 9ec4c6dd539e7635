"""Attention cases: bf16, batch x seqlen = 16k tokens, hidden 2048 (head dim
64 and 128), causal and not, forward and backward.

FLOPs (DESIGN.md section 5): forward 4 * B * H * Sq * Sk * D, half when
causal; backward 2.5x the forward. Peers: every SDPA backend torch has.
With a value head dim Dv of its own ("dv" in the dtype key; DeepSeek's MLA,
D 192 and Dv 128, 16 heads): forward 2 * B * H * Sq * Sk * (D + Dv) (Q K^T
and P V), backward 2 * B * H * Sq * Sk * (3 D + 2 Dv) (S, dQ and dK over D;
dP and dV over Dv), half of each when causal.
On a GPU of compute capability 9.0 and up, pyext-triton's forward and backward
read through tensor descriptors (TMA); pyext-triton-ptr times the same calls
with pointer loads forced, the Ampere path, so that one run compares the two.
pyext-triton's backward adds dQ up with atomics (flash_attention's default);
pyext-triton-det times the deterministic=True backward (dK/dV, then dQ in a
second kernel) beside it.
On compute capability 9.x pyext-cuda runs the sm_90a kernels (Stage 2: wgmma,
TMA) for head dims 64 and 128; pyext-cuda-stage1 times the mma.sync kernels
(Stage 1, what every other GPU runs) there too, through PYEXT_FLASH_SM90=0 set
around each timed call, so that one run measures both stages against the peers.
The CUDA backward adds dQ up with atomics (pyext-cuda, the default, either
stage); pyext-cuda-det times its deterministic=True backward (dK/dV, then dQ
in a second kernel) beside it.
Model-layout cases (causal, "bshd" in the label and dtype key) time what a
transformer block pays: q, k, v are (B, H, S, D) views of one packed
(B, S, 3, H, D) projection, and the output goes on as (B, S, H * D), so each
provider's layout copies, in and out and in the backward, are in its time.
They are also timed with attention dropout 0.1 ("dropout" in the dtype key), as
HF GPT-2 and BERT train: pyext-triton's dropout against the SDPA backends'
and FlashAttention's (the FLOPs counted are the matmuls' alone).
And with a key-padding mask ("padded" in the dtype key): a (B, 1, 1, S)
boolean attn_mask, each sequence attending to its first L keys, L drawn
from [S/2, S], as an HF encoder (BERT) gets a padded batch; and
"causal-padded": that padding and a causal mask in one (B, 1, S, S) boolean
attn_mask with is_causal=False, as HF hands SDPA a decoder's padded batch.
FLOPs counted: every (query, key) pair for "padded", half for
"causal-padded" (the pairs a causal attention computes), whatever the
lengths; the kernels skip the masked blocks they can (row_spans and
col_spans in triton_kernels/flash_attention/mask_spans.py).
And "window": a causal sliding window of WINDOW keys (Gemma 3's local
layers; Mistral's is 4096) at long S: pyext-triton and FlashAttention's
package as window_size=(WINDOW - 1, -1), no mask; pyext-triton-mask and the
SDPA backends as the (1, 1, S, S) boolean attn_mask that HF hands SDPA for a
sliding-window layer. FLOPs counted: the pairs in the window alone.
And "softcap": causal attention with Gemma 2's logit soft cap (50) and head
dim (256). torch's SDPA has no cap, so the peers are what a Gemma 2 user
runs: "eager", HF's eager attention (transformers runs Gemma 2 through it
alone: bf16 products, S x S scores, the softmax in fp32), "flex-attention"
(torch.compile of flex_attention with the cap as its score_mod and a
causal block mask; GPU only) and FlashAttention's package (softcap=).
FLOPs counted: the causal matmuls' alone (the tanh per score is extra work).
And "sinks": causal attention with attention sinks (one learned logit per
head in each row's softmax, GPT-OSS's) at GPT-OSS's head dim (64). torch's
SDPA has none, so the peers are "eager", HF's GPT-OSS eager attention (what
transformers runs it with: S x S scores, the sink a last column), and
"flex-attention" (compiled, causal block mask) with its lse turned into the
sinks' rescale, out * sigmoid(lse - sink); "pyext-triton-nosinks" times our
kernels on the same case without sinks, the sinks' own cost. FLOPs counted:
the causal matmuls'.
And "packed": documents of random lengths (uniform in [S/8, S], S the
longest; a fixed draw) laid end to end in TOKENS tokens, causal, as
padding-free fine-tuning trains (TRL's padding_free, HF's
DataCollatorWithFlattening): pyext-triton (flash_attention_varlen),
"torch-varlen" (torch.nn.attention.varlen.varlen_attn, PyTorch's own, its
CUDA flash kernel; GPU only) and FlashAttention's package
(flash_attn_varlen_func) take the offsets (cu_seqlens) and no mask; pyext-triton-mask and the SDPA backends the
(1, 1, T, T) block-diagonal causal mask HF builds for SDPA from packed
position_ids. FLOPs counted: each document's causal pairs, L^2 / 2.
And "bias": a learned relative position bias (T5's, BEiT's), a (1, H, S, S)
bf16 attn_mask that requires grad, non-causal, head dim 64: the backward
gives the bias its gradient too (pyext-triton: dS written by the dK/dV pass,
D summed from the tiles in a pass of its own; sdpa-efficient: its grad_bias;
sdpa-math: S x S autograd). sdpa-flash, sdpa-cudnn and FlashAttention's
package take no such mask. FLOPs counted: the matmuls' (every pair), the
delta pass's two more a tile not among them.
And a head dim that is not a multiple of 8 (UNALIGNED_HEAD_DIM, causal):
torch's SDPA flash kernel and FlashAttention's package pad it to one, the
CUDA kernels refuse it, pyext-triton runs its pointer kernels (rows not
16-byte aligned: no vector loads, no TMA), and pyext-triton-padded times
our kernels on q, k, v zero-padded to 64 as torch pads them (the copies in
its time); the case that decides pyext.ops.attention.SDPA_UNALIGNED_HEAD_AUTO_ORDER
and between the two ways. FLOPs counted at the head dim itself, not the
padded one.
"""
import functools
import itertools
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

import pyext
from benchmarks.harness import HAS_GPU, Case, Check, autograd_callable, optional_peer, oracle_of, our_backends
from pyext import reference

TOKENS, HIDDEN = 16384, 2048
SEQLENS = [512, 1024, 2048, 4096, 8192, 16384]
SEQLENS_QUICK = [1024, 4096]
# Model-layout cases where a layout copy weighs most beside the kernel (its
# bytes grow with S, the FLOPs with S^2): GPT-2-like contexts.
SEQLENS_MODEL, SEQLENS_MODEL_QUICK = [512, 1024, 2048], [1024]
MATH_MAX_SEQLEN = 2048  # the math backend materialises B*H*S*S scores
EAGER_MAX_SEQLEN = 4096  # the soft cap's eager peer too, in bf16 and fp32, once per case
SDPA = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
        "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-math": SDPBackend.MATH}
# the provider names its cases may hold (python -m benchmarks checks --skip-providers against them)
PROVIDERS = ("pyext-cuda", "pyext-triton", *SDPA, "flash-attn", "pyext-triton-ptr", "pyext-cuda-stage1",
             "pyext-triton-det", "pyext-cuda-det", "pyext-triton-mask", "eager", "flex-attention",
             "pyext-triton-nosinks", "pyext-triton-padded", "torch-varlen")


DROPOUT = 0.1  # the model-layout cases' second run, as GPT-2 and BERT train


def _sdpa(backend, causal, dropout_p, mask):
    def run(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, dropout_p=dropout_p)
    return run


def _ours(backend, causal, dropout_p, mask, window=None, softcap=0.0, sinks=None):
    if window:
        return lambda q, k, v: pyext.flash_attention(q, k, v, causal=True, window_size=(window - 1, -1),
                                                     dropout_p=dropout_p, backend=backend)
    if mask is None:
        return lambda q, k, v: pyext.flash_attention(q, k, v, causal=causal, dropout_p=dropout_p, softcap=softcap,
                                                     sinks=sinks, backend=backend)
    return lambda q, k, v: pyext.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                                              backend=backend)


# torch's own providers, whose error sets the correctness check's bound: the first of them that ran
YARDSTICKS = ("sdpa-flash", "sdpa-efficient", "sdpa-cudnn", "sdpa-math", "torch-varlen", "eager", "flex-attention")
ORACLE_CHUNK = 1 << 27  # scores of one chunk of the float64 oracle: 1 GiB


def _oracle(causal, mask, window, softcap, sinks):
    """The case's attention by its definition (pyext.reference.attention)
    for the float64 oracle, in chunks of one sequence and as many heads as
    keep its S x S scores within ORACLE_CHUNK, each recomputed in the
    backward rather than kept (checkpoint). A learned bias comes as a 4th
    input (it has a gradient); any other mask is the case's own."""
    def one(q, k, v, mask, sinks):
        return reference.attention(q, k, v, causal=causal, window=window, softcap=softcap, sinks=sinks,
                                   mask=mask)[0]

    def run(q, k, v, bias=None):
        full = mask if bias is None else bias
        heads = max(1, ORACLE_CHUNK // (q.shape[2] * k.shape[2]))
        sequences = []
        for b in range(q.shape[0]):
            chunks = []
            for h in range(0, q.shape[1], heads):
                hs = slice(h, h + heads)
                part = None if full is None else \
                    full[b if full.shape[0] > 1 else 0][None][:, hs if full.shape[1] > 1 else slice(None)]
                chunks.append(checkpoint(one, q[b:b + 1, hs], k[b:b + 1, hs], v[b:b + 1, hs], part,
                                         None if sinks is None else sinks[hs], use_reentrant=False))
            sequences.append(torch.cat(chunks, 1))
        return torch.cat(sequences)
    return run


def _padded_to_8(causal, head_dim, v_dim):
    """pyext's Triton attention on q, k (and v) zero-padded to head dims that
    8 divides, out cut back to v_dim: what torch's flash SDPA does with such
    heads. The zero columns add nothing to Q K^T, and P V's are cut off."""
    scale = head_dim ** -0.5

    def run(q, k, v):
        q, k = (F.pad(t, (0, -head_dim % 8)) for t in (q, k))
        out = pyext.flash_attention(q, k, F.pad(v, (0, -v_dim % 8)), causal=causal, scale=scale, backend="triton")
        return out[..., :v_dim]
    return run


def _padding_mask(batch, seqlen, device, causal):
    """(B, 1, 1, S) bool: sequence b attends to its first L_b keys, L_b in [S/2, S]
    (a fixed draw); causal: (B, 1, S, S), that and key j <= query i."""
    lengths = torch.randint(seqlen // 2, seqlen + 1, (batch,), generator=torch.Generator().manual_seed(0))
    mask = (torch.arange(seqlen)[None, :] < lengths[:, None])[:, None, None, :]
    if causal:
        mask = mask & torch.ones(seqlen, seqlen, dtype=torch.bool).tril()
    return mask.to(device)


def _learned_bias(heads, seqlen, device, dtype):
    """A (1, H, S, S) relative position bias that requires grad, as T5 and
    BEiT add one (a fixed draw, spread 2)."""
    bias = 2 * torch.randn(1, heads, seqlen, seqlen, generator=torch.Generator().manual_seed(0))
    return bias.to(device, dtype).requires_grad_()


def _with_the_bias_as_an_input(inputs, wrap, bias):
    """The case's inputs with the bias among them, so the backward computes
    its gradient; each provider, which holds the bias as its mask, called
    without it."""
    return inputs + [bias], lambda fn: (lambda *tensors: wrap(fn)(*tensors[:-1]))


def _window(seqlen):
    """The sliding window's keys at this length (a quarter of S in the CPU smoke run)."""
    return min(WINDOW, seqlen // 4)


def _window_mask(seqlen, device):
    """(1, 1, S, S) bool: query i attends keys i - window < j <= i."""
    i = torch.arange(seqlen, device=device)
    return ((i[None, :] <= i[:, None]) & (i[None, :] > i[:, None] - _window(seqlen)))[None, None]


def _eager_softcap(seqlen, device, dtype, softcap):
    """HF Gemma 2's eager attention, causal: products in the inputs' dtype,
    the cap, the causal mask added (HF's finfo.min above the diagonal, built
    once per forward and shared by its layers, so here once per case), the
    softmax in fp32, P in the inputs' dtype. S x S scores in memory."""
    if seqlen > EAGER_MAX_SEQLEN:
        return f"skipped above seqlen {EAGER_MAX_SEQLEN}: S x S scores in memory"
    bias = torch.full((seqlen, seqlen), torch.finfo(dtype).min, device=device, dtype=dtype).triu(1)

    def run(q, k, v):
        s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        s = softcap * torch.tanh(s / softcap) + bias
        return torch.softmax(s, -1, dtype=torch.float32).to(q.dtype) @ v
    return run


def _flex_softcap(seqlen, device, softcap):
    """torch.compile of flex_attention with the cap as its score_mod and a
    causal block mask (so it skips the blocks above the diagonal)."""
    if not HAS_GPU:
        return "skipped without a GPU (flex_attention's backward runs on GPUs only)"
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    block_mask = create_block_mask(lambda b, h, i, j: j <= i, None, None, seqlen, seqlen, device=device)
    compiled = torch.compile(flex_attention)

    def capped(score, b, h, i, j):
        return softcap * torch.tanh(score / softcap)
    return lambda q, k, v: compiled(q, k, v, score_mod=capped, block_mask=block_mask)


def _eager_sinks(seqlen, device, dtype, sinks):
    """HF GPT-OSS's eager attention, causal: products in the inputs' dtype, the
    causal mask added (finfo.min above the diagonal, built once per case), the
    sink a last column of the scores, the row max taken out, the softmax in
    the inputs' dtype, the sink's column dropped. S x S scores in memory."""
    if seqlen > EAGER_MAX_SEQLEN:
        return f"skipped above seqlen {EAGER_MAX_SEQLEN}: S x S scores in memory"
    bias = torch.full((seqlen, seqlen), torch.finfo(dtype).min, device=device, dtype=dtype).triu(1)

    def run(q, k, v):
        s = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5 + bias
        s = torch.cat([s, sinks.to(dtype).view(1, -1, 1, 1).expand(*s.shape[:-1], 1)], -1)
        s = s - s.amax(-1, keepdim=True)
        return torch.softmax(s, -1, dtype=s.dtype)[..., :-1] @ v
    return run


def _flex_sinks(seqlen, device, sinks):
    """torch.compile of flex_attention with a causal block mask, its lse
    turned into the sinks: with L = exp(lse), the sinks' output is
    out * L / (L + exp(sink)) = out * sigmoid(lse - sink)."""
    if not HAS_GPU:
        return "skipped without a GPU (flex_attention's backward runs on GPUs only)"
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    block_mask = create_block_mask(lambda b, h, i, j: j <= i, None, None, seqlen, seqlen, device=device)
    compiled = torch.compile(flex_attention)

    def run(q, k, v):
        out, lse = compiled(q, k, v, block_mask=block_mask, return_lse=True)
        return out * torch.sigmoid(lse - sinks.view(1, -1, 1)).unsqueeze(-1).to(out.dtype)
    return run


def _flash_attn_package(causal, dropout_p, mask, window=None, softcap=0.0):
    """FlashAttention's own package (its (B, S, H, D) layout, from our views);
    a sliding window of `window` keys as its window_size, in place of the mask."""
    flash_attn = optional_peer("flash_attn")
    if isinstance(flash_attn, str):
        return flash_attn
    if mask is not None and window is None:
        return "flash_attn_func takes no attention mask (its varlen API takes packed sequences instead)"
    extra = dict(causal=True, window_size=(window - 1, -1)) if window else dict(causal=causal)
    if softcap:
        extra["softcap"] = softcap
    return lambda q, k, v: flash_attn.flash_attn_func(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), dropout_p=dropout_p, **extra).transpose(1, 2)


def _triton_pointer_loads(causal, dropout_p, mask, window, softcap, sinks, why_not_triton, aligned=True):
    """pyext's Triton attention with pointer loads forced (forward and
    backward), or why it is not timed: where pyext-triton itself takes the
    pointer path it would time the same kernels again. aligned: the head
    dims are multiples of 8 (16-byte rows, what TMA needs)."""
    if why_not_triton is not None:
        return why_not_triton
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 9:
        return "same kernel as pyext-triton here: the descriptor kernels need compute capability 9.0+"
    if dropout_p or mask is not None:
        return "same kernel as pyext-triton: dropout, masks and windows run the pointer kernels"
    if not aligned:
        return "same kernel as pyext-triton: rows that are not 16-byte aligned run the pointer kernels"
    from pyext.triton_kernels import flash_attention

    def run(q, k, v):
        with flash_attention.use_loads("pointer"):
            return pyext.flash_attention(q, k, v, causal=causal, softcap=softcap, sinks=sinks, backend="triton")
    return run


def _triton_deterministic(causal, dropout_p, mask, window, softcap, sinks, why_not_triton):
    """pyext's Triton attention with deterministic=True, or why it is not timed."""
    if why_not_triton is not None:
        return why_not_triton
    if window:
        return lambda q, k, v: pyext.flash_attention(q, k, v, causal=True, window_size=(window - 1, -1),
                                                     dropout_p=dropout_p, deterministic=True, backend="triton")
    if mask is not None:  # scaled_dot_product_attention takes torch's flag for it
        def run(q, k, v):
            previous = torch.are_deterministic_algorithms_enabled()
            torch.use_deterministic_algorithms(True)
            try:
                return pyext.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p,
                                                          backend="triton")
            finally:
                torch.use_deterministic_algorithms(previous)
        return run
    return lambda q, k, v: pyext.flash_attention(q, k, v, causal=causal, dropout_p=dropout_p, softcap=softcap,
                                                 sinks=sinks, deterministic=True, backend="triton")


def _why_not_cuda_kernels(head_dim, v_dim, why_not_cuda):
    """Why pyext's CUDA attention cannot run this case at all, or None."""
    if why_not_cuda is not None:
        return why_not_cuda
    if v_dim != head_dim:
        return "the CUDA attention kernels take one head dim for q, k and v"
    return None


def _why_not_cuda_stage2(head_dim, v_dim, why_not_cuda):
    """Why pyext-cuda does not run the sm_90a kernels (Stage 2) here, or None
    where it does: what pyext-cuda-stage1 compares it with."""
    why = _why_not_cuda_kernels(head_dim, v_dim, why_not_cuda)
    if why is not None:
        return why
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] != 9:
        return "same kernels as pyext-cuda: Stage 2 (sm_90a) runs only on compute capability 9.x"
    if os.environ.get("PYEXT_FLASH_SM90") == "0":
        return "same kernels as pyext-cuda: PYEXT_FLASH_SM90=0 is set for this whole run"
    if (head_dim + 31) // 32 * 32 not in (64, 128):
        return "same kernels as pyext-cuda: Stage 2 covers head dims that pad to 64 or 128"
    return None


def _cuda_deterministic(causal, head_dim, v_dim, why_not_cuda):
    """pyext's CUDA attention with deterministic=True, or why it is not timed:
    beside pyext-cuda, whose backward (either stage's) adds dQ up with atomics."""
    why = _why_not_cuda_kernels(head_dim, v_dim, why_not_cuda)
    if why is not None:
        return why
    return lambda q, k, v: pyext.flash_attention(q, k, v, causal=causal, deterministic=True, backend="cuda")


def _cuda_stage1(head_dim, v_dim, why_not_cuda):
    """A maker of pyext-cuda's timed call with Stage 1 forced (PYEXT_FLASH_SM90=0
    while it runs, forward and backward alike), or why it is not timed: where
    pyext-cuda itself runs Stage 1 it would time the same kernels again."""
    why = _why_not_cuda_stage2(head_dim, v_dim, why_not_cuda)
    if why is not None:
        return why

    def stage1(timed):
        @functools.wraps(timed)  # its attributes too (harness.autograd_callable's forget_forward)
        def run():
            previous = os.environ.get("PYEXT_FLASH_SM90")
            os.environ["PYEXT_FLASH_SM90"] = "0"
            try:
                return timed()
            finally:
                if previous is None:
                    del os.environ["PYEXT_FLASH_SM90"]
                else:
                    os.environ["PYEXT_FLASH_SM90"] = previous
        return run
    return stage1


# (causal, dropout probability, None or what else: "padded", "causal-padded", "window", "softcap", "sinks"
# or "bias")
# of each case
STANDARD = ((False, 0.0, None), (True, 0.0, None))
MODEL = ((True, 0.0, None), (True, DROPOUT, None), (False, 0.0, "padded"), (False, 0.0, "causal-padded"))
PADDED = ("padded", "causal-padded")
WINDOW = 1024
SEQLENS_WINDOW, SEQLENS_WINDOW_QUICK = [4096, 8192, 16384], [8192]
SOFTCAP, SOFTCAP_HEAD_DIM = 50.0, 256  # Gemma 2's attention logit cap and head dim
SEQLENS_SOFTCAP, SEQLENS_SOFTCAP_QUICK = [2048, 4096], [4096]
SINKS_HEAD_DIM = 64  # GPT-OSS's
SEQLENS_SINKS, SEQLENS_SINKS_QUICK = [2048, 4096], [4096]
SEQLENS_PACKED, SEQLENS_PACKED_QUICK = [2048, 8192], [8192]
MLA = (192, 128)  # DeepSeek-V2/V3's query/key and value head dims
SEQLENS_MLA, SEQLENS_MLA_QUICK = [2048, 4096], [4096]
BIAS_HEAD_DIM = 64
SEQLENS_BIAS, SEQLENS_BIAS_QUICK = [512, 1024, 2048], [1024]
UNALIGNED_HEAD_DIM = 59  # not a multiple of 8 (FlashAttention's tests use 59 and 111)
SEQLENS_UNALIGNED, SEQLENS_UNALIGNED_QUICK = [2048, 4096], [4096]


def _grid(quick: bool, dtypes):
    """(seqlen, head dim, value head dim, model layout?, variants as STANDARD
    and MODEL); each variant gives a forward and a backward case."""
    if torch.bfloat16 not in dtypes and torch.float16 not in dtypes:
        return []
    if not HAS_GPU:
        return [(64, 32, 32, False, STANDARD + ((False, 0.0, "window"), (True, 0.0, "softcap"), (True, 0.0, "sinks"),
                                                (False, 0.0, "bias"))),
                (64, 32, 32, True, MODEL), (64, 32, 16, False, STANDARD[1:]), (64, 20, 20, False, STANDARD[1:])]
    seqlens = SEQLENS_QUICK if quick else SEQLENS
    head_dims = (128,) if quick else (64, 128)
    standard = [(s, d, d, False, STANDARD) for s in seqlens for d in head_dims]
    model = [(s, d, d, True, MODEL) for s in (SEQLENS_MODEL_QUICK if quick else SEQLENS_MODEL) for d in head_dims]
    mla = [(s, *MLA, False, STANDARD[1:]) for s in (SEQLENS_MLA_QUICK if quick else SEQLENS_MLA)]
    window = [(s, d, d, False, ((False, 0.0, "window"),))
              for s in (SEQLENS_WINDOW_QUICK if quick else SEQLENS_WINDOW) for d in head_dims]
    softcap = [(s, SOFTCAP_HEAD_DIM, SOFTCAP_HEAD_DIM, False, ((True, 0.0, "softcap"),))
               for s in (SEQLENS_SOFTCAP_QUICK if quick else SEQLENS_SOFTCAP)]
    sinks = [(s, SINKS_HEAD_DIM, SINKS_HEAD_DIM, False, ((True, 0.0, "sinks"),))
             for s in (SEQLENS_SINKS_QUICK if quick else SEQLENS_SINKS)]
    bias = [(s, BIAS_HEAD_DIM, BIAS_HEAD_DIM, False, ((False, 0.0, "bias"),))
            for s in (SEQLENS_BIAS_QUICK if quick else SEQLENS_BIAS)]
    unaligned = [(s, UNALIGNED_HEAD_DIM, UNALIGNED_HEAD_DIM, False, STANDARD[1:])
                 for s in (SEQLENS_UNALIGNED_QUICK if quick else SEQLENS_UNALIGNED)]
    return standard + model + mla + window + softcap + sinks + bias + unaligned


def _packed_grid(quick: bool, dtypes):
    """(longest document, head dim) of the "packed" cases."""
    if torch.bfloat16 not in dtypes and torch.float16 not in dtypes:
        return []
    if not HAS_GPU:
        return [(32, 32)]
    return [(s, 128) for s in (SEQLENS_PACKED_QUICK if quick else SEQLENS_PACKED)]


def count(quick: bool, dtypes) -> int:
    return sum(2 * len(variants) for *_, variants in _grid(quick, dtypes)) + 2 * len(_packed_grid(quick, dtypes))


def _in_model_layout(fn):
    """fn as a GPT block calls it: q, k, v split from one packed (B, S, 3, H, D)
    projection, the output reshaped to (B, S, H * D) for the next linear."""
    def run(qkv):
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        return fn(q, k, v).transpose(1, 2).reshape(qkv.shape[0], qkv.shape[1], -1)
    return run


def _tensors(batch, heads, seqlen, head_dim, v_dim, model_layout, device, dtype):
    """The inputs to time over, the output gradient, and how a provider's
    (q, k, v) function is called on those inputs."""
    if not model_layout:
        q, k, v = (torch.randn(batch, heads, seqlen, d, device=device, dtype=dtype, requires_grad=True)
                   for d in (head_dim, head_dim, v_dim))
        return [q, k, v], torch.randn_like(v), lambda fn: fn
    qkv = torch.randn(batch, seqlen, 3, heads, head_dim, device=device, dtype=dtype, requires_grad=True)
    dout = torch.randn(batch, seqlen, heads * head_dim, device=device, dtype=dtype)
    return [qkv], dout, _in_model_layout


def cases(quick: bool, dtypes):
    dtype = torch.bfloat16 if torch.bfloat16 in dtypes else torch.float16
    device = "cuda" if HAS_GPU else "cpu"
    ours = our_backends()
    for seqlen, head_dim, v_dim, model_layout, variants in _grid(quick, dtypes):
        heads = HIDDEN // v_dim if HAS_GPU else 2
        batch = max(TOKENS // seqlen, 1) if HAS_GPU else 1
        tensors = _tensors(batch, heads, seqlen, head_dim, v_dim, model_layout, device, dtype)
        for causal, dropout_p, extra in variants:
            inputs, dout, wrap = tensors
            window = _window(seqlen) if extra == "window" else None
            softcap = SOFTCAP if extra == "softcap" else 0.0
            sinks = torch.randn(heads, generator=torch.Generator().manual_seed(0)).to(device).requires_grad_() \
                if extra == "sinks" else None
            mask = _window_mask(seqlen, device) if window else \
                _padding_mask(batch, seqlen, device, extra == "causal-padded") if extra in PADDED else \
                _learned_bias(heads, seqlen, device, dtype) if extra == "bias" else None
            if extra == "bias":
                inputs, wrap = _with_the_bias_as_an_input(inputs, wrap, mask)
            fns = {f"pyext-{b}": _ours(b, causal, dropout_p, mask, window, softcap, sinks) for b in ("cuda", "triton")}
            if dropout_p or extra:
                fns["pyext-cuda"] = "the CUDA attention kernels have no dropout, mask, window, soft cap or sinks"
            if head_dim % 8 or v_dim % 8:
                fns["pyext-cuda"] = "the CUDA attention kernels take head dims that are multiples of 8"
                fns["pyext-triton-padded"] = ours["pyext-triton"] or _padded_to_8(causal, head_dim, v_dim)
            if window:  # what an HF sliding-window layer runs: the band as a mask
                fns["pyext-triton-mask"] = _ours("triton", causal, dropout_p, mask) \
                    if ours["pyext-triton"] is None else ours["pyext-triton"]
            if softcap:
                fns.update({name: "torch's SDPA has no soft cap" for name in SDPA})
                fns["eager"] = _eager_softcap(seqlen, device, dtype, softcap)
                fns["flex-attention"] = _flex_softcap(seqlen, device, softcap)
            elif sinks is not None:
                fns.update({name: "torch's SDPA has no sinks" for name in SDPA})
                fns["pyext-triton-nosinks"] = _ours("triton", causal, dropout_p, mask) \
                    if ours["pyext-triton"] is None else ours["pyext-triton"]
                fns["eager"] = _eager_sinks(seqlen, device, dtype, sinks)
                fns["flex-attention"] = _flex_sinks(seqlen, device, sinks)
            else:
                fns.update({name: _sdpa(backend, causal, dropout_p, mask) for name, backend in SDPA.items()})
            fns["flash-attn"] = "flash_attn_func has no sinks" if sinks is not None else \
                _flash_attn_package(causal, dropout_p, mask, window, softcap)
            pairs = batch * heads * seqlen * seqlen / (2 if causal or extra == "causal-padded" else 1)
            if window:  # rows before the window fills see i + 1 keys, the rest the window
                pairs = batch * heads * (window * (window + 1) / 2 + (seqlen - window) * window)
            options = ("-causal" if causal else "") + ("-bshd" if model_layout else "") + \
                ("-dropout" if dropout_p else "") + (f"-{extra}" if extra else "")
            dims = f"d{head_dim}" + (f"-dv{v_dim}" if v_dim != head_dim else "")
            label = f"S={seqlen} D={head_dim}{f' Dv={v_dim}' if v_dim != head_dim else ''}{options.replace('-', ' ')}"
            for direction, flops in (("fwd", 2 * pairs * (head_dim + v_dim)),
                                     ("bwd", 2 * pairs * (3 * head_dim + 2 * v_dim))):
                providers = {}
                for name, fn in fns.items():
                    if ours.get(name):
                        providers[name] = ours[name]
                    elif isinstance(fn, str):
                        providers[name] = fn
                    elif name == "sdpa-math" and seqlen > MATH_MAX_SEQLEN:
                        providers[name] = f"skipped above seqlen {MATH_MAX_SEQLEN}: S x S scores in memory"
                    else:
                        providers[name] = autograd_callable(wrap(fn), inputs, direction, dout)
                # each variant of ours only where it differs from pyext-triton: the
                # pointer loads, and in the backward the deterministic dQ
                variants = {"pyext-triton-ptr": functools.partial(_triton_pointer_loads,
                                                                  aligned=head_dim % 8 == v_dim % 8 == 0)}
                if direction == "bwd":
                    variants["pyext-triton-det"] = _triton_deterministic
                for variant, fn in variants.items():
                    fn = fn(causal, dropout_p, mask, window, softcap, sinks, ours["pyext-triton"])
                    providers[variant] = fn if isinstance(fn, str) else \
                        autograd_callable(wrap(fn), inputs, direction, dout)
                why_not_cuda = ours["pyext-cuda"] or \
                    (fns["pyext-cuda"] if isinstance(fns["pyext-cuda"], str) else None)
                if direction == "bwd":
                    fn = _cuda_deterministic(causal, head_dim, v_dim, why_not_cuda)
                    providers["pyext-cuda-det"] = fn if isinstance(fn, str) else \
                        autograd_callable(wrap(fn), inputs, direction, dout)
                stage1 = _cuda_stage1(head_dim, v_dim, why_not_cuda)
                providers["pyext-cuda-stage1"] = stage1 if isinstance(stage1, str) else \
                    stage1(autograd_callable(wrap(fns["pyext-cuda"]), inputs, direction, dout))
                yield Case(op="attention", label=label, size=seqlen,
                           dtype=f"{str(dtype).split('.')[1]}-{dims}{options}",
                           direction=direction, bytes=0, flops=flops, providers=providers,
                           check=_check(causal, dropout_p, mask, window, softcap, sinks, extra, inputs, wrap,
                                        direction, dout),
                           shape=dict(batch=batch, heads=heads, seqlen=seqlen, head_dim=head_dim, v_dim=v_dim))
    yield from _packed_cases(quick, dtypes, dtype, device, ours)


def _check(causal, dropout_p, mask, window, softcap, sinks, extra, inputs, wrap, direction, dout):
    """How a dense case's providers are checked (harness.Check): against the
    float64 oracle, torch's providers setting the bound; not with dropout,
    whose draws differ from one provider to the next."""
    if dropout_p:
        return "dropout: each provider draws its own mask"
    fn = _oracle(causal, None if extra == "bias" else mask, (window - 1, 0) if window else None, softcap, sinks)
    oracle = oracle_of(fn if extra == "bias" else wrap(fn), inputs, direction, dout)  # the bias: its 4th input
    return Check(oracle, YARDSTICKS, unchecked={"pyext-triton-nosinks": "the case without its sinks"})


def _document_lengths(total: int, longest: int):
    """Lengths of documents filling `total` tokens, drawn uniformly from
    [longest / 8, longest] (a fixed draw), the last one cut to fit."""
    generator, lengths = torch.Generator().manual_seed(0), []
    while sum(lengths) < total:
        drawn = int(torch.randint(longest // 8, longest + 1, (1,), generator=generator))
        lengths.append(min(drawn, total - sum(lengths)))
    return lengths


def _block_diagonal_mask(lengths, device):
    """(1, 1, T, T) bool: token i attends token j of its own document, j <= i."""
    document = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(device)
    i = torch.arange(len(document), device=device)
    return ((document[:, None] == document[None, :]) & (i[None, :] <= i[:, None]))[None, None]


def _varlen(run_packed):
    """A (total, H, D) packed-batch function as a (1, H, T, D) one, the inputs' layout here."""
    return lambda q, k, v: run_packed(*(t[0].transpose(0, 1) for t in (q, k, v))).transpose(0, 1)[None]


def _flash_attn_varlen_package(cu_seqlens, longest):
    flash_attn = optional_peer("flash_attn")
    if isinstance(flash_attn, str):
        return flash_attn
    return _varlen(lambda q, k, v: flash_attn.flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, longest,
                                                                     longest, causal=True))


def _torch_varlen(cu_seqlens, longest):
    """PyTorch's own packed attention (torch 2.10 on), causal as window_size (-1, 0)."""
    if not HAS_GPU:
        return "skipped without a GPU (torch's varlen_attn runs its CUDA flash kernel only)"
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    return _varlen(lambda q, k, v: varlen_attn(q, k, v, cu_seqlens, cu_seqlens, longest, longest,
                                               window_size=(-1, 0)))


def _packed_cases(quick, dtypes, dtype, device, ours):
    """The "packed" cases (module docstring)."""
    total = TOKENS if HAS_GPU else 96
    for longest, head_dim in _packed_grid(quick, dtypes):
        heads = HIDDEN // head_dim if HAS_GPU else 2
        lengths = _document_lengths(total, longest)
        cu_seqlens = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
        mask = _block_diagonal_mask(lengths, device)
        inputs, dout, _ = _tensors(1, heads, total, head_dim, head_dim, False, device, dtype)

        def ours_packed(deterministic, backend="triton"):
            return _varlen(lambda q, k, v: pyext.flash_attention_varlen(
                q, k, v, cu_seqlens, cu_seqlens, longest, longest, causal=True, deterministic=deterministic,
                backend=backend))
        fns = {"pyext-cuda": "the CUDA attention kernels have no packed batches",
               "pyext-cuda-stage1": "the CUDA attention kernels have no packed batches",
               "pyext-triton": ours_packed(False), "pyext-triton-mask": _ours("triton", False, 0.0, mask),
               **{name: _sdpa(backend, False, 0.0, mask) for name, backend in SDPA.items()},
               "torch-varlen": _torch_varlen(cu_seqlens, longest),
               "flash-attn": _flash_attn_varlen_package(cu_seqlens, longest)}
        pairs = heads * sum(n * n for n in lengths) / 2
        label = f"S<={longest} D={head_dim} causal packed"
        for direction, flops in (("fwd", 4 * pairs * head_dim), ("bwd", 10 * pairs * head_dim)):
            providers = {}
            for name, fn in fns.items():
                why_not = ours.get(name.replace("-mask", ""))
                if why_not or isinstance(fn, str):
                    providers[name] = why_not or fn
                elif name == "sdpa-math" and total > MATH_MAX_SEQLEN:
                    providers[name] = f"skipped above seqlen {MATH_MAX_SEQLEN}: S x S scores in memory"
                else:
                    providers[name] = autograd_callable(fn, inputs, direction, dout)
            # why not, as for the dense cases; on sm_90 because there is nothing else
            why_not = _triton_pointer_loads(True, 0.0, None, None, 0.0, None, ours["pyext-triton"])
            providers["pyext-triton-ptr"] = why_not if isinstance(why_not, str) else \
                "same kernel as pyext-triton: packed batches run the pointer kernels"
            if direction == "bwd":
                providers["pyext-triton-det"] = ours["pyext-triton"] or autograd_callable(ours_packed(True), inputs,
                                                                                         direction, dout)
                providers["pyext-cuda-det"] = fns["pyext-cuda"]
            yield Case(op="attention", label=label, size=longest,
                       dtype=f"{str(dtype).split('.')[1]}-d{head_dim}-causal-packed",
                       direction=direction, bytes=0, flops=flops, providers=providers,
                       check=Check(oracle_of(_oracle(False, mask, None, 0.0, None), inputs, direction, dout),
                                   YARDSTICKS),
                       shape=dict(tokens=total, heads=heads, documents=len(lengths), longest=longest,
                                  head_dim=head_dim))
