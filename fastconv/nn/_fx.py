"""fastconv's modules as single nodes of a torch.fx graph.

torch.fx.symbolic_trace (and torchvision's create_feature_extractor, which detection and
segmentation backbones are built with) runs forward() on Proxies. fastconv's forwards inspect
their input (its device for autocast, its strides for the layout, its shape for the checks),
which a Proxy cannot answer. So under symbolic tracing a module records one call of
`opaque_call(module, x)` instead; the traced graph runs the module itself, with all of its
semantics (train and eval, the fold cache, hooks). torch.compile and torch.export do not take
this path: they trace through the ops, which have fake implementations.
"""

from __future__ import annotations

import torch
import torch.fx


def symbolically_traced() -> bool:
    """True inside torch.fx.symbolic_trace, False under torch.compile and torch.export."""
    from torch.fx import _symbolic_trace

    # is_fx_symbolic_tracing exists in torch 2.11 (a module flag) and 2.14 (thread-local); the
    # private _get_is_fx_tracing only in the latter.
    return bool(_symbolic_trace.is_fx_symbolic_tracing()) and not torch.compiler.is_compiling()


def opaque_call(module: torch.nn.Module, x):
    """module(x), recorded by fx as one call_function node (see torch.fx.wrap below)."""
    return module(x)


# Patched during tracing in this module's globals: callers must look it up as
# `_fx.opaque_call`, not import the name.
torch.fx.wrap("opaque_call")


def refuse_torchscript(module: torch.nn.Module):
    """`__prepare_scriptable__` of fastconv's modules: torch.jit.script calls it first, so the
    user reads what to do instead of a TorchScript frontend error deep inside forward()."""
    raise RuntimeError(
        f"fastconv: {type(module).__name__} cannot be compiled by torch.jit.script (TorchScript does not "
        "support custom Python ops' dispatch); use torch.compile(model) or torch.export.export(model, args)"
    )
