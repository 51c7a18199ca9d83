"""A cache of values derived from tensors, valid until any of those tensors changes.

Eval-mode modules fold BatchNorm statistics into a few per-channel tensors (or into the conv
weight) on every call unless they cache the result. The cache must notice every change
without the user's help: an optimizer step and `load_state_dict` write in place (bumping the
tensor's version counter), `.to()` swaps the tensor's storage (its address and dtype change),
and assigning a new Parameter replaces the object (a weak reference stops matching).
"""

from __future__ import annotations

import weakref
from typing import Callable, Hashable, Optional, Sequence

import torch


def _stamp(tensor: torch.Tensor) -> Optional[tuple]:
    """What changes whenever the tensor's values can have changed; None when it can't be told
    (inference tensors have no version counter)."""
    try:
        return (tensor._version, tensor.data_ptr(), tensor.dtype, tensor.device, tuple(tensor.shape))
    except RuntimeError:
        return None


class DerivedTensorCache:
    """Holds one value computed from `sources`; recomputes it when any source has changed."""

    def __init__(self) -> None:
        self._entry = None  # (weak references, stamps, value)

    def get(self, sources: Sequence[Optional[torch.Tensor]], options: Hashable, compute: Callable[[], object]):
        """The cached value, or compute() under no_grad when a source or `options` changed.

        Not cached, and computed with autograd, when gradients are wanted (eval-mode
        fine-tuning) or under torch.compile, which traces the few small ops into its graph.
        """
        present = [t for t in sources if t is not None]
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and any(t.requires_grad for t in present)):
            return compute()
        stamps = tuple(_stamp(t) if t is not None else None for t in sources)
        if any(stamp is None for stamp, t in zip(stamps, sources) if t is not None):
            return compute()
        stamps += (options,)
        if self._entry is not None:
            refs, cached_stamps, value = self._entry
            if cached_stamps == stamps and all(ref() is t for ref, t in zip(refs, present)):
                return value
        with torch.no_grad():
            value = compute()
        self._entry = (tuple(weakref.ref(t) for t in present), stamps, value)
        return value

    def __getstate__(self):
        return {"_entry": None}  # weak references do not pickle; the cache rebuilds itself

    def __deepcopy__(self, memo):
        return DerivedTensorCache()  # a copy's tensors are new objects: start empty
