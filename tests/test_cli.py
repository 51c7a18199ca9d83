"""`python -m fastconv bench` and `python -m fastconv demo` on the CPU: the byte count checked by
hand for one conv, the counts of a whole model, a tiny timed run's outputs, the demo, and bad
arguments. The GPU numbers are gpu_check's and the results folder's."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from torch import nn

import fastconv
from fastconv import __main__ as entry
from fastconv import bench
from fastconv.benchmarks.traffic import bytes_by_op, count_bytes
from fastconv.ops._common import call_key


def test_one_conv_is_counted_as_by_hand():
    """A 1x1 conv of x (2, 8, 5, 5) fp32 to 4 channels: it reads x (2*8*5*5*4 = 1600 bytes) and
    the weight (4*8*4 = 128) and writes y (2*4*5*5*4 = 800); fastconv's op the same."""
    conv = nn.Conv2d(8, 4, 1, bias=False)
    x = torch.randn(2, 8, 5, 5)
    with torch.no_grad():
        assert count_bytes(lambda: conv(x)) == [("aten::convolution", 1728, 800)]
        ours = count_bytes(lambda: fastconv.pointwise_conv2d(x, conv.weight))
    assert ours == [("fastconv::pointwise_conv2d", 1728, 800)]


def test_an_in_place_op_reads_and_writes_its_tensor():
    x = torch.randn(3, 4)
    assert count_bytes(lambda: x.relu_()) == [("aten::relu_", 48, 48)]


def test_dense_block_is_counted_by_its_kernels():
    """A composite op (dense_block_eval) counts its parts, not just its own input and output."""
    block = fastconv.nn.DenseBlock(2, 4, 2, 2).eval()
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad(), fastconv.use_backend("torch"):
        block(x)
        ops = bytes_by_op(count_bytes(lambda: block(x)))
    assert ops["fastconv::pointwise_conv2d"][0] == 2 and ops["fastconv::conv2d_out"][0] == 2
    assert "fastconv::dense_block_eval" not in ops


def test_fused_training_forward_is_counted_by_its_passes():
    """inverted_residual_train (float32, C_out == C_in, so x, p and y have one size A): x read
    for the covariance's mean, its centred copy (A) written and read, x read by the statistics
    pass and the fused kernel, p written then read twice, y written, then read, added to x and
    rewritten by the residual: 9 A read besides the weights, 4 A and the statistics written."""
    block = fastconv.nn.InvertedResidual(8, 8, 1, 6).train()
    x = torch.randn(2, 8, 5, 5)
    (forward,) = [row for row in count_bytes(lambda: block(x)) if row[0] == "fastconv::inverted_residual_train"]
    weights = sum(p.numel() * 4 for p in block.parameters())
    statistics = 2 * (48 + 48 + 8) * 4
    a = x.numel() * 4
    assert forward == ("fastconv::inverted_residual_train", 9 * a + weights, 4 * a + statistics)


def test_traffic_of_a_model(tmp_path):
    other = dict(model="resnet50", mode="train", batch=256, size=224, dtype="fp16", eager_bytes=1, fastconv_bytes=1)
    (tmp_path / "traffic.json").write_text(json.dumps([other]))
    assert bench.main(["--traffic", "--model", "mobilenet_v2", "--out", str(tmp_path)]) == 0
    kept, row = json.loads((tmp_path / "traffic.json").read_text())
    assert kept == other  # another model's row is kept, not overwritten
    assert (row["batch"], row["size"], row["dtype"]) == (256, 224, "fp16")  # counted on meta: full size anywhere
    # The fused blocks' traffic is their inputs and outputs (about 1.1 GB at batch 256, fp16).
    assert 1.0e9 < row["fastconv_bytes"] < 1.3e9 and row["ratio"] > 10
    assert 0.5 < row["flops"] / (256 * 0.6e9) < 1.1  # MobileNetV2: about 0.3 G multiply-adds an image


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU's harness check")
@pytest.mark.parametrize("model", ["mobilenet_v2", "mobilenet_v1"])
def test_a_tiny_timed_run_writes_its_table_json_and_plot(tmp_path, capsys, model):
    args = ["--model", model, "--batch", "1", "--size", "32", "--compare", "eager", "--steps", "1",
            "--out", str(tmp_path)]  # fmt: skip
    assert bench.main(args) == 0
    printed = capsys.readouterr().out
    assert "CPU RUN" in printed and "fastconv speedup" in printed
    results = json.loads((tmp_path / "bench.json").read_text())
    assert [r["variant"] for r in results] == ["fastconv", "eager"]
    assert all(r["ms"] > 0 and r["error"] is None for r in results)
    assert results[0]["max_abs_err"] < 1e-3 and results[1]["speedup_of_fastconv"] > 0
    assert (tmp_path / "bench.png").stat().st_size > 0


