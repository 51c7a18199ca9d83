"""The one conversion pipeline behind fastconv.optimize and the per-kind converters.

Each converter (convert_blocks, convert_conv_bn_act, convert_depthwise, convert_pointwise) is
one or more *parts* of a single walk, so that any order or repetition of them, and optimize,
give the same model:

* the walk never descends into a fastconv fused module (ConvBNAct2d, InvertedResidual,
  DepthwiseSeparableConv2d, ResNetBlock): a conv there is run by the unit's kernel, and
  swapping it for a DepthwiseConv2d/PointwiseConv2d is what used to silently undo the fusion;
* instead, a fused module met on the walk is *repaired*: any DepthwiseConv2d/PointwiseConv2d
  inside it (put there by hand, or by an older converter) becomes a plain Conv2d sharing its
  parameters, so the unit takes its fused path again;
* every pattern accepts fastconv's DepthwiseConv2d/PointwiseConv2d where it expects a Conv2d,
  so a conv swapped by convert_depthwise/convert_pointwise is still fused later.

The parts, in optimize's order:

    "blocks"     torchvision InvertedResidual -> fastconv InvertedResidual; torchvision
                 BasicBlock/Bottleneck -> ResNetBlock; torchvision _DenseBlock/_Transition ->
                 DenseBlock/Transition; the same timm blocks, and timm's DepthwiseSeparableConv,
                 where every part has a fused kernel (timm_blocks.py); a torchvision DenseNet's
                 norm5 -> BatchNormAct2d; a
                 plain nn.Sequential holding Conv2d, BatchNorm2d[, act] runs among other
                 children (VGG's features) -> FusedSequential (the same children and keys), which
                 also runs Conv2d -> act without a BatchNorm (AlexNet, VGG-16) fused; torchvision's
                 GoogLeNet Inception and Inception-V3 InceptionA..E -> InceptionBlock (inception.py)
    "fuse"       nn.Sequential(Conv2d, BatchNorm2d[, act]) -> ConvBNAct2d; the conv -> BatchNorm
                 attribute pairs of timm's blocks and models, and torchvision ResNet's stem
                 (conv1, bn1, relu) -> FusedConv2d + FoldedBatchNorm2d (+ Identity)
                 (attribute_fusion.py); any other timm BatchNormAct2d -> BatchNormAct2d; torchvision's
                 Inception BasicConv2d (conv, BN eps 0.001, ReLU) -> fastconv's BasicConv2d
    "depthwise"  a remaining Conv2d with groups == in_channels -> DepthwiseConv2d
    "pointwise"  a remaining plain 1x1 Conv2d -> PointwiseConv2d

A pattern is taken only when none of its modules has a hook (a fused kernel would bypass it)
and, for Sequentials, when the class keeps nn.Sequential's forward. What is left alone, and
why, is recorded in a Report.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import nn

from fastconv.nn.attribute_fusion import FoldedBatchNorm2d, FusedConv2d, batch_norm_activation, fuse_attributes
from fastconv.nn.batch_norm import BatchNormAct2d
from fastconv.nn.conv_bn_act import ConvBNAct2d, is_conv_bn_act, plain_conv2d
from fastconv.nn.dense import DenseBlock, Transition
from fastconv.nn.depthwise import DepthwiseConv2d, is_depthwise
from fastconv.nn.inception import BasicConv2d, InceptionBlock, inception_subclass, is_torchvision_basic_conv, \
    is_torchvision_inception  # fmt: skip
from fastconv.nn.inverted_residual import DepthwiseSeparableConv2d, InvertedResidual
from fastconv.nn.pointwise import PointwiseConv2d, is_pointwise
from fastconv.nn.resnet import ResNetBlock, is_torchvision_resnet_block
from fastconv.nn.sequential import FusedSequential, fusable_runs, run_batchnorms
from fastconv.nn.timm_blocks import TimmInvertedResidual, convert_timm_block, is_timm_block, timm_block_refusal

PARTS = ("blocks", "fuse", "depthwise", "pointwise")
FUSED = (ConvBNAct2d, InvertedResidual, DepthwiseSeparableConv2d, ResNetBlock, DenseBlock, Transition, FusedConv2d,
         FoldedBatchNorm2d, TimmInvertedResidual, BasicConv2d, InceptionBlock)
_DENSENET = {"_DenseBlock": DenseBlock, "_Transition": Transition}
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


@dataclasses.dataclass
class Report:
    """What a conversion did: `replaced` rows (path, from, to) and `skipped` rows (path, kind, why)."""

    replaced: list = dataclasses.field(default_factory=list)
    skipped: list = dataclasses.field(default_factory=list)


def hooked(module: nn.Module) -> bool:
    """Whether module or any submodule has a hook a fused kernel would bypass."""
    return any(getattr(m, name, None) for m in module.modules() for name in _HOOKS)


def hooked_self(module: nn.Module) -> bool:
    """Whether module itself (not its children) has a hook."""
    return any(getattr(module, name, None) for name in _HOOKS)


def _is_torchvision(module: nn.Module, module_name: str, class_name: str) -> bool:
    return type(module).__name__ == class_name and type(module).__module__ == f"torchvision.models.{module_name}"


def _repair(module: nn.Module, path: str, report: Report) -> None:
    """Inside a fused module, every Depthwise/PointwiseConv2d back to a plain Conv2d."""
    for parent_path, parent in module.named_modules(prefix=path):
        for name, child in _children(parent):
            if type(child) in (DepthwiseConv2d, PointwiseConv2d):
                setattr(parent, name, plain_conv2d(child))
                report.replaced.append((f"{parent_path}.{name}".lstrip("."), type(child).__name__,
                                        "Conv2d (run by the fused unit around it)"))  # fmt: skip


def _block(child: nn.Module) -> Optional[nn.Module]:
    """The fused module for a torchvision block, or None."""
    if _is_torchvision(child, "mobilenetv2", "InvertedResidual"):
        conv = getattr(child, "conv", None)
        if isinstance(conv, nn.Sequential) and len(conv) in (3, 4):
            # The projection may have been swapped for a PointwiseConv2d by convert_pointwise.
            plain = plain_conv2d(conv[-2])
            if plain is not None:
                conv[-2] = plain
        return InvertedResidual.from_torchvision(child)
    if is_torchvision_resnet_block(child):
        return ResNetBlock.from_torchvision(child)
    if _is_densenet_module(child):
        _repair(child, "", Report())  # a conv swapped by convert_pointwise is a plain Conv2d again
        return _DENSENET[type(child).__name__].from_torchvision(child)
    if _is_fusable_timm_block(child):
        _repair(child, "", Report())
        return convert_timm_block(child)
    if is_torchvision_inception(child):
        return InceptionBlock.from_torchvision(child)
    return None


def _is_fusable_timm_block(child: nn.Module) -> bool:
    """timm's InvertedResidual, DepthwiseSeparableConv, ResNet blocks and DenseNet modules in a
    configuration the fused modules honour (timm_blocks.py); the others keep their forward."""
    return is_timm_block(child) and timm_block_refusal(child) is None


def _is_densenet_module(child: nn.Module) -> bool:
    return any(_is_torchvision(child, "densenet", name) for name in _DENSENET)


def _densenet_head(model: nn.Module, path: str, report: Report) -> None:
    """A torchvision DenseNet's features.norm5 as a BatchNormAct2d without activation: its ReLU
    is DenseNet.forward's F.relu(..., inplace=True), which must stay there (an in-place ReLU on
    a fused ReLU's output would overwrite what that ReLU's backward keeps)."""
    features = getattr(model, "features", None)
    bn = getattr(features, "norm5", None)
    if type(bn) is not nn.BatchNorm2d or hooked(bn):
        return
    features.norm5 = BatchNormAct2d.from_modules(bn)
    prefix = f"{path}." if path else ""
    report.replaced.append((f"{prefix}features.norm5", "BatchNorm2d", "BatchNormAct2d (no activation: forward's ReLU)"))


def _is_timm_batch_norm_act(child: nn.Module) -> bool:
    """timm's BatchNormAct2d with an activation and drop fastconv honours (not inside a pair:
    fuse_attributes took those first)."""
    return type(child).__name__ == "BatchNormAct2d" and type(child).__module__.startswith("timm.") and \
        batch_norm_activation(child)[0]  # fmt: skip


def _fuse_attributes(module: nn.Module, path: str, report: Report) -> None:
    """timm's blocks and models: their conv -> BatchNorm attribute pairs (attribute_fusion)."""
    replaced, skipped = fuse_attributes(module)
    prefix = f"{path}." if path else ""
    report.replaced += [(f"{prefix}{name}", *rest) for name, *rest in replaced]
    report.skipped += [(f"{prefix}{name}", *rest) for name, *rest in skipped]


