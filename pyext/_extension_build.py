"""What the CUDA extension pyext._C was built for, and whether it can run here.

setup.py writes BUILT_WITH beside _C: the torch release and CUDA version it
was compiled against and its TORCH_CUDA_ARCH_LIST. _backend reads it before
loading _C (a C++ extension is bound to the torch release it was compiled
against: no ABI is kept between releases, and a mismatched one may load and
then fail or compute garbage; patch releases keep the ABI), and checks each
GPU's compute capability against the architectures before the cuda backend
takes its tensors (a GPU with no kernel image of ours would fail every launch).
"""
import json
import os
import re
from typing import Optional, Tuple

BUILT_WITH = "_C_built_with.json"


def _release(version: Optional[str]) -> Optional[Tuple[int, int]]:
    """(major, minor) of a version string such as "2.14.1+cu130", or None."""
    found = re.match(r"(\d+)\.(\d+)", version or "")
    return (int(found.group(1)), int(found.group(2))) if found else None


def read_record(folder: str) -> Optional[dict]:
    """BUILT_WITH of the extension in `folder`; None where there is none (an
    extension built another way), {} where it cannot be read (nothing known)."""
    path = os.path.join(folder, BUILT_WITH)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def version_problem(record: dict, torch_version: str, cuda_version: Optional[str]) -> Optional[str]:
    """Why an extension compiled against the record's torch and CUDA must not
    load into this torch (another release, or another CUDA major version), or None."""
    built_torch, built_cuda = record.get("torch"), record.get("cuda")
    same_torch = _release(built_torch) is not None and _release(built_torch) == _release(torch_version)
    same_cuda = _release(built_cuda) is not None and _release(cuda_version) is not None and \
        _release(built_cuda)[0] == _release(cuda_version)[0]
    if same_torch and same_cuda:
        return None
    built = f"torch {built_torch} (CUDA {built_cuda})"
    here = f"torch {torch_version} ({'CUDA ' + cuda_version if cuda_version else 'no CUDA'})"
    return (f"the CUDA extension pyext._C was compiled against {built}, and this is {here}; it runs only with "
            "the torch release it was compiled against. Rebuild it with this torch: `pip install -v "
            "--no-build-isolation .` (without that flag pip compiles against a torch it downloads for the build, "
            "not the one installed; upgrading torch after a build has the same effect)")


def runs_on(archs: str, capability: Tuple[int, int]) -> Optional[bool]:
    """Whether a build for the TORCH_CUDA_ARCH_LIST `archs` holds kernels a
    GPU of compute capability (major, minor) can run, or None where an entry
    is not understood (torch's named architectures). CUDA's rules: machine
    code for X.Y runs on X.Y and the later minors of major X ("X.Yf", a
    family's, too); "X.Ya" only on X.Y itself; "+PTX" adds portable code that
    the driver compiles for any later GPU (not for "a" and "f" targets)."""
    for entry in re.split(r"[;\s]+", archs.strip()):
        if not entry:
            continue
        found = re.fullmatch(r"(\d+)\.(\d+)([af]?)(\+PTX)?", entry)
        if found is None:
            return None
        target, suffix, ptx = (int(found.group(1)), int(found.group(2))), found.group(3), found.group(4)
        if target == capability:
            return True
        if suffix != "a" and target[0] == capability[0] and target[1] <= capability[1]:
            return True
        if ptx and not suffix and target <= capability:
            return True
    return False


def arch_problem(record: dict, capability: Tuple[int, int], gpu: str) -> Optional[str]:
    """Why the extension has no kernels this GPU can run, or None (where the
    record names no architectures, nothing is known against it)."""
    archs = record.get("archs")
    if not isinstance(archs, str) or not archs.strip() or runs_on(archs, capability) is not False:
        return None  # unknown, or empty: torch then builds for the GPUs it finds
    major, minor = capability
    built = (f"the CUDA extension pyext._C was built for compute capabilities {archs} (TORCH_CUDA_ARCH_LIST) "
             f"and holds no kernel this GPU ({gpu}, compute capability {major}.{minor}) can run")
    if capability < (8, 0):
        return f"{built}; its kernels need compute capability 8.0 or newer (cp.async, bf16 tensor cores)"
    return f"{built}; rebuild it with TORCH_CUDA_ARCH_LIST=\"{archs};{major}.{minor}\""
