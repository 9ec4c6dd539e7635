"""python -m pyext: what pyext can run on this machine, and why not.

The versions (pyext, Python, torch and its CUDA, Triton), each GPU torch
sees with its compute capability, what the CUDA extension was built for
(setup.py's record beside it), and each backend's status with its reason:
what to paste into a bug report.
"""
import importlib.metadata
import platform

import torch

import pyext
from pyext import _backend


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def report() -> str:
    """The report, one fact a line."""
    rocm = f", ROCm {torch.version.hip}" if torch.version.hip else ""
    lines = [f"pyext {pyext.__version__} ({pyext.__path__[0]})",
             f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}{rocm}), "
             f"triton {_version('triton')}"]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(index)
            lines.append(f"GPU {index}: {torch.cuda.get_device_name(index)}, compute capability {major}.{minor}")
    else:
        lines.append("GPU: none visible to torch")
    record = _backend._BUILD_RECORD
    if record:
        lines.append(f"CUDA extension built against torch {record.get('torch')} (CUDA {record.get('cuda')}) "
                     f"for compute capabilities {record.get('archs')}")
    lines += [f"backend {name}: {'available' if status.available else 'unavailable'}, {status.reason}"
              for name, status in pyext.available_backends().items()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
