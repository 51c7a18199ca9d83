"""Inception's units fused, with torchvision's children and keys: BasicConv2d (conv -> BatchNorm
with eps 0.001 -> ReLU) and the blocks of GoogLeNet (Inception) and Inception-V3 (InceptionA..E).

An Inception block sends its input x down several branches and concatenates what they return.
torchvision runs each branch's convs one by one and then ``torch.cat``. InceptionBlock keeps
the same children (so the same state_dict keys) and runs them so:

* the branch convs that are 1x1, stride 1, and read x itself (GoogLeNet's branch1 and the two
  reduce convs; InceptionA/C/E's three, InceptionD's two) run as **one GEMM** over x with their
  output channels concatenated: x is read once instead of three times;
* in eval under torch.no_grad() or torch.inference_mode(), every branch's last conv stores
  straight into its channel slice of the block's output (fastconv::conv2d_out or
  fastconv::pointwise_conv2d_out, the folded BatchNorm and ReLU in the epilogue), so the
  concatenation is never a separate pass. A 1x1 conv that is a branch of its own (branch1)
  comes out of the shared GEMM's scratch and is copied into its slice (one pass over its
  channels only), and a pooling branch (InceptionB/D's max pool of x) is copied likewise;
* in training, the shared GEMM still runs (its per-channel batch statistics are each
  BatchNorm's own, so every BatchNorm keeps its exact training semantics and running update)
  and the other convs run fused one by one; each output branch's last conv stops before its
  BatchNorm, and fastconv::batch_norm_act_cat applies every such BatchNorm + ReLU straight into
  the branch's slice of the output, differentiably (fastconv/ops/batch_norm_cat.py): no branch
  output is written and read back by a torch.cat. A pooling branch, or one whose BatchNorm is
  frozen (eval) or swapped for a kind the kernels do not honour, is copied into its slice by
  the same op;
* in eval with gradients wanted (every BatchNorm frozen), the outputs are concatenated by
  torch.cat: the folded BatchNorm is in each conv's epilogue, so there is no pass to fold the
  concatenation into.

Each block's dataflow is written out in SPECS, read from torchvision 0.2x's forwards.
"""

from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn
from torch.nn import functional as F

from fastconv._geometry import empty_output, normalise_geometry, output_size
from fastconv._validation import fail
from fastconv.nn._modes import train_like
from fastconv.nn import _conv_bn, _fx
from fastconv.nn._fold_cache import DerivedTensorCache
from fastconv.nn.conv_bn_act import plain_conv2d
from fastconv.ops._common import autocast_dtype, autocast_inputs
from fastconv.ops.batch_norm_cat import batch_norm_act_cat
from fastconv.ops.conv_bn_act import route, routed_conv2d_bn_act


