"""The conv_bn_act suite's shapes and cases, and its byte-count model (see conv_bn_act.py's
docstring): what is measured, separate from how it is measured."""
from dataclasses import dataclass

from ..common import DTYPES

@dataclass(frozen=True)
class Shape:
    model: str
    n: int
    c_in: int
    c_out: int
    h: int        # H = W of the input
    stride: int
    activation: str
    k: int = 3

    @property
    def padding(self):
        return self.k // 2

    @property
    def out_h(self):
        return (self.h + 2 * self.padding - self.k) // self.stride + 1

    @property
    def gemm(self):
        """(M, K, N) of the implicit GEMM."""
        return self.n * self.out_h * self.out_h, self.c_in * self.k * self.k, self.c_out

    @property
    def name(self):
        return f"{self.n}x{self.c_in}x{self.h}x{self.h}->{self.c_out} k{self.k} s{self.stride}"

    def small(self):
        """The instance the bytes check traces: batch 2, the same channels, kernel and stride."""
        return Shape(self.model, 2, self.c_in, self.c_out, min(self.h, 16), self.stride,
                     self.activation, self.k)


STEM = [Shape("mobilenetv2", 128, 3, 32, 224, 2, "relu6")]
# torchvision ResNet50 (v1.5): (C, H, stride) of each distinct 3x3 conv, C_in = C_out.
RESNET50 = [Shape("resnet50", 64, c, c, h, s, "relu")
            for c, h, s in [(64, 56, 1), (128, 56, 2), (128, 28, 1), (256, 28, 2), (256, 14, 1),
                            (512, 14, 2), (512, 7, 1)]]
# VGG16: (C_in, C_out, H) of each distinct 3x3 conv, stride 1.
VGG16 = [Shape("vgg16", 64, ci, co, h, 1, "relu")
         for ci, co, h in [(3, 64, 224), (64, 64, 224), (64, 128, 112), (128, 128, 112),
                           (128, 256, 56), (256, 256, 56), (256, 512, 28), (512, 512, 28),
                           (512, 512, 14)]]
GPU_SHAPES = STEM + RESNET50 + VGG16
# The torch.compile subset: the stem, a mid ResNet50 layer, a large matrix-bound VGG16 layer.
COMPILE_SHAPES = [STEM[0], RESNET50[2], VGG16[5]]
# --quick on a GPU: inference on the stem, a mid, a stride-2 and the smallest ResNet50 layer and
# one matrix-bound VGG16 layer; train on the stem, the mid ResNet50 layer and one VGG16 layer;
# torch.compile on the mid ResNet50 layer only.
GPU_QUICK_INFERENCE = [STEM[0], RESNET50[2], RESNET50[3], RESNET50[6], VGG16[5]]
GPU_QUICK_TRAIN = [STEM[0], RESNET50[2], VGG16[3]]
GPU_QUICK_COMPILE = [RESNET50[2]]
# On the CPU the run only checks the harness: tiny shapes, seconds in all.
CPU_SHAPES = [Shape("tiny", 2, 3, 8, 16, 2, "relu6"), Shape("tiny", 2, 8, 8, 8, 1, "relu"),
              Shape("tiny", 2, 8, 16, 8, 1, "relu")]



@dataclass(frozen=True)
class Case:
    shape: Shape
    dtype: str
    kind: str     # "inference", "compile", "train" or "bytes"
    layout: str = "channels_last"

    @property
    def mode(self):
        return {"inference": "fwd", "compile": "fwd", "train": "train", "bytes": "bytes"}[self.kind]

    def tensor_bytes(self):
        """(|x|, A = |y|, |w|) in bytes."""
        s, item = self.shape, DTYPES[self.dtype].itemsize
        x = s.n * s.c_in * s.h * s.h * item
        y = s.n * s.c_out * s.out_h * s.out_h * item
        w = s.c_out * s.c_in * s.k * s.k * item
        return x, y, w

    def gemm_flops(self):
        m, k, n = self.shape.gemm
        return 2 * m * k * n

    def bytes_moved(self):
        x, a, w = self.tensor_bytes()
        if self.kind == "train":
            return activation_units(self.shape)["fused"] * a + conv_bytes(self)
        return x + a + w + 4 * self.shape.c_out  # the float32 shift of the folded BatchNorm

    def flops(self):
        return self.gemm_flops() * (3 if self.kind == "train" else 1)


def _route(shape):
    """Which fastconv kernel serves the conv ("depthwise", "pointwise" or "gemm")."""
    try:
        from fastconv.ops.conv_bn_act import route
        return route(shape.c_in, (shape.c_out, shape.c_in, shape.k, shape.k),
                     (shape.stride, shape.stride), (shape.padding,) * 4, 1)
    except (ImportError, AttributeError):
        return "gemm"


# The byte-count model (module docstring) -------------------------------------------------------

EAGER_PASSES = {"conv writes c": 1, "bn fwd: c read twice, b written": 3,
                "act: b read, y written": 2,
                "act bwd: grad_y and y read, grad_b written": 3,
                "bn bwd: grad_b and c read twice, grad_c written": 5}
FUSED_PASSES = {"conv writes c (+stats)": 1, "normalise+act: c read, y written": 2,
                "bn+act bwd: grad_y and c read twice, grad_c written": 5}
# Re-reads inside one kernel, which an op-level trace cannot see.
EAGER_REREADS = 1 + 2   # BN forward's second read of c; BN backward's second read of grad_b, c
FUSED_REREADS = 2       # the fused backward's second read of grad_y and c


def activation_units(shape):
    """Activation traffic of one training step in units of A: {"eager", "fused", ...touches}."""
    eager, fused = sum(EAGER_PASSES.values()), sum(FUSED_PASSES.values())
    return {"eager": eager, "fused": fused, "eager_touches": eager - EAGER_REREADS,
            "fused_touches": fused - FUSED_REREADS}


def conv_bytes(case):
    """The conv's own traffic in a training step, the same on both sides: forward x, w;
    grad_input grad_c, w, grad_x; grad_weight grad_c, x, grad_w."""
    x, a, w = case.tensor_bytes()
    return 3 * x + 2 * a + 3 * w
