"""python -m benchmarks.host_cost [--quick]: the host time of pyext's Python path, on any machine.

Every public call pays for checks, backend choice, autograd and the
dispatcher before its kernel launches; at small sizes that host time, not
the kernel, sets the speed. This measures it without a GPU: the CUDA ops
get CPU bodies that only allocate their outputs (or, for the forwards, call
torch's own function on tiny tensors), and pyext's functions are timed with
backend="cuda" beside torch's on the same tiny tensors (best of 7 rounds).
Packed batches (flash_attention_varlen, which only the Triton kernels run)
are timed with backend="triton" and the Triton launches made no-ops, beside
torch's SDPA with the block-diagonal mask that HF gives it for such a row.
Needs the CUDA extension built (its ops registered), not a GPU. The figures
are this machine's host times, not kernel times; benchmarks/NOTES.md
("Host cost of a call") keeps them. --quick makes a hundredth of the calls:
it shows that the tool runs (the CPU test runs it so), not what anything costs.
"""
import argparse
import time

import torch
import torch.nn.functional as F

import pyext
from pyext import _backend


def _cpu_bodies():
    """CPU implementations of the CUDA ops: outputs of the right shapes, little
    work. Zeros, not empty tensors: the timed backwards add the gradients into
    .grad, and adding uninitialized memory (denormals, NaN) is slow on a CPU."""
    def ln_fwd(x, shape, w, b, eps):
        stat = x.new_zeros(x.shape[:x.dim() - len(shape)])
        return F.layer_norm(x, shape, w, b, eps), stat, stat.clone()

    def ln_bwd(g, x, mean, rstd, w, b, need_dw, need_db):
        return (torch.zeros_like(x), torch.zeros_like(w) if need_dw else x.new_empty(0),
                torch.zeros_like(b) if need_db else x.new_empty(0))

    def attn_fwd(q, k, v, scale, causal, offset):
        return torch.zeros_like(q), q.new_zeros(q.shape[:-1], dtype=torch.float32), q.new_empty(0)

    def attn_bwd(dout, q, k, v, out, out_lo, lse, scale, causal, offset, deterministic):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)

    return {"layer_norm_fwd_cuda": ln_fwd, "layer_norm_bwd_cuda": ln_bwd,
            "gelu_fwd_cuda": lambda x, approximate: F.gelu(x, approximate=approximate),
            "gelu_bwd_cuda": lambda grad, x, approximate: torch.zeros_like(x),
            "flash_attn_fwd_cuda": attn_fwd, "flash_attn_bwd_cuda": attn_bwd,
            "adamw_step_cuda": lambda *args: None}


class _NoLaunch:
    """Stands in for a Triton kernel: kernel[grid](...) and, for an autotuned
    one, kernel.launch(grid, key, ...) (chosen_configs) launch nothing."""
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None

    def launch(self, grid, key, *args, **kwargs):
        pass


def _device_reason_on_cpu(backend, *tensors, dtensors=False):
    """_backend.device_reason with CPU tensors standing in for CUDA ones: the
    same passes over the tensors (their kinds, then their devices), so that
    a call over many tensors (AdamW's 296) pays for them here as on a GPU."""
    return _backend._tensor_kind_reason(tensors, dtensors) or (None if all(t.is_cpu for t in tensors) else "not CPU")


