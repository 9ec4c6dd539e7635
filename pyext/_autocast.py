"""torch.autocast's input casts for the torch functions pyext stands in for.

Inside an autocast region torch casts the inputs of some ops before running
them: layer_norm to float32 on CUDA, which its CPU autocast leaves alone
(rms_norm too in torch 2.14, not yet in 2.11); scaled_dot_product_attention to the region's
lower-precision dtype on CUDA and CPU. pyext's drop-ins cast the same tensors
the same way before choosing a backend, so a patched model computes in the
dtypes the unpatched one did, and a float32 attention call in a bf16 region
runs pyext's kernels as torch's would run its own. The casts are ordinary
differentiable ops: gradients come back in the caller's dtypes.

Which device types torch casts on is read from its dispatcher (an
Autocast<Device> kernel registered for the aten op), so it follows the
installed torch. As in torch, a tensor is cast when it is floating point,
not float64, and on the device type of an enabled region.
"""
import torch
from torch import Tensor

_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps")


def _casting_device_types(aten_op: str) -> frozenset:
    return frozenset(d for d in _DEVICE_TYPES if torch._C._dispatch_has_kernel_for_dispatch_key(
        aten_op, "Autocast" + torch._C._dispatch_key_for_device(d)))


# aten op -> (device types torch's autocast casts its inputs on, to float32?)
POLICY = {
    "aten::layer_norm": (_casting_device_types("aten::layer_norm"), True),
    "aten::rms_norm": (_casting_device_types("aten::rms_norm"), True),
    "aten::scaled_dot_product_attention": (_casting_device_types("aten::scaled_dot_product_attention"), False),
}


def autocast_inputs(aten_op: str, *args):
    """args as torch's autocast would hand them to `aten_op` here: unchanged
    outside an autocast region and for anything not a castable tensor."""
    if not torch._C._is_any_autocast_enabled():  # the usual case, in a tenth of the time of the line below
        return args
    device_types, to_float32 = POLICY[aten_op]
    if not any(torch.is_autocast_enabled(d) for d in device_types):
        return args
    out = []
    for t in args:
        if (isinstance(t, Tensor) and t.device.type in device_types and torch.is_autocast_enabled(t.device.type)
                and t.is_floating_point() and t.dtype != torch.float64):
            t = t.to(torch.float32 if to_float32 else torch.get_autocast_dtype(t.device.type))
        out.append(t)
    return out
