"""Activation traffic counted at the dispatcher: which ops read and write activation-sized
tensors in a training step, for a model on any device, the CPU included (a TorchDispatchMode
over aten and fastconv ops). The conv_bn_act suite checks its byte-count model with it."""
import contextlib
import re

import torch

def _storage(t):
    try:
        return t.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):
        return None


# Convolutions at the dispatcher: aten's convolution(_backward), cudnn_convolution, ...;
# fastconv's conv2d_batch_stats, conv2d_bn_act, depthwise_conv2d, pointwise_conv2d (+ backward).
_CONV_OP = re.compile(r"conv(olution|2d|_depthwise|_dilated|_transpose)")


def _trace_class():
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    no_traffic = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided",
                  "lift_fresh", "detach", "alias"}
    fills = {"zeros_like", "ones_like", "full_like", "fill_", "zero_"}  # write, read nothing

    class ActivationTrace(TorchDispatchMode):
        """Each top-level op's reads and writes of activation tensors: what a conv forward
        writes, grad_y, and whatever an op computes from them, never x or grad_x (a conv
        backward's outputs). An op sees each tensor once, so these are touches, not passes."""

        def __init__(self, act_numel, seeds):
            super().__init__()
            self.act_numel = act_numel
            self.acts = {_storage(t) for t in seeds} - {None}
            self.ops = []  # (name, reads, writes); the conv backward's grad_c read is the conv's

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            name = str(func).split(".")[1] if str(func).count(".") >= 2 else str(func)
            if func.is_view or name in no_traffic:
                return out
            ins = {_storage(t) for t in tree_flatten((args, kwargs))[0]
                   if isinstance(t, torch.Tensor) and t.numel() == self.act_numel} - {None}
            touched = len(ins & self.acts)
            reads = 0 if name in fills else touched
            if name in fills:
                name += " (fill)"
            conv = _CONV_OP.search(name) is not None
            results = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            outs = [t for t in results if t.numel() == self.act_numel]
            writes = 0
            if conv and "backward" in name:
                name = "(conv) " + name  # its read of grad_c is the conv's own traffic
            elif (conv or touched) and outs:
                writes = len(outs)
            new = {_storage(t) for t in outs[:writes]} - {None}
            # Any other result is not an activation, even where the allocator reuses the address
            # of one that was freed.
            self.acts -= {_storage(t) for t in results} - new
            self.acts |= new
            if reads or writes or conv:
                self.ops.append((name, reads, writes))
            return out

    return ActivationTrace


def trace(step, activation: torch.Tensor, backend=None) -> list:
    """[(op, reads, writes)] of `step()`, one training step (forward and backward), counting
    the tensors of `activation`'s size that descend from it (seed it with grad_y) or from a
    convolution's output; on `backend` when given."""
    import fastconv

    recorder = _trace_class()(activation.numel(), [activation])
    chosen = fastconv.use_backend(backend) if backend else contextlib.nullcontext()
    with chosen, recorder:
        step()
    return recorder.ops


def touches(ops) -> int:
    """Reads plus writes of activation tensors, a convolution backward's own read excluded."""
    return sum(r + w for name, r, w in ops if not name.startswith("(conv)"))


def ops_text(ops) -> str:
    return " | ".join(f"{name} R{r}W{w}" for name, r, w in ops)