def test_mobilenet_v1_is_fastconv_s_model_against_the_same_network_in_plain_layers():
    eager = bench.build("mobilenet_v1", "cpu", channels_last=True)
    fused = bench.optimised("mobilenet_v1", eager)
    assert type(fused) is fastconv.models.MobileNetV1 and fused.features[1].conv_dw.weight.is_contiguous(
        memory_format=torch.channels_last)  # fmt: skip
    assert not any(isinstance(m, fastconv.nn.DepthwiseSeparableConv2d) for m in eager.modules())
    x = torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        want = eager.eval()(x)
        torch.testing.assert_close(fused.eval()(x), want, rtol=1e-4, atol=1e-4 * want.abs().max().item())


def test_bad_arguments():
    with pytest.raises(SystemExit) as exit:
        bench.main(["--compare", "eager,tensorrt"])
    assert exit.value.code == 2
    with pytest.raises(SystemExit):
        bench.main(["--model", "lenet5"])  # not in bench.MODELS
    with pytest.raises(SystemExit):
        bench.main(["--batch", "0"])
    assert entry.main([]) == 2
    assert entry.main(["frobnicate"]) == 2
    assert entry.main(["--help"]) == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the demo is a benchmark")
def test_demo_runs_as_a_module():
    done = subprocess.run([sys.executable, "-m", "fastconv", "demo"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "mobilenet_v2: max |optimised - original|" in done.stdout and "(ok)" in done.stdout
    assert "densenet121" in done.stdout and "less (counted" in done.stdout


def test_classic_models_in_the_bench_list_with_their_sizes():
    """AlexNet, VGG-16, GoogLeNet and Inception-V3 are bench models (and in --all); Inception-V3
    runs at its own 299x299 on a GPU or with --traffic, at 75x75 (its smallest) on a CPU."""
    assert {"alexnet", "vgg16", "googlenet", "inception_v3"} <= set(bench.MODELS)
    args = bench._parse(["--traffic", "--model", "inception_v3"])
    assert bench._for_model(args, "inception_v3").size == 299 and bench._for_model(args, "googlenet").size == 224
    if not torch.cuda.is_available():
        args = bench._parse(["--model", "inception_v3"])
        assert bench._for_model(args, "inception_v3").size == 75 and bench._for_model(args, "alexnet").size == 64
    assert bench._for_model(bench._parse(["--size", "96"]), "inception_v3").size == 96


def test_bench_reports_what_auto_picked_per_layer():
    """auto's choices (made on a GPU; a CPU runs the torch reference and caches none) come back
    per op call shape, with the backend, from the ops' OpImplementations."""
    from fastconv.ops import conv_bn_act

    assert bench.picked_per_layer(bench.auto_picks(), bench.auto_picks()) == []
    before = bench.auto_picks()
    x, weight = torch.empty(8, 3, 9, 9), torch.empty(4, 3, 3, 3)
    key = call_key(x, weight, None, (1, 1), (1, 1, 1, 1), (1, 1), 1, None, None, "relu")
    conv_bn_act.FORWARD._auto_choice[key] = "triton"  # what a GPU run would have cached
    try:
        rows = bench.picked_per_layer(before, bench.auto_picks())
    finally:
        del conv_bn_act.FORWARD._auto_choice[key]
    assert rows == [dict(op="conv2d_bn_act", shapes=[[8, 3, 9, 9], [4, 3, 3, 3]], dtype="torch.float32", backend="triton")]
    assert bench._picked_summary(rows * 2) == "conv2d_bn_act: triton x2"
