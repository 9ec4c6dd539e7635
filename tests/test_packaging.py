"""What `pip install .` (not editable) gives a user: a wheel holding every
module of the package, Triton kernels included (setup.py lists the packages
and maps triton_kernels/ to pyext.triton_kernels by hand, so a module added
outside that list would be missing from a wheel while the editable install
the other tests use still finds it), and a pyext that imports and runs from
that wheel alone."""
import os
import pathlib
import shutil
import subprocess
import sys
import zipfile

ROOT = pathlib.Path(__file__).resolve().parents[1]


def modules(folder: str, package: str):
    return {package + "/" + p.relative_to(ROOT / folder).as_posix() for p in (ROOT / folder).rglob("*.py")
            if "__pycache__" not in p.parts}


def test_the_wheel_holds_every_module_and_runs_from_itself(tmp_path):
    source = tmp_path / "source"  # a copy, so that the build writes nothing into the checkout
    source.mkdir()
    for name in ("setup.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.so", "*.egg-info")
    for folder in ("pyext", "triton_kernels", "csrc"):
        shutil.copytree(ROOT / folder, source / folder, ignore=ignore, symlinks=True)
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps",
                            "-w", str(tmp_path / "wheel"), str(source)], capture_output=True, text=True,
                           env={**os.environ, "PYEXT_SKIP_CUDA_BUILD": "1"}, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "wheel").glob("pyext-*.whl")
    with zipfile.ZipFile(wheel) as z:
        inside = {n for n in z.namelist() if n.endswith(".py")}
        z.extractall(tmp_path / "installed")
    missing = (modules("pyext", "pyext") | modules("triton_kernels", "pyext/triton_kernels")) - inside
    assert not missing, f"not in the wheel: {sorted(missing)}"

    # From outside the repository, with the wheel's files first on the path:
    # the modules come from there, and a Triton kernel runs (on CPU tensors,
    # under the interpreter) as the tests' own do.
    code = ("import torch, torch.nn.functional as F, pyext, pyext.triton_kernels\n"
            "x = torch.randn(3, 37)\n"
            "y = pyext.layer_norm(x, (37,), backend='triton')\n"
            "print(pyext.__file__, pyext.triton_kernels.__file__, (y - F.layer_norm(x, (37,))).abs().max().item())\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "installed"), "TRITON_INTERPRET": "1"}
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    *files, error = run.stdout.split()
    installed = (tmp_path / "installed").resolve()
    assert all(installed in pathlib.Path(f).resolve().parents for f in files), files
    assert float(error) < 1e-5
