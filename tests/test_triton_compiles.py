"""Every Triton kernel compiles to sm_80 and sm_90 cubins, on any machine.

The CPU tests run the kernels under Triton's interpreter, which accepts code
that the compiler refuses; this compiles what the launchers launch."""
import importlib
import os
import pkgutil
import signal
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def _skip_without_the_checks_triton():
    """The check specializes a launch's arguments as Triton's launcher does,
    through native_specialize_impl (Triton 3.6 and later)."""
    pytest.importorskip("triton.backends.nvidia")
    from triton._C import libtriton
    if not hasattr(libtriton, "native_specialize_impl"):
        import triton
        pytest.skip(f"Triton {triton.__version__} has no native_specialize_impl, which the compile check reads")


def test_every_launched_kernel_compiles_for_ampere_and_hopper():
    _skip_without_the_checks_triton()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # its own process group: past the time limit its compile workers go with it (they outlived it)
    check = subprocess.Popen([sys.executable, os.path.join(HERE, "triton_compile_check.py")], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = check.communicate(timeout=1200)
    except subprocess.TimeoutExpired:
        os.killpg(check.pid, signal.SIGKILL)
        check.communicate()
        raise
    assert check.returncode == 0, stdout[-5000:] + stderr[-3000:]
    assert "compiled" in stdout


def test_every_autotune_key_names_a_kernel_argument():
    """Triton 3.9 refuses, at import, an autotuner whose key, reset_to_zero or restore_value names
    something that is not an argument of its kernel; Triton 3.8 and older dropped the name silently."""
    pytest.importorskip("triton")
    from triton.runtime.autotuner import Autotuner

    import pyext.triton_kernels as package
    from pyext.triton_kernels.chosen_configs import ChosenConfigs
    tuners = {}
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
        module = importlib.import_module(info.name)
        tuners.update({f"{info.name}.{name}": v.autotuned if isinstance(v, ChosenConfigs) else v
                       for name, v in vars(module).items() if isinstance(v, (Autotuner, ChosenConfigs))})
    assert len(tuners) >= 5, sorted(tuners)
    for name, tuner in tuners.items():
        named = set(tuner.keys) | set(tuner.reset_to_zero) | set(tuner.restore_value)
        assert named <= set(tuner.arg_names), f"{name}: {sorted(named - set(tuner.arg_names))} are not arguments"


SPECIALIZATION_PROBE = """
import torch, triton, triton.language as tl
import triton_compile_check as check

@triton.jit
def probe(ptr, aligned, odd, one, N: tl.constexpr):
    pass

signature, constexprs, attrs, _ = check._signature(probe, (torch.empty(64), 32, 17, 1), {"N": 4}, None)
div = [["tt.divisibility", 16]]
assert signature == {"ptr": "*fp32", "aligned": "i32", "odd": "i32", "one": "constexpr", "N": "constexpr"}, signature
assert constexprs == {"N": 4, "one": 1}, constexprs
assert attrs[(0,)] == div and attrs[(1,)] == div and attrs[(2,)] == [], attrs
print("specialized as a launch")
"""


def test_the_check_compiles_the_variant_a_launch_gets(tmp_path):
    """A pointer and an int that 16 divides carry tt.divisibility (what lets
    a row's loads vectorize) and an int equal to 1 is a constexpr, as
    Triton's launcher makes them; without that the check (and its --spills
    counts) would be of kernels no aligned launch runs."""
    _skip_without_the_checks_triton()
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [HERE, env.get("PYTHONPATH")]))
    probe = tmp_path / "probe.py"  # a file: Triton reads a kernel's source from one
    probe.write_text(SPECIALIZATION_PROBE)
    out = subprocess.run([sys.executable, str(probe)], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "specialized as a launch" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