class BasicConv2d(nn.Module):
    """torchvision's Inception/GoogLeNet BasicConv2d, fused: ``conv`` (bias-free nn.Conv2d) and
    ``bn`` (nn.BatchNorm2d, eps 0.001 by default) are its children, as torchvision's, and run
    with the ReLU as one conv + BatchNorm + ReLU (eval: folded and cached; training: BatchNorm2d's
    exact semantics). Any kernel size: 1x7/7x1 and 1x3/3x1 go through the implicit GEMM."""

    __prepare_scriptable__ = _fx.refuse_torchscript

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, eps: float = 0.001,
                 device=None, dtype=None) -> None:  # fmt: skip
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, bias=False, **factory)
        self.bn = nn.BatchNorm2d(out_channels, eps=eps, **factory)
        self._fold_cache = DerivedTensorCache()

    @classmethod
    def from_modules(cls, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> "BasicConv2d":
        """A BasicConv2d around existing modules, sharing (not copying) their parameters."""
        plain = plain_conv2d(conv)
        if plain is None or plain.padding_mode != "zeros":
            fail(f"conv must be a plain nn.Conv2d with zero padding; got {type(conv).__module__}.{type(conv).__name__}"
                 f"{'' if plain is None else f' with padding_mode={plain.padding_mode!r}'}")  # fmt: skip
        if type(bn) is not nn.BatchNorm2d:
            fail(f"bn must be an nn.BatchNorm2d, not a subclass whose extra semantics would be dropped; "
                 f"got {type(bn).__module__}.{type(bn).__name__}")  # fmt: skip
        if bn.num_features != plain.out_channels:
            fail(f"bn.num_features must equal conv.out_channels={plain.out_channels}; got {bn.num_features}")
        fused = cls.__new__(cls)
        nn.Module.__init__(fused)
        fused.conv, fused.bn = plain, bn
        fused._fold_cache = DerivedTensorCache()
        return train_like(fused, plain.training, plain, bn)

    @classmethod
    def from_torchvision(cls, module: nn.Module) -> "BasicConv2d":
        return cls.from_modules(module.conv, module.bn)

    def fusable(self) -> bool:
        """Whether the children are still the plain kinds the fused kernels honour (not, say,
        a SyncBatchNorm put in by convert_sync_batchnorm)."""
        return type(self.conv) is nn.Conv2d and self.conv.padding_mode == "zeros" and type(self.bn) is nn.BatchNorm2d

    def folded(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(weight, shift) with the running statistics folded in, cached (see DerivedTensorCache)."""
        return _conv_bn.folded(self._fold_cache, self.conv, self.bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fx.symbolically_traced():
            return _fx.opaque_call(self, x)
        if not self.fusable():
            return F.relu(self.bn(self.conv(x)), inplace=True)  # torchvision's forward
        return _conv_bn.conv_bn_act(x, self.conv, self.bn, "relu", self._fold_cache)


# Pools of the block input, as torchvision's forwards call them.
_POOLS = {
    "avg_pool": lambda x: F.avg_pool2d(x, kernel_size=3, stride=1, padding=1),
    "max_pool": lambda x: F.max_pool2d(x, kernel_size=3, stride=2),
}

# class name -> (steps, outputs). A step (name, source) computes `name` (a child's path, or a
# pool of _POOLS) from `source` ("x" or an earlier step); the block returns the outputs'
# concatenation along channels, in order.
SPECS = {
    "Inception": (  # torchvision.models.googlenet
        (("branch1", "x"), ("branch2.0", "x"), ("branch2.1", "branch2.0"), ("branch3.0", "x"),
         ("branch3.1", "branch3.0"), ("branch4.0", "x"), ("branch4.1", "branch4.0")),
        ("branch1", "branch2.1", "branch3.1", "branch4.1"),
    ),
    "InceptionA": (
        (("branch1x1", "x"), ("branch5x5_1", "x"), ("branch5x5_2", "branch5x5_1"), ("branch3x3dbl_1", "x"),
         ("branch3x3dbl_2", "branch3x3dbl_1"), ("branch3x3dbl_3", "branch3x3dbl_2"), ("avg_pool", "x"),
         ("branch_pool", "avg_pool")),
        ("branch1x1", "branch5x5_2", "branch3x3dbl_3", "branch_pool"),
    ),
    "InceptionB": (
        (("branch3x3", "x"), ("branch3x3dbl_1", "x"), ("branch3x3dbl_2", "branch3x3dbl_1"),
         ("branch3x3dbl_3", "branch3x3dbl_2"), ("max_pool", "x")),
        ("branch3x3", "branch3x3dbl_3", "max_pool"),
    ),
    "InceptionC": (
        (("branch1x1", "x"), ("branch7x7_1", "x"), ("branch7x7_2", "branch7x7_1"), ("branch7x7_3", "branch7x7_2"),
         ("branch7x7dbl_1", "x"), ("branch7x7dbl_2", "branch7x7dbl_1"), ("branch7x7dbl_3", "branch7x7dbl_2"),
         ("branch7x7dbl_4", "branch7x7dbl_3"), ("branch7x7dbl_5", "branch7x7dbl_4"), ("avg_pool", "x"),
         ("branch_pool", "avg_pool")),
        ("branch1x1", "branch7x7_3", "branch7x7dbl_5", "branch_pool"),
    ),
    "InceptionD": (
        (("branch3x3_1", "x"), ("branch3x3_2", "branch3x3_1"), ("branch7x7x3_1", "x"),
         ("branch7x7x3_2", "branch7x7x3_1"), ("branch7x7x3_3", "branch7x7x3_2"), ("branch7x7x3_4", "branch7x7x3_3"),
         ("max_pool", "x")),
        ("branch3x3_2", "branch7x7x3_4", "max_pool"),
    ),
    "InceptionE": (
        (("branch1x1", "x"), ("branch3x3_1", "x"), ("branch3x3_2a", "branch3x3_1"), ("branch3x3_2b", "branch3x3_1"),
         ("branch3x3dbl_1", "x"), ("branch3x3dbl_2", "branch3x3dbl_1"), ("branch3x3dbl_3a", "branch3x3dbl_2"),
         ("branch3x3dbl_3b", "branch3x3dbl_2"), ("avg_pool", "x"), ("branch_pool", "avg_pool")),
        ("branch1x1", "branch3x3_2a", "branch3x3_2b", "branch3x3dbl_3a", "branch3x3dbl_3b", "branch_pool"),
    ),
}  # fmt: skip
_TORCHVISION_MODULE = {"Inception": "torchvision.models.googlenet"}  # the others: torchvision.models.inception
_BASIC_CONV_MODULES = ("torchvision.models.googlenet", "torchvision.models.inception")


def _torchvision_module(kind: str) -> str:
    return _TORCHVISION_MODULE.get(kind, "torchvision.models.inception")


def is_torchvision_basic_conv(module: nn.Module) -> bool:
    """torchvision's BasicConv2d with a plain Conv2d and BatchNorm2d BasicConv2d can take."""
    if type(module).__name__ != "BasicConv2d" or type(module).__module__ not in _BASIC_CONV_MODULES:
        return False
    conv, bn = plain_conv2d(getattr(module, "conv", None)), getattr(module, "bn", None)
    return conv is not None and conv.padding_mode == "zeros" and type(bn) is nn.BatchNorm2d and \
        bn.num_features == conv.out_channels  # fmt: skip


def _basic_conv(module: nn.Module) -> Optional[BasicConv2d]:
    """module as a fastconv BasicConv2d (itself, or one sharing torchvision's), or None."""
    if type(module) is BasicConv2d:
        return module if module.fusable() else None
    return BasicConv2d.from_torchvision(module) if is_torchvision_basic_conv(module) else None


def _child(module: nn.Module, path: str) -> Optional[nn.Module]:
    try:
        return module.get_submodule(path)
    except AttributeError:
        return None


def is_torchvision_inception(module: nn.Module) -> bool:
    """Whether module is torchvision's Inception (GoogLeNet) or InceptionA..E (Inception-V3),
    exactly that class (a subclass may have its own forward), with the children its forward
    uses of the kinds the fused block honours."""
    kind = type(module).__name__
    if kind not in SPECS or type(module).__module__ != _torchvision_module(kind):
        return False
    steps, _ = SPECS[kind]
    for name, _source in steps:
        if name in _POOLS:
            continue
        child = _child(module, name)
        if name == "branch4.0":  # GoogLeNet's pool branch: MaxPool2d(3, 1, 1, ceil_mode=True)
            if type(child) is not nn.MaxPool2d or child.return_indices:
                return False
        elif child is None or (type(child) is not BasicConv2d and not is_torchvision_basic_conv(child)):
            return False
    sequentials = [_child(module, name.split(".")[0]) for name, _ in steps if "." in name]
    return all(type(s) is nn.Sequential for s in sequentials)


def inception_subclass(module: nn.Module) -> Optional[str]:
    """The torchvision Inception class `module` subclasses (without being it), or None."""
    for base in type(module).__mro__[1:]:
        if base.__name__ in SPECS and base.__module__ == _torchvision_module(base.__name__):
            return base.__name__
    return None


class InceptionBlock(nn.Module):
    """An Inception block (`kind`: "Inception" for GoogLeNet's, "InceptionA".."InceptionE" for
    Inception-V3's) with torchvision's children, so its state_dict keys, run fused (see the
    module docstring). Made by `InceptionBlock.from_torchvision(block)`, which shares the
    block's modules, or from `children`, a dict of the children by torchvision's names."""

    __prepare_scriptable__ = _fx.refuse_torchscript

    def __init__(self, kind: str, children: dict) -> None:
        super().__init__()
        if kind not in SPECS:
            fail(f"kind must be one of {sorted(SPECS)}; got {kind!r}")
        for name, child in children.items():
            self.add_module(name, child)
        self.kind = kind
        self._steps, self._outputs = SPECS[kind]
        for name, _source in self._steps:
            child = _child(self, name)
            if name not in _POOLS and name != "branch4.0" and type(child) is not BasicConv2d:
                got = "no such child" if child is None else type(child).__name__
                fail(f"children[{name!r}] must be a fastconv BasicConv2d ({kind}'s forward calls it); got {got}")
        # The 1x1, stride-1 convs that read x: one GEMM with their output channels concatenated,
        # a block output's first (training then normalises the others in one pass, a channel tail).
        shared = [name for name, source in self._steps if source == "x" and name not in _POOLS and
                  name != "branch4.0" and _is_pointwise(_child(self, name).conv)]  # fmt: skip
        self._shared = sorted(shared, key=lambda name: name not in self._outputs)
        self._shared_cache = DerivedTensorCache()

    @classmethod
    def from_torchvision(cls, block: nn.Module) -> "InceptionBlock":
        if not is_torchvision_inception(block):
            fail(f"block must be torchvision's Inception or InceptionA..E with BasicConv2d branches; got "
                 f"{type(block).__module__}.{type(block).__name__}")  # fmt: skip
        # The block itself is left as it was: its children are shared, and a branch Sequential
        # whose conv is swapped is a shallow copy (same children, parameters shared).
        children = dict(block._modules)
        for name, _source in SPECS[type(block).__name__][0]:
            if name in _POOLS or name == "branch4.0":
                continue
            parent, _, leaf = name.rpartition(".")
            if not parent:
                children[leaf] = _basic_conv(children[leaf])
                continue
            if children[parent] is block._modules[parent]:
                branch = copy.copy(children[parent])
                branch._modules = dict(branch._modules)
                children[parent] = branch
            children[parent]._modules[leaf] = _basic_conv(children[parent]._modules[leaf])
        return train_like(cls(type(block).__name__, children), block.training, block)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, shared 1x1 GEMM over {self._shared}"

    # -- forward -----------------------------------------------------------------------------

    def _conv(self, name: str) -> BasicConv2d:
        return _child(self, name)

    def _run(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return _POOLS[name](x) if name in _POOLS else _child(self, name)(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fx.symbolically_traced():
            return _fx.opaque_call(self, x)
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            fail(f"x must be a 4-D tensor (N, C, H, W); got {getattr(x, 'shape', type(x).__name__)}")
        shared = self._shared if self._shared_fusable() else []
        batch_stats = any(_conv_bn.uses_batch_stats(self._conv(n).bn) for n, _ in self._steps if self._is_conv(n))
        wants_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))
        # Under autocast a pooled x beside the convs makes torch.cat promote to x's dtype: eager's
        # result, which the concatenation gives (InceptionB/D's max-pool branch).
        promotes = autocast_dtype(x) is not None and any(name in _POOLS for name in self._outputs)
        if batch_stats or wants_grad or promotes or not self._all_fusable():
            return self._differentiable(x, shared)
        return self._into_buffer(x, shared)

    def _is_conv(self, name: str) -> bool:
        return name not in _POOLS and name != "branch4.0"

    def _all_fusable(self) -> bool:
        return all(self._conv(n).fusable() for n, _ in self._steps if self._is_conv(n))

    def _shared_fusable(self) -> bool:
        """The shared GEMM needs two or more plain convs whose BatchNorms agree on their mode."""
        convs = [self._conv(name) for name in self._shared]
        if len(convs) < 2 or not all(c.fusable() and _is_pointwise(c.conv) for c in convs):
            return False
        return len({_conv_bn.uses_batch_stats(c.bn) for c in convs}) == 1 and all(c.bn.affine for c in convs)

    def _differentiable(self, x: torch.Tensor, shared: list) -> torch.Tensor:
        """Training (or eval with gradients): every output branch whose BatchNorm uses batch
        statistics ends as a piece (c, mean, invstd, weight, bias) of batch_norm_act_cat, any
        other output as a piece copied in."""
        values, pieces = {"x": x}, {}
        if shared:
            self._shared_pieces(x, shared, values, pieces)
        for name, source in self._steps:
            if name in values or name in pieces:
                continue
            unit = self._conv(name) if self._is_conv(name) else None
            if name in self._outputs and unit is not None and unit.fusable() and _conv_bn.uses_batch_stats(unit.bn):
                pieces[name] = (*_conv_bn.conv_batch_stats(values[source], unit.conv, unit.bn), unit.bn.weight,
                                unit.bn.bias)  # fmt: skip
            else:
                values[name] = self._run(name, values[source])
        outputs = [pieces.get(name, (values.get(name), None, None, None, None)) for name in self._outputs]
        if not pieces or len({piece[0].dtype for piece in outputs}) > 1:
            # Nothing to normalise into the buffer, or dtypes that torch.cat promotes (under autocast,
            # a pool of a float32 x beside half-precision convs): torch.cat's result is eager's.
            return torch.cat([self._finished(piece) for piece in outputs], 1)
        return batch_norm_act_cat(*zip(*outputs), "relu")

    @staticmethod
    def _finished(piece: tuple) -> torch.Tensor:
        c, mean, invstd, weight, bias = piece
        return c if mean is None else torch.ops.fastconv.batch_norm_act(c, mean, invstd, weight, bias, "relu")

    def _shared_pieces(self, x: torch.Tensor, shared: list, values: dict, pieces: dict) -> None:
        """The shared GEMM in the differentiable path: a block output's channels (the first, see
        __init__) become pieces; the rest are normalised in one pass and become values."""
        convs = [self._conv(name) for name in shared]
        if not _conv_bn.uses_batch_stats(convs[0].bn):
            y, start = self._shared_forward(x, shared), 0
            for name, conv in zip(shared, convs):
                values[name], start = y[:, start:start + conv.conv.out_channels], start + conv.conv.out_channels
            return
        c, mean, invstd = self._shared_batch_stats(x, convs)
        start, rest = 0, []
        for name, conv in zip(shared, convs):
            where = slice(start, start + conv.conv.out_channels)
            if name in self._outputs:
                pieces[name] = (c[:, where], mean[where], invstd[where], conv.bn.weight, conv.bn.bias)
            else:
                rest.append((name, conv, where))
            start = where.stop
        if not rest:
            return
        tail = slice(rest[0][2].start, start)
        y = torch.ops.fastconv.batch_norm_act(c[:, tail], mean[tail], invstd[tail],
                                              torch.cat([conv.bn.weight for _, conv, _ in rest]),
                                              torch.cat([conv.bn.bias for _, conv, _ in rest]), "relu")  # fmt: skip
        for name, _, where in rest:
            values[name] = y[:, where.start - tail.start:where.stop - tail.start]

    def _shared_folded(self, shared: list) -> tuple[torch.Tensor, torch.Tensor]:
        convs = [self._conv(name) for name in shared]
        sources = [t for c in convs for t in (c.conv.weight, c.conv.bias, c.bn.weight, c.bn.bias, c.bn.running_mean,
                                              c.bn.running_var)]  # fmt: skip

        def compute():
            folded = [_conv_bn.fold(c.conv, c.bn) for c in convs]
            return torch.cat([w for w, _ in folded]), torch.cat([s for _, s in folded])

        return self._shared_cache.get(sources, (tuple(shared), tuple(c.bn.eps for c in convs)), compute)

    def _shared_forward(self, x: torch.Tensor, shared: list) -> torch.Tensor:
        """relu(bn(conv(x))) of every shared 1x1 conv, as one GEMM: (N, sum of their C_out, H, W)."""
        convs = [self._conv(name) for name in shared]
        ops = torch.ops.fastconv
        if not _conv_bn.uses_batch_stats(convs[0].bn):
            weight, shift = self._shared_folded(shared)
            x, weight = autocast_inputs(x, weight)
            return ops.pointwise_conv2d(x, weight, None, None, shift, "relu")
        c, mean, invstd = self._shared_batch_stats(x, convs)
        gamma, beta = torch.cat([m.bn.weight for m in convs]), torch.cat([m.bn.bias for m in convs])
        return ops.batch_norm_act(c, mean, invstd, gamma, beta, "relu")

    @staticmethod
    def _shared_batch_stats(x: torch.Tensor, convs: list) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(c, mean, invstd) of the shared GEMM before its BatchNorms (training), each
        BatchNorm's running statistics updated from its own channels' batch statistics."""
        weight = torch.cat([c.conv.weight for c in convs])
        bias = None
        if any(c.conv.bias is not None for c in convs):
            bias = torch.cat([c.conv.bias if c.conv.bias is not None else c.conv.weight.new_zeros(c.conv.out_channels)
                              for c in convs])  # fmt: skip
        x, weight, bias = autocast_inputs(x, weight, bias)
        c, mean, var = torch.ops.fastconv.conv2d_batch_stats(x, weight, bias, (1, 1), (0, 0, 0, 0), (1, 1), 1)
        count = c.shape[0] * c.shape[2] * c.shape[3]
        if convs[0].bn.training and count == 1:
            fail(f"Expected more than 1 value per channel when training, got input size {tuple(x.shape)}")
        eps = torch.cat([var.new_full((m.conv.out_channels,), m.bn.eps) for m in convs])
        start = 0
        for m in convs:  # each BatchNorm's own running update, from its own channels' statistics
            end = start + m.conv.out_channels
            if m.bn.training and m.bn.track_running_stats:
                _conv_bn.update_running_stats(m.bn, mean[start:end], var[start:end], count)
            start = end
        return c, mean, torch.rsqrt(var + eps)

    @torch.no_grad()
    def _into_buffer(self, x: torch.Tensor, shared: list) -> torch.Tensor:
        """Eval without gradients: every branch stores into its channel slice of one output.
        Under autocast the convs cast their inputs (pools read x as it is, as eager's do), and
        the output is in the autocast dtype."""
        values, out, slices = {"x": x}, None, {}
        if shared:
            y, start = self._shared_forward(x, shared), 0
            for name in shared:
                width = self._conv(name).conv.out_channels
                values[name], start = y[:, start:start + width], start + width
        for name, source in self._steps:
            if name in values and name not in self._outputs:
                continue
            inp = values[source]
            if name in values or not self._is_conv(name):  # a shared GEMM's branch, or a pool
                result = values[name] if name in values else self._run(name, inp)
                if name in self._outputs:
                    out = self._output(out, slices, x, tuple(result.shape[2:]))
                    slices[name].copy_(result)
                values[name] = result
                continue
            unit = self._conv(name)
            conv = unit.conv
            stride, padding, dilation = normalise_geometry(tuple(conv.weight.shape[2:]), conv.stride, conv.padding,
                                                           conv.dilation)  # fmt: skip
            weight, shift = unit.folded()
            inp, weight = autocast_inputs(inp, weight)
            if name not in self._outputs:
                values[name] = routed_conv2d_bn_act(inp, weight, None, stride, padding, dilation, conv.groups, None,
                                                    shift, "relu")  # fmt: skip
                continue
            size = output_size(tuple(inp.shape[2:]), tuple(weight.shape[2:]), stride, padding, dilation)
            out = self._output(out, slices, x, size)
            target = slices[name]
            kind = route(inp.shape[1], weight.shape, stride, padding, conv.groups)
            if kind == "gemm":
                torch.ops.fastconv.conv2d_out(inp, weight, stride, padding, dilation, conv.groups, False, target,
                                              None, None, shift, "relu")  # fmt: skip
            elif kind == "pointwise":
                torch.ops.fastconv.pointwise_conv2d_out(inp, weight, None, None, shift, "relu", None, False, None,
                                                        None, None, target)  # fmt: skip
            else:
                target.copy_(routed_conv2d_bn_act(inp, weight, None, stride, padding, dilation, conv.groups, None,
                                                  shift, "relu"))  # fmt: skip
        return out

    def _output(self, out: Optional[torch.Tensor], slices: dict, x: torch.Tensor, size: tuple) -> torch.Tensor:
        """The block's output (allocated at the first branch that stores), and each branch's slice."""
        if out is not None:
            if tuple(out.shape[2:]) != tuple(size):
                fail(f"the branches of {self.kind} must agree on the output size; got {tuple(out.shape[2:])} and "
                     f"{tuple(size)}")  # fmt: skip
            return out
        widths = [self._conv(n).conv.out_channels if self._is_conv(n) else x.shape[1] for n in self._outputs]
        out = empty_output((x.shape[0], sum(widths), *size), x, autocast_dtype(x))
        start = 0
        for name, width in zip(self._outputs, widths):
            slices[name], start = out[:, start:start + width], start + width
        return out


def _is_pointwise(conv: nn.Module) -> bool:
    return isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1) and conv.stride == (1, 1) and \
        conv.padding in ((0, 0), "valid") and conv.dilation == (1, 1) and conv.groups == 1  # fmt: skip


__all__ = ["SPECS", "BasicConv2d", "InceptionBlock", "inception_subclass", "is_torchvision_basic_conv",
           "is_torchvision_inception"]  # fmt: skip
