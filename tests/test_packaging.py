"""What a user installs when not installing from a checkout in place: the
source distribution, the wheel built from it (as `python -m build` and `pip
install pyext-*.tar.gz` do), and a pyext that imports and runs from that wheel
alone. setup.py lists the packages, maps triton_kernels/ to
pyext.triton_kernels and adds csrc/ to the sdist by hand, so a module or a
header it missed would be absent there while the editable install the other
tests use still finds it."""
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def files(folder: str, pattern: str, prefix: str):
    return {prefix + p.relative_to(ROOT / folder).as_posix() for p in (ROOT / folder).rglob(pattern)
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".so"}


def python(args, cwd, env=None):
    """sys.executable with args, the CUDA build skipped (a CI minute saved), succeeding."""
    result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=600,
                            env={**os.environ, "PYEXT_SKIP_CUDA_BUILD": "1", **(env or {})})
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return result


def test_the_sdist_and_its_wheel_hold_everything_and_the_wheel_runs_alone(tmp_path):
    source = tmp_path / "source"  # a copy, so that the builds write nothing into the checkout
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for folder in ("pyext", "triton_kernels", "csrc"):
        shutil.copytree(ROOT / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    pyext_modules = files("pyext", "*.py", "pyext/")
    modules = pyext_modules | files("triton_kernels", "*.py", "pyext/triton_kernels/")  # as the wheel maps them

    python(["setup.py", "-q", "sdist", "-d", str(tmp_path / "sdist")], cwd=source)
    (sdist,) = (tmp_path / "sdist").glob("pyext-*.tar.gz")
    with tarfile.open(sdist) as t:
        in_sdist = {n.split("/", 1)[1] for n in t.getnames() if "/" in n}
    kernel_sources = files("csrc", "*", "csrc/")
    assert not kernel_sources - in_sdist, f"not in the sdist: {sorted(kernel_sources - in_sdist)}"
    sources = pyext_modules | files("triton_kernels", "*.py", "triton_kernels/")
    assert not sources - in_sdist, f"not in the sdist: {sorted(sources - in_sdist)}"

    python(["-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", "-w", str(tmp_path / "wheel"),
           str(sdist)], cwd=tmp_path)
    (wheel,) = (tmp_path / "wheel").glob("pyext-*.whl")
    with zipfile.ZipFile(wheel) as z:
        in_wheel = set(z.namelist())
        z.extractall(tmp_path / "installed")
    assert not modules - in_wheel, f"not in the wheel: {sorted(modules - in_wheel)}"

    # From outside the repository, with the wheel's files first on the path:
    # the modules come from there, and a Triton kernel runs (on CPU tensors,
    # under the interpreter) as the tests' own do.
    code = ("import torch, torch.nn.functional as F, pyext, pyext.triton_kernels\n"
            "x = torch.randn(3, 37)\n"
            "y = pyext.layer_norm(x, (37,), backend='triton')\n"
            "print(pyext.__file__, pyext.triton_kernels.__file__, (y - F.layer_norm(x, (37,))).abs().max().item())\n")
    run = python(["-c", code], cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "installed"), "TRITON_INTERPRET": "1"})
    *paths, error = run.stdout.split()
    installed = (tmp_path / "installed").resolve()
    assert all(installed in pathlib.Path(p).resolve().parents for p in paths), paths
    assert float(error) < 1e-5