def _swap(child: nn.Module, parts: tuple) -> Optional[nn.Module]:
    """The replacement of child by the parts asked for, or None."""
    if "blocks" in parts:
        block = _block(child)
        if block is not None:
            return block
        if fusable_runs(child) and not is_conv_bn_act(child):
            return FusedSequential.from_sequential(child)
    if "fuse" in parts and is_conv_bn_act(child):
        return ConvBNAct2d.from_modules(*child)
    if "fuse" in parts and _is_timm_batch_norm_act(child):
        return BatchNormAct2d.from_timm(child)
    if "fuse" in parts and is_torchvision_basic_conv(child):
        return BasicConv2d.from_torchvision(child)
    if "depthwise" in parts and is_depthwise(child):
        return DepthwiseConv2d.from_conv(child)
    if "pointwise" in parts and type(child) is nn.Conv2d and is_pointwise(child):
        return PointwiseConv2d.from_conv(child)
    return None


def _candidate(child: nn.Module, parts: tuple) -> bool:
    """Whether child would match a pattern, ignoring hooks (so a hook can be reported)."""
    if ("blocks" in parts and is_torchvision_inception(child)) or ("fuse" in parts and is_torchvision_basic_conv(child)):
        return True  # Inception's units (inception.py)
    return ("blocks" in parts and (_is_torchvision(child, "mobilenetv2", "InvertedResidual")
                                   or is_torchvision_resnet_block(child) or _is_densenet_module(child)
                                   or _is_fusable_timm_block(child))) or (  # fmt: skip
        "fuse" in parts and (is_conv_bn_act(child) or _is_timm_batch_norm_act(child))
    ) or ("blocks" in parts and fusable_runs(child) > 0 and not is_conv_bn_act(child)) or ("depthwise" in parts and is_depthwise(child)) or (
        "pointwise" in parts and type(child) is nn.Conv2d and is_pointwise(child)
    )