def best_us(f, calls: int, rounds: int = 7) -> float:
    """Best of `rounds` of `calls` calls, in us per call."""
    for _ in range(calls // 10):
        f()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            f()
        best = min(best, (time.perf_counter() - start) / calls * 1e6)
    return best


def _hf_layer_calls(q, k, v):
    """An HF GQA attention layer's call: transformers' own SDPA integration
    beside it as pyext.patch runs it (backend "cuda"), when transformers is
    installed."""
    try:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
    except ImportError:
        return {}
    from pyext.patch.hf_attention import _hf_attention

    class Layer(torch.nn.Module):
        num_key_value_groups, is_causal, layer_idx = q.shape[1] // k.shape[1], True, 0
    layer = Layer()
    return {"HF layer (gqa)": (lambda: sdpa_attention_forward(layer, q, k, v, None)[0],
                               lambda: _hf_attention(sdpa_attention_forward, "cuda", layer, q, k, v, None)[0])}


def _packed_calls():
    """A packed row of three documents of 4 tokens: flash_attention_varlen
    (Triton launches no-ops) beside torch's SDPA with the block-diagonal
    causal mask; and an HF GQA layer on it through pyext.patch beside
    transformers' own SDPA integration (when transformers is installed)."""
    from pyext.triton_kernels.flash_attention import backward, forward
    for module, kernel in ((forward, "_fwd_kernel"), (backward, "_bwd_delta_kernel"), (backward, "_bwd_dq_kernel"),
                           (backward, "_bwd_dkdv_kernel"), (backward, "_bwd_dkdv_dq_kernel")):
        setattr(module, kernel, _NoLaunch())
    q, k, v = (torch.randn(12, heads, 16, dtype=torch.bfloat16, requires_grad=True) for heads in (4, 2, 2))
    cu_seqlens = torch.tensor([0, 4, 8, 12], dtype=torch.int32)
    document, i = torch.arange(12) // 4, torch.arange(12)
    mask = ((document[:, None] == document[None, :]) & (i[None, :] <= i[:, None]))[None, None]
    q4, k4, v4 = (t.transpose(0, 1)[None] for t in (q, k, v))
    calls = {"varlen (packed)": (
        lambda: F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, enable_gqa=True),
        lambda: pyext.flash_attention_varlen(q, k, v, cu_seqlens, cu_seqlens, 4, 4, causal=True, backend="triton"))}
    try:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward
    except ImportError:
        return calls
    from pyext.patch.hf_attention import _hf_attention

    class Layer(torch.nn.Module):
        num_key_value_groups, is_causal, layer_idx = 2, True, 0
    layer, positions = Layer(), (torch.arange(12) % 4)[None]
    calls["HF layer (packed)"] = (
        lambda: sdpa_attention_forward(layer, q4, k4, v4, mask, position_ids=positions)[0],
        lambda: _hf_attention(sdpa_attention_forward, "triton", layer, q4, k4, v4, mask, position_ids=positions)[0])
    return calls


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a hundredth of the calls; its figures are noise")
    calls_per_round = 20 if parser.parse_args().quick else 2000  # the forwards'; half for fwd+bwd, 3/20 for AdamW
    if not _backend.CUDA_BUILT:
        raise SystemExit(f"needs the CUDA extension's ops: {_backend._CUDA_BUILD_NOTE}")
    library = torch.library.Library("pyext", "IMPL")  # kept alive until the end of main
    for op, body in _cpu_bodies().items():
        library.impl(op, body, "CPU")
    _backend.device_reason = _device_reason_on_cpu

    x, w, b = (torch.randn(*shape, requires_grad=True) for shape in ((4, 8), (8,), (8,)))
    q, k, v = (torch.randn(1, 2, 4, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    q4 = torch.randn(1, 4, 4, 16, dtype=torch.bfloat16, requires_grad=True)  # GQA: 4 query heads, 2 key heads
    mask = torch.ones(4, 4, dtype=torch.bool).tril()
    calls = {  # name -> (torch's, ours); the CUDA kernels take no mask: that call's pyext runs torch's SDPA
        "layer_norm": (lambda: F.layer_norm(x, (8,), w, b), lambda: pyext.layer_norm(x, (8,), w, b, backend="cuda")),
        "gelu": (lambda: F.gelu(x), lambda: pyext.gelu(x, backend="cuda")),
        "sdpa (causal)": (lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                          lambda: pyext.scaled_dot_product_attention(q, k, v, is_causal=True, backend="cuda")),
        "sdpa (gqa)": (lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True),
                       lambda: pyext.scaled_dot_product_attention(q4, k, v, enable_gqa=True, backend="cuda")),
        "sdpa (mask)": (lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask),
                        lambda: pyext.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="torch")),
    }
    calls.update(_hf_layer_calls(q4, k, v))
    calls.update(_packed_calls())
    print("host time per call, us (tiny CPU tensors; the CUDA ops run CPU bodies)")
    print(f"{'op':18s} {'fwd torch':>10s} {'fwd pyext':>10s} {'fwd+bwd torch':>14s} {'fwd+bwd pyext':>14s}")
    for name, (theirs, ours) in calls.items():
        row = [best_us(f, calls_per_round) for f in (theirs, ours)]
        row += [best_us(lambda f=f: f().sum().backward(), calls_per_round // 2) for f in (theirs, ours)]
        print(f"{name:18s} {row[0]:10.1f} {row[1]:10.1f} {row[2]:14.1f} {row[3]:14.1f}")

    def params():
        ps = [torch.nn.Parameter(torch.randn(4)) for _ in range(148)]  # GPT-2 small's tensor count
        for p in ps:
            p.grad = torch.randn(4)
        return ps
    from pyext.triton_kernels import adamw as triton_adamw
    triton_adamw._adamw_kernel = _NoLaunch()
    steps = {"torch fused (its CPU kernel included)": torch.optim.AdamW(params(), fused=True),
             "pyext cuda (kernel a no-op)": pyext.optim.AdamW(params(), backend="cuda"),
             "pyext triton (launch a no-op)": pyext.optim.AdamW(params(), backend="triton")}
    print("AdamW step, 148 tensors: " + ", ".join(f"{name} {best_us(opt.step, calls_per_round * 3 // 20) / 1e3:.3f} ms"
                                                  for name, opt in steps.items()))


if __name__ == "__main__":
    main()
