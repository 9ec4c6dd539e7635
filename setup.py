"""Build pyext, and its optional CUDA extension `pyext._C`.

The extension is built when nvcc and a CUDA build of torch are both present;
otherwise (or with PYEXT_SKIP_CUDA_BUILD=1) it is skipped with one line, and
pyext runs through its Triton and reference backends.
Honours TORCH_CUDA_ARCH_LIST (default "8.0;9.0a") and MAX_JOBS.
Beside the built _C goes _C_built_with.json, the torch and CUDA versions it
was compiled against and its architectures: pyext will not load it into
another torch release, nor hand it tensors on a GPU it has no kernels for.
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup
from setuptools.command.sdist import sdist

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0a"
# Some compilers link libstdc++ into a shared object statically (the GPU
# machine's /opt/gcc does). Left exported, that private copy's data (the
# locale's facet ids) is bound to the process's own libstdc++ while its
# code stays ours: a TORCH_CHECK message then loses its numbers, or
# crashes. Hiding every archive's symbols keeps such a copy whole; with
# the usual shared libstdc++ there is nothing to hide.
# tests/test_extension.py reads this list (it links a probe library with it).
EXTENSION_LINK_ARGS = ["-Wl,--exclude-libs,ALL"]


def say(msg):
    print(f"pyext setup: {msg}", file=sys.stderr)


def find_cuda_home():
    """CUDA_HOME if set, else the toolkit that the nvcc on PATH belongs to.

    nvcc may be a wrapper script outside the toolkit (/usr/local/bin/nvcc that
    execs /usr/local/cuda-13.0/bin/nvcc), so ask nvcc itself where it lives:
    its dry run prints `_HERE_=<toolkit>/bin`.
    """
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home:
        return home if os.path.exists(os.path.join(home, "bin", "nvcc")) else None
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    try:
        out = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-E", os.devnull], capture_output=True,
                             text=True, timeout=60)
        m = re.search(r"_HERE_=(\S+)", out.stdout + out.stderr)
    except (OSError, subprocess.SubprocessError):
        m = None
    bindir = m.group(1) if m else os.path.dirname(os.path.realpath(nvcc))
    return os.path.dirname(os.path.normpath(bindir))


def wheel_cuda_include_dirs():
    """Headers that pip-installed NVIDIA wheels carry (cuBLAS, cuSPARSE, ...).

    torch's CUDA headers include cublas_v2.h and cusparse.h, which a plain
    toolkit install may lack; the nvidia-* wheels torch depends on ship them
    under site-packages/nvidia/{cu13,cublas,...}/include.
    """
    import importlib.util
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for base in spec.submodule_search_locations:
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in dirs if os.path.isdir(d)]


def cuda_extension():
    """The CUDA extension, or None with the reason printed."""
    if os.environ.get("PYEXT_SKIP_CUDA_BUILD", "0") == "1":
        say("PYEXT_SKIP_CUDA_BUILD=1: skipping the CUDA extension")
        return None
    try:
        import torch
    except ImportError:
        say("torch is not installed: skipping the CUDA extension")
        return None
    if torch.version.cuda is None:
        say(f"torch {torch.__version__} is not a CUDA build: skipping the CUDA extension")
        return None
    if "pip-build-env" in torch.__file__:
        say(f"building against torch {torch.__version__} from pip's isolated build environment: pyext will "
            "load this build only into that torch release; `pip install --no-build-isolation` builds against "
            "the torch installed here")
    cuda_home = find_cuda_home()
    if cuda_home is None:
        say("no CUDA toolkit found (no nvcc on PATH, no CUDA_HOME): skipping the CUDA extension")
        return None
    os.environ["CUDA_HOME"] = cuda_home  # read by cpp_extension at import
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
    from torch.utils.cpp_extension import CUDAExtension

    say(f"building pyext._C with CUDA_HOME={cuda_home}, "
        f"TORCH_CUDA_ARCH_LIST={os.environ['TORCH_CUDA_ARCH_LIST']}")
    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True) +
                     glob.glob("csrc/**/*.cu", recursive=True))
    # Only the torch-facing .cpp files need the library headers; search them
    # after the toolkit's own so that they can never shadow its headers.
    after = [f"-idirafter{d}" for d in wheel_cuda_include_dirs()]
    return CUDAExtension(
        name="pyext._C",
        sources=sources,
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_compile_args={
            "cxx": ["-O3"] + after,
            "nvcc": ["-O3", "-lineinfo", "--expt-relaxed-constexpr",
                     "-Xptxas=-warn-spills"],
        },
        extra_link_args=EXTENSION_LINK_ARGS,
    )


BUILT_WITH = "_C_built_with.json"  # pyext/_extension_build.py reads it


def build_recording_versions(build_extension):
    """torch's BuildExtension (a class), writing BUILT_WITH beside each
    extension it builds: in the build folder for a wheel, in the source tree
    for an in-place or editable build (where setuptools copies the .so)."""
    import torch

    class BuildRecordingVersions(build_extension):
        def run(self):
            super().run()
            for extension in self.extensions:
                folder = os.path.dirname(self.get_ext_fullpath(extension.name))
                with open(os.path.join(folder, BUILT_WITH), "w") as f:
                    json.dump({"torch": torch.__version__, "cuda": torch.version.cuda,
                               "archs": os.environ["TORCH_CUDA_ARCH_LIST"]}, f)
                    f.write("\n")
    return BuildRecordingVersions


class SdistWithKernelSources(sdist):
    """A source distribution that carries csrc/ whole, headers included, so
    that a build from it (`pip install pyext-*.tar.gz`, `python -m build`)
    compiles the extension as a checkout does. On its own setuptools adds
    only the .cpp and .cu files of an extension it is building: no headers,
    and nothing at all when the CUDA build is skipped."""

    def make_distribution(self):
        self.filelist.extend(sorted(glob.glob("csrc/**/*.*", recursive=True)))
        super().make_distribution()


ext = cuda_extension()
cmdclass = {"sdist": SdistWithKernelSources}
if ext is not None:
    from torch.utils.cpp_extension import BuildExtension
    cmdclass["build_ext"] = build_recording_versions(BuildExtension.with_options(use_ninja=True))

setup(
    packages=["pyext", "pyext.ops", "pyext.patch", "pyext.triton_kernels", "pyext.triton_kernels.flash_attention"],
    package_dir={"pyext.triton_kernels": "triton_kernels"},
    ext_modules=[ext] if ext is not None else [],
    cmdclass=cmdclass,
)
