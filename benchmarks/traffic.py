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


# Bytes of a whole model ---------------------------------------------------------------------
# `python -m fastconv bench --traffic`: what each top-level op (one kernel, or for fastconv's
# ops the op's own kernels) reads and writes, for the eager model's aten ops and for the
# optimised model's fastconv ops alike. The ideal count: each input tensor read once and each
# output written once per op, which is what a kernel that moves no more than it must costs.

# fastconv ops that compose other fastconv ops (several kernels each): their parts are counted.
COMPOSITE_OPS = {"dense_block_train", "dense_block_eval"}


def _inverted_residual_train_passes(args, outputs) -> tuple[int, int]:
    """(bytes read, bytes written) of the fused training forward's passes beyond one read of
    each input and one write of each output (fastconv/ops/inverted_residual_train.py):
    * with an expansion, its statistics read x twice more (its mean; a centred copy in the
      accumulation dtype, written, then read by the covariance GEMM);
    * the statistics pass and the fused kernel each read x (one of them is the base read);
    * p, written once, is read twice (its statistics, then its BatchNorm);
    * with the residual, y is read back and rewritten by the add, which reads x once more."""
    x, expand_weight, p, y, use_residual = args[0], args[1], outputs[1], outputs[0], args[-1]
    read, written = _tensor_bytes(x) + 2 * _tensor_bytes(p), 0
    if expand_weight is not None:
        centred = x.numel() * (8 if x.dtype == torch.float64 else 4)
        read, written = read + 2 * _tensor_bytes(x) + centred, written + centred
    if use_residual:
        read, written = read + _tensor_bytes(x) + _tensor_bytes(y), written + _tensor_bytes(y)
    return read, written


# fastconv ops whose kernels pass over some tensors more than once: their extra (read, written) bytes.
EXTRA_PASSES = {"inverted_residual_train": _inverted_residual_train_passes}
_NO_TRAFFIC = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh", "detach",
               "alias", "clone_preserve"}  # fmt: skip
_FILLS = {"zeros_like", "ones_like", "full_like", "fill_", "zero_", "zeros", "ones", "full"}


def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size()


def _byte_counter_class():
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_flatten

    class ByteCounter(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []  # (namespace::name, bytes read, bytes written)

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            namespace, name = func.namespace, func._opname
            if namespace == "fastconv" and name in COMPOSITE_OPS:
                # Its parts, each a kernel of its own, are what is counted: run its Python
                # implementation with this mode on (calling the op again would come back here).
                from torch._library.custom_ops import _maybe_get_opdef

                with self:
                    return _maybe_get_opdef(func)._init_fn(*args, **kwargs)
            out = func(*args, **kwargs)
            if func.is_view or name in _NO_TRAFFIC or namespace == "prim":
                return out
            inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            outputs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
            mutated = [a for a, arg in zip(args, func._schema.arguments)
                       if isinstance(a, torch.Tensor) and arg.alias_info is not None and arg.alias_info.is_write]
            written = {id(t): t for t in outputs + mutated}
            read = {} if name in _FILLS else {id(t): t for t in inputs if id(t) not in written or name.endswith("_")}
            extra = EXTRA_PASSES[name](args, outputs) if namespace == "fastconv" and name in EXTRA_PASSES else (0, 0)
            self.ops.append((f"{namespace}::{name}", sum(map(_tensor_bytes, read.values())) + extra[0],
                             sum(map(_tensor_bytes, written.values())) + extra[1]))  # fmt: skip
            return out

    return ByteCounter


def count_bytes(step) -> list:
    """[(op, bytes read, bytes written)] of `step()`, one row per top-level op call. Run step
    once before, so that what a module caches (a folded BatchNorm) is not counted."""
    counter = _byte_counter_class()()
    with counter:
        step()
    return counter.ops


def bytes_by_op(ops) -> dict:
    """{op: (calls, bytes read, bytes written)}, the largest total first."""
    totals = {}
    for name, read, written in ops:
        calls, r, w = totals.get(name, (0, 0, 0))
        totals[name] = (calls + 1, r + read, w + written)
    return dict(sorted(totals.items(), key=lambda kv: -(kv[1][1] + kv[1][2])))