def _children(module: nn.Module) -> list:
    """(name, child) for every child, a child registered twice included (named_children()
    yields a shared module once, which would leave its second place unconverted)."""
    return [(name, child) for name, child in module._modules.items() if child is not None]


def _walk(module: nn.Module, path: str, parts: tuple, report: Report, seen: dict) -> None:
    """`seen` maps id(module) to (module, its replacement or None): a submodule shared by two
    parents (or met twice) is converted once, and every place that held it gets the one
    replacement, so the sharing survives. The module is kept in the entry so its id stays its own."""
    if id(module) in seen:
        return
    seen[id(module)] = (module, None)
    if "blocks" in parts and _is_torchvision(module, "densenet", "DenseNet"):
        _densenet_head(module, path, report)
    if "fuse" in parts and not hooked_self(module):
        _fuse_attributes(module, path, report)
    in_runs = run_batchnorms(module)  # a FusedSequential's own BatchNorms (timm's BatchNormAct2d among them)
    for name, child in _children(module):
        child_path = f"{path}.{name}" if path else name
        if id(child) in in_runs:
            continue
        if "blocks" in parts and is_timm_block(child) and not _is_fusable_timm_block(child):
            report.skipped.append((child_path, type(child).__name__,
                                   f"{timm_block_refusal(child)}; its conv -> BatchNorm pairs fused one by one"))  # fmt: skip
        if isinstance(child, torch.jit.ScriptModule):
            report.skipped.append((child_path, type(child).__name__, "TorchScript module: its code is compiled"))
            continue
        if isinstance(child, FUSED):
            _repair(child, child_path, report)
            continue
        if id(child) in seen and seen[id(child)][1] is not None:
            setattr(module, name, seen[id(child)][1])
            report.replaced.append((child_path, type(child).__name__, f"{type(seen[id(child)][1]).__name__} (shared)"))
            continue
        if _candidate(child, parts):
            if hooked(child):
                report.skipped.append((child_path, type(child).__name__, "has a hook, which a fused kernel would bypass"))
                continue
            replacement = _swap(child, parts)
            setattr(module, name, replacement)
            seen[id(child)] = (child, replacement)
            report.replaced.append((child_path, type(child).__name__, type(replacement).__name__))
            if isinstance(replacement, FUSED):
                _repair(replacement, child_path, report)
                continue
            if not isinstance(replacement, FusedSequential):
                continue
            # A FusedSequential keeps its other children: they are walked like any module's.
        _walk(getattr(module, name), child_path, parts, report, seen)


