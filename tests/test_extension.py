"""The CUDA extension pyext._C: built, loadable, its ops registered.

`make test` sets PYEXT_REQUIRE_CUDA_EXT=1 where nvcc is present, so a CUDA
build that silently failed fails here instead of being skipped.
"""
import json
import os

import pytest
import torch

from pyext import _backend, _extension_build

REQUIRED = os.environ.get("PYEXT_REQUIRE_CUDA_EXT") == "1"

if not _backend.CUDA_BUILT and not REQUIRED:
    pytest.skip(f"extension not built: {_backend._CUDA_BUILD_NOTE}", allow_module_level=True)

CUDA_OPS = {
    "gelu_fwd_cuda": "pyext::gelu_fwd_cuda(Tensor x, str approximate) -> Tensor",
    "gelu_bwd_cuda": "pyext::gelu_bwd_cuda(Tensor grad, Tensor x, str approximate) -> Tensor",
    "layer_norm_fwd_cuda": "pyext::layer_norm_fwd_cuda(Tensor x, int[] normalized_shape, Tensor? weight, "
                           "Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)",
    "layer_norm_bwd_cuda": "pyext::layer_norm_bwd_cuda(Tensor grad, Tensor x, Tensor mean, Tensor rstd, "
                           "Tensor? weight, Tensor? bias, bool need_dweight, bool need_dbias) "
                           "-> (Tensor, Tensor, Tensor)",
    "rms_norm_fwd_cuda": "pyext::rms_norm_fwd_cuda(Tensor x, int[] normalized_shape, Tensor? weight, "
                         "float eps) -> (Tensor, Tensor)",
    "rms_norm_bwd_cuda": "pyext::rms_norm_bwd_cuda(Tensor grad, Tensor x, Tensor rstd, Tensor? weight, "
                         "bool need_dweight) -> (Tensor, Tensor)",
    "flash_attn_fwd_cuda": "pyext::flash_attn_fwd_cuda(Tensor q, Tensor k, Tensor v, float scale, bool causal, "
                           "int causal_offset) -> (Tensor, Tensor, Tensor)",
    "flash_attn_bwd_cuda": "pyext::flash_attn_bwd_cuda(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, "
                           "Tensor out_lo, Tensor lse, float scale, bool causal, int causal_offset, "
                           "bool deterministic) -> (Tensor, Tensor, Tensor)",
    "adamw_step_cuda": ("pyext::adamw_step_cuda(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, "
                        "Tensor(d!)[] exp_avg_sqs, Tensor(e!)[] max_exp_avg_sqs, Tensor steps, float lr, "
                        "Tensor? lr_tensor, float beta1, float beta2, float eps, float weight_decay, "
                        "bool amsgrad, bool maximize, Tensor? grad_scale, Tensor? found_inf) -> ()"),
}


def test_extension_is_built():
    assert _backend.CUDA_BUILT, _backend._CUDA_BUILD_NOTE


def test_extension_records_the_torch_it_was_compiled_against():
    """setup.py writes the versions beside _C; pyext compares them with the
    running torch before it loads _C (test_backend.py)."""
    from pyext import _C
    with open(os.path.join(os.path.dirname(_C.__file__), _extension_build.BUILT_WITH)) as f:
        record = json.load(f)
    assert record["torch"] == torch.__version__ and record["cuda"] == torch.version.cuda
    # the build's architectures: every GPU the GPU machine lends (H100, H200) has kernels in it
    assert _extension_build.runs_on(record["archs"], (9, 0))


@pytest.mark.parametrize("name", sorted(CUDA_OPS))
def test_op_is_registered_with_the_dispatcher(name):
    op = getattr(torch.ops.pyext, name).default
    assert str(op._schema) == CUDA_OPS[name]
    assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA")


def test_fake_implementations_give_shapes_without_a_gpu():
    x = torch.empty(3, 5, device="meta", dtype=torch.bfloat16)
    assert torch.ops.pyext.gelu_fwd_cuda(x, "none").shape == x.shape
    assert torch.ops.pyext.gelu_bwd_cuda(x, x, "tanh").dtype == x.dtype


def test_norm_fake_implementations_give_shapes_without_a_gpu():
    x = torch.empty(3, 4, 5, device="meta", dtype=torch.bfloat16)
    w = torch.empty(5, device="meta", dtype=torch.float32)
    y, mean, rstd = torch.ops.pyext.layer_norm_fwd_cuda(x, [5], w, w, 1e-5)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert mean.shape == rstd.shape == (3, 4) and rstd.dtype == torch.float32
    dx, dw, db = torch.ops.pyext.layer_norm_bwd_cuda(x, x, mean, rstd, w, w, True, False)
    assert dx.shape == x.shape and dw.shape == (5,) and dw.dtype == torch.float32 and db.numel() == 0
    y, rstd = torch.ops.pyext.rms_norm_fwd_cuda(x, [4, 5], None, 1e-6)
    assert rstd.shape == (3,)
    dx, dw = torch.ops.pyext.rms_norm_bwd_cuda(x, x, rstd, None, False)
    assert dx.shape == x.shape and dw.numel() == 0


