"""fastconv.optimize(model): one call to put fastconv's fused modules into any CNN, with the
weights it already has.

It runs every part of the conversion pipeline (fastconv/nn/_pipeline.py: torchvision's
InvertedResidual and ResNet blocks, Conv2d -> BatchNorm2d[ -> act] units, then the remaining
depthwise and 1x1 convs) and reports what it replaced and what it left alone, and why. The
state_dict keys never change, so pretrained weights load before or after.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from fastconv.nn import _pipeline


def _refuse(model) -> None:
    if not isinstance(model, nn.Module):
        raise ValueError(f"fastconv: model must be an nn.Module; got {type(model).__module__}.{type(model).__name__}")
    if isinstance(model, torch.jit.ScriptModule):
        raise ValueError(
            f"fastconv: model must be an eager nn.Module, not a TorchScript module (got {type(model).__name__}): "
            "optimize the eager model, then use torch.compile or torch.export (fastconv's ops do not script)"
        )
    if isinstance(model, torch.fx.GraphModule):
        raise ValueError(
            "fastconv: model must be an eager nn.Module, not a torch.fx.GraphModule: tracing flattened the "
            "blocks optimize recognises; optimize the eager model, then trace it (fastconv's modules are one node each)"
        )


def _first_conv_weight(model: nn.Module):
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.weight
    return None


def _print_report(report: _pipeline.Report, model: nn.Module) -> None:
    rows = [("module", "from", "to")] + [tuple(r) for r in report.replaced]
    print(f"fastconv.optimize: {len(report.replaced)} replaced")
    _print_table(rows)
    if report.skipped:
        print(f"fastconv.optimize: {len(report.skipped)} left alone")
        _print_table([("module", "kind", "why")] + [tuple(r) for r in report.skipped])
    weight = _first_conv_weight(model)
    if weight is not None and weight.dim() == 4 and not weight.is_contiguous(memory_format=torch.channels_last):
        print("fastconv.optimize: hint: the model is not channels_last; fastconv's kernels are fastest on "
              "model.to(memory_format=torch.channels_last) with channels_last inputs")  # fmt: skip


def _print_table(rows: list) -> None:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    for j, row in enumerate(rows):
        print("  " + "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths)).rstrip())
        if j == 0:
            print("  " + "  ".join("-" * width for width in widths))


def optimize(model: nn.Module, *, inplace: bool = False, verbose: bool = False) -> nn.Module:
    """The model with every pattern fastconv recognises replaced by its fused module.

    Args:
        model: any nn.Module (eager; on any device, dtype and memory format).
        inplace: convert `model` itself, sharing its parameters and buffers (an optimizer built
            on it keeps working); otherwise a deep copy is converted and `model` is untouched.
        verbose: print a table of what was replaced (module path, from, to), of what was left
            alone and why, and a hint when the model is not channels_last.

    Returns the converted model: `model` itself when inplace (unless `model` is itself one
    fused pattern, say a bare Sequential(Conv2d, BatchNorm2d, ReLU), then the new module).
    The state_dict keys are unchanged. Idempotent: optimizing an optimized model changes
    nothing. Outputs and gradients equal the original's within rounding, in train and eval.

    What is recognised (see fastconv/nn/_pipeline.py): torchvision's InvertedResidual ->
    InvertedResidual; torchvision's BasicBlock/Bottleneck -> ResNetBlock (with the residual
    add and ReLU in the last 1x1 conv's epilogue); a torchvision ResNet's stem bn1 + relu ->
    BatchNormAct2d; torchvision's _DenseBlock/_Transition -> DenseBlock/Transition (and a
    DenseNet's norm5 -> BatchNormAct2d); nn.Sequential(Conv2d, BatchNorm2d[, ReLU/ReLU6/SiLU/Hardswish/Identity])
    (torchvision's Conv2dNormActivation) -> ConvBNAct2d; timm's blocks' and models' conv ->
    BatchNorm attribute pairs -> FusedConv2d + FoldedBatchNorm2d (the same keys); Conv2d -> ReLU
    runs without a BatchNorm in a plain Sequential (AlexNet, VGG-16) -> FusedSequential (conv, bias
    and ReLU as one); torchvision's Inception BasicConv2d -> fastconv's BasicConv2d and GoogLeNet's
    Inception, Inception-V3's InceptionA..E -> InceptionBlock (fastconv/nn/inception.py); a remaining depthwise Conv2d ->
    DepthwiseConv2d and a remaining plain 1x1 Conv2d -> PointwiseConv2d. Anything with a hook,
    a Sequential subclass with its own forward, and unknown blocks (squeeze-excitation, say)
    are left as they are; their convs may still be swapped one by one.
    """
    _refuse(model)
    if not isinstance(inplace, bool) or not isinstance(verbose, bool):
        raise ValueError(f"fastconv: inplace and verbose must be bools; got inplace={inplace!r}, verbose={verbose!r}")
    if not inplace:
        model = copy.deepcopy(model)
    report = _pipeline.Report()
    model = _pipeline.convert(model, _pipeline.PARTS, report)
    _pipeline.leftovers(model, report)
    if verbose:
        _print_report(report, model)
    return model


__all__ = ["optimize"]