def convert(model: nn.Module, parts: tuple = PARTS, report: Optional[Report] = None) -> nn.Module:
    """Apply the given parts of the pipeline to model, in place; returns model."""
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"fastconv: parts must be among {PARTS}; got {unknown}")
    if not isinstance(model, nn.Module):
        raise ValueError(f"fastconv: model must be an nn.Module; got {type(model).__name__}")
    report = Report() if report is None else report
    # A holder, so that the model itself can be replaced (a bare Sequential(Conv2d, BN, act)).
    holder = nn.Module()
    holder.model = model
    # A part fuses only what the parts before it in PARTS order left; running the asked parts
    # as separate walks in that order is what makes any call order give optimize's model.
    start = len(report.replaced), len(report.skipped)
    for part in PARTS:
        if part in parts:
            _walk(holder, "", (part,), report, {})
    for rows, begin in ((report.replaced, start[0]), (report.skipped, start[1])):
        rows[begin:] = [(_unhold(path), *rest) for path, *rest in rows[begin:]]
    return holder.model


def _unhold(path: str) -> str:
    return "(model)" if path == "model" else path[len("model."):]


def convert_blocks(model: nn.Module) -> nn.Module:
    """Replace, in place, torchvision's InvertedResidual by fastconv's InvertedResidual and
    torchvision's ResNet BasicBlock/Bottleneck by ResNetBlock (sharing their modules; the same
    state_dict keys), and torchvision's dense blocks and transitions. Returns the
    model. The block part of `fastconv.optimize`'s pipeline; see this module's docstring."""
    return convert(model, ("blocks",))


def leftovers(model: nn.Module, report: Report) -> None:
    """Record every BatchNorm left outside a fastconv module, and why it was not fused."""

    def visit(module: nn.Module, path: str, seen: set) -> None:
        if id(module) in seen or isinstance(module, FUSED + (BatchNormAct2d,)):
            return
        seen.add(id(module))
        children = _children(module)
        in_runs = run_batchnorms(module) if isinstance(module, FusedSequential) else set()
        for i, (name, child) in enumerate(children):
            child_path = f"{path}.{name}" if path else name
            if id(child) in in_runs:
                continue
            if isinstance(child, nn.modules.batchnorm._BatchNorm) and not isinstance(child, BatchNormAct2d):
                previous = children[i - 1][1] if i else None
                if type(child) is not nn.BatchNorm2d:
                    why = f"{type(child).__name__} is not a plain BatchNorm2d"
                elif isinstance(module, nn.Sequential) and plain_conv2d(previous) is not None:
                    why = ("after a Conv2d inside a longer Sequential: a fused module for the pair would "
                           "change the state_dict keys")  # fmt: skip
                else:
                    why = f"not after a Conv2d in a pattern fastconv recognises (inside {type(module).__name__})"
                report.skipped.append((child_path, type(child).__name__, why))
            elif "squeezeexcit" in type(child).__name__.lower() or type(child).__name__ in ("SEModule", "SqueezeExcite"):
                report.skipped.append((child_path, type(child).__name__,
                                       "squeeze-excitation: no fused kernel; its convs converted one by one"))  # fmt: skip
            elif inception_subclass(child):
                why = (f"subclass of torchvision's {inception_subclass(child)}: its forward may differ; its convs "
                       "fused one by one")  # fmt: skip
                report.skipped.append((child_path, type(child).__name__, why))
            visit(child, child_path, seen)
        own_forward = type(module).forward is not nn.Sequential.forward and not isinstance(module, FusedSequential)
        if isinstance(module, nn.Sequential) and own_forward:
            report.skipped.append((path, type(module).__name__, "Sequential subclass with its own forward"))

    visit(model, "", set())


__all__ = ["PARTS", "Report", "convert", "convert_blocks", "hooked", "leftovers"]