# One bad call per op family, straight to the CUDA kernel's host code (on a
# machine with no GPU the CPU tensors reach it through a redispatch and are
# refused there). Each runs in its own process: a check that crashes instead
# of raising fails its case alone. The words expected carry the numbers of
# the call: a message that lost them was formatted by a broken libstdc++.
BAD_CALLS = {
    "gelu": ("gelu_fwd_cuda", "(x, 'nope')", "approximate"),
    "layer_norm": ("layer_norm_fwd_cuda", "(x, [9], None, None, 1e-5)", "normalized_shape [9]"),
    "layer_norm weight": ("layer_norm_fwd_cuda", "(x, [8], x[0, :7], None, 1e-5)", "[8], got [7]"),
    "layer_norm_bwd": ("layer_norm_bwd_cuda", "(x, x, x[:, 0].contiguous(), x[:3, 0].contiguous(), None, None, "
                       "False, False)", "rstd of shape [3]"),
    "rms_norm": ("rms_norm_fwd_cuda", "(x, [8], x[0, :7], 1e-6)", "[8], got [7]"),
    "flash_attention": ("flash_attn_fwd_cuda", "(x[None, None].half(), x[None].half(), x[None].half(), "
                        "1.0, False, 0)", "4-D"),
    "adamw": ("adamw_step_cuda", "([x], [x[:, :3].contiguous()], [x], [x], [], x.new_ones(1), 1e-3, None, "
              "0.9, 0.999, 1e-8, 0.0, False, False, None, None)", "grads[0] has 12 elements but params[0] has 32"),
}


def bad_call_code(family: str) -> str:
    """A program making one bad call of `family`; .ci/gpu-check also runs it
    under cuda-gdb for a backtrace when this test finds it crashing."""
    op, args, _ = BAD_CALLS[family]
    return ("import torch, pyext\n"
            f"x = torch.randn(4, 8, device={'cuda' if torch.cuda.is_available() else 'cpu'!r})\n"
            "keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CUDA)\n"
            "try:\n"
            f"    torch.ops.pyext.{op}.default.redispatch(keys, *{args})\n"
            "except RuntimeError as e:\n"
            "    print('raised:', e)\n")


@pytest.mark.parametrize("family", sorted(BAD_CALLS))
def test_host_checks_raise_rather_than_crash(family):
    import subprocess
    import sys
    word = BAD_CALLS[family][2]
    result = subprocess.run([sys.executable, "-c", bad_call_code(family)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr[-2000:]}"
    assert "raised:" in result.stdout, result.stdout + result.stderr[-2000:]
    # without a GPU the device check may come first
    assert word in result.stdout or (not torch.cuda.is_available() and "CUDA tensor" in result.stdout), result.stdout


# Defined by libstdc++ itself: the locale every stream formats with, and the
# id by which a stream finds its number formatter among the locale's facets.
LIBSTDCXX_OWN = ("_ZNSt6locale7classicEv", "_ZNSt7num_putIcSt19ostreambuf_iteratorIcSt11char_traitsIcEEE2idE")


def test_extension_exports_no_libstdcxx_of_its_own():
    """A libstdc++ linked in statically must stay private to the extension
    (setup.py's --exclude-libs): exported, its facet ids are bound to the
    process's libstdc++ while its code is the extension's, and every number
    in a TORCH_CHECK message is lost or crashes the process."""
    import shutil
    import subprocess
    from pyext import _C
    if shutil.which("nm") is None:
        pytest.skip("no nm (binutils) to read the extension's symbol table")
    table = subprocess.run(["nm", "-D", "--defined-only", _C.__file__], capture_output=True, text=True,
                           check=True).stdout
    exported = {line.split()[-1] for line in table.splitlines() if line.strip()}
    assert not exported & set(LIBSTDCXX_OWN), f"{_C.__file__} exports libstdc++'s own symbols"


def setup_link_args():
    """setup.py's EXTENSION_LINK_ARGS, read without running setup.py."""
    import ast
    import pathlib
    tree = ast.parse((pathlib.Path(__file__).resolve().parents[1] / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["EXTENSION_LINK_ARGS"]:
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py defines no EXTENSION_LINK_ARGS")


PROBE = """#include <sstream>
extern "C" int formatted_length(unsigned long n) { std::ostringstream s; s << n; return int(s.str().size()); }
"""


def test_setup_link_args_keep_a_static_libstdcxx_private(tmp_path):
    """Where g++ links libstdc++ as a shared library (CI's), the extension has
    no copy of its own and the test above cannot fail. This links a probe
    library that formats a number through a stream with -static-libstdc++, as
    the GPU machine's /opt/gcc does: without setup.py's link arguments it
    exports libstdc++'s own symbols, with them none."""
    import shutil
    import subprocess
    if shutil.which("g++") is None or shutil.which("nm") is None:
        pytest.skip("needs g++ and nm")
    archive = subprocess.run(["g++", "-print-file-name=libstdc++.a"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(archive):
        pytest.skip("g++ has no static libstdc++ (libstdc++.a) to link")
    source = tmp_path / "probe.cpp"
    source.write_text(PROBE)

    def exported(name, link_args):
        library = tmp_path / name
        subprocess.run(["g++", "-shared", "-fPIC", "-static-libstdc++", str(source), "-o", str(library),
                        *link_args], check=True, capture_output=True, timeout=120)
        table = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True,
                               check=True).stdout
        return {line.split()[-1] for line in table.splitlines() if line.strip()}

    assert set(LIBSTDCXX_OWN) <= exported("plain.so", []), "the probe does not show libstdc++'s symbols"
    private = exported("private.so", setup_link_args())
    assert "formatted_length" in private
    # the probe's one function is extern "C": every C++ name exported is libstdc++'s
    assert not {s for s in private if s.startswith("_Z")}, "setup.py's link arguments leave libstdc++ exported"
