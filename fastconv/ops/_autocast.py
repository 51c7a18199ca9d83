"""Autocast for the raw `torch.ops.fastconv.*` convolution ops, as F.conv2d has it.

Under torch.autocast a convolution runs in the autocast dtype (float16 or bfloat16): x, the
weight, the bias and a residual are cast, while the epilogue's per-channel BatchNorm
parameters keep their float32 (autocast runs batch_norm in float32, and the kernels accept
float32 parameters beside half activations). torch.library.register_autocast cannot say
that: it casts every floating input, and to one dtype fixed at registration, not the one the
autocast region chose. So each op gets its own Autocast{CPU,CUDA} kernel here, which casts
the named arguments to the region's dtype and calls the op again below the autocast key.
The public functions cast the same way before they call the op, so both routes agree.
"""

from __future__ import annotations

from typing import Sequence

import torch

_DEVICE_TYPES = ("cpu", "cuda")


def _eligible(value, device_type: str) -> bool:
    # autocast's own rule: floating tensors on the region's device, float64 left alone.
    return (
        isinstance(value, torch.Tensor)
        and value.is_floating_point()
        and value.dtype != torch.float64
        and value.device.type == device_type
    )


def _cast(value, dtype: torch.dtype, device_type: str):
    """value in `dtype` if autocast would cast it; a list (a dense block's weights) element-wise."""
    if isinstance(value, (list, tuple)):
        return [_cast(v, dtype, device_type) for v in value]
    return value.to(dtype) if _eligible(value, device_type) else value


def _kernel(op: torch._ops.OpOverload, positions: Sequence[int], device_type: str, dispatch_key):
    def kernel(_keyset, *args):
        dtype = torch.get_autocast_dtype(device_type)
        args = [_cast(a, dtype, device_type) if i in positions else a for i, a in enumerate(args)]
        with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(dispatch_key)):
            return op(*args)

    return kernel


def register_autocast(custom_op, cast: Sequence[str]) -> None:
    """Give `custom_op` (a torch.library.custom_op) autocast kernels that cast the arguments
    named in `cast` to the autocast dtype."""
    op = custom_op._opoverload
    names = [argument.name for argument in op._schema.arguments]
    unknown = set(cast) - set(names)
    assert not unknown, f"{op} has no argument {sorted(unknown)}"
    positions = frozenset(names.index(name) for name in cast)
    for device_type in _DEVICE_TYPES:
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        kernel = _kernel(op, positions, device_type, getattr(torch._C.DispatchKey, key))
        custom_op._lib.impl(custom_op._name, kernel, key, with_keyset=True)
