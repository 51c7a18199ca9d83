"""A converted MobileNetV2 trains under DistributedDataParallel, and an optimised one under FSDP2
(2 processes, gloo on the CPU), exactly as one process that does DDP's arithmetic by hand: each rank's half of the batch
through the model (BatchNorm statistics per rank), the gradients averaged, one SGD step.

This is PyTorch's own engine; the test shows fastconv's ops (their custom backward, the
BatchNorm statistics fused into the convs) fit it: nothing rank-local leaks into the update.
"""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision

import fastconv

STEPS = 3
WORLD = 2
PER_RANK = 4
LR = 0.01


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=5, width_mult=0.35)
    model.classifier[0].p = 0.0  # dropout would draw different masks per process
    # ConvBNAct2d's training path: the batch statistics fused into the convs, the one-pass
    # BatchNorm backward, the running-statistics update.
    model = fastconv.nn.convert_conv_bn_act(model)
    # float64: three SGD steps through small-batch BatchNorms amplify rounding by about 1e5
    # (float32, seen: 1e-6 apart after one step, 0.07 after three, eager torchvision alike),
    # which would drown the comparison; in float64 it stays below 1e-9.
    return model.double()


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    # 4 images a rank at 64x64: the last stage's BatchNorms see 16 values a channel. With 2
    # images at 32x32 they see 2, and even float64 rounding grows to 1e-6 in three steps.
    return [
        (
            torch.randn(2 * PER_RANK, 3, 64, 64, generator=generator, dtype=torch.float64),
            torch.randint(0, 5, (2 * PER_RANK,), generator=generator),
        )
        for _ in range(STEPS)
    ]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, path: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        model = torch.nn.parallel.DistributedDataParallel(make_model())
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        for x, target in batches():
            half = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
            loss = torch.nn.functional.cross_entropy(model(x[half]), target[half])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if rank == 0:
            # A file, not a Manager: tensors sent back through shared memory die with the worker.
            torch.save(model.module.state_dict(), path)
    finally:
        dist.destroy_process_group()


def by_hand(make=make_model) -> dict:
    """DDP's arithmetic in one process: per-rank forward and backward, averaged gradients;
    the buffers follow rank 0 (DDP broadcasts them from rank 0 before each forward)."""
    model = make()
    replicas = [model, copy.deepcopy(model)]
    optimizer = torch.optim.SGD(model.parameters(), lr=LR)
    for x, target in batches():
        replicas[1].load_state_dict(model.state_dict())
        grads = []
        for rank, replica in enumerate(replicas):
            half = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
            replica.zero_grad()
            torch.nn.functional.cross_entropy(replica(x[half]), target[half]).backward()
            grads.append([p.grad for p in replica.parameters()])
        for parameter, rank0, rank1 in zip(model.parameters(), *grads):
            parameter.grad = (rank0 + rank1) / WORLD
        optimizer.step()
    return model.state_dict()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo")
def test_ddp_gloo_matches_the_same_arithmetic_in_one_process(tmp_path):
    path = str(tmp_path / "rank0.pt")
    mp.spawn(_ddp_worker, args=(_free_port(), path), nprocs=WORLD, join=True)
    want = by_hand()
    got = torch.load(path)
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-9, atol=1e-10, msg=lambda m: f"{key}: {m}")


# FSDP2 (torch.distributed.fsdp.fully_shard): the parameters sharded across the ranks, gathered
# for each block's forward and backward, the gradients reduce-scattered (averaged). Unlike DDP it
# leaves buffers alone: each rank's BatchNorms keep their own running statistics, so rank 0's
# are those of its half of each batch, which is what by_hand's model (rank 0's replica) holds.


def make_optimized_model() -> torch.nn.Module:
    """make_model's network through fastconv.optimize: fused inverted residuals, whose training
    runs fastconv::inverted_residual_train, and the fused stem and head."""
    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v2(num_classes=5, width_mult=0.35)
    model.classifier[0].p = 0.0
    return fastconv.optimize(model).double()


def _fsdp_worker(rank: int, port: int, path: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        mesh = init_device_mesh("cpu", (WORLD,))
        model = make_optimized_model()
        for block in model.features:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        optimizer = torch.optim.SGD(model.parameters(), lr=LR)
        for x, target in batches():
            half = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
            loss = torch.nn.functional.cross_entropy(model(x[half]), target[half])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        # Gathering a DTensor is a collective: every rank takes part, rank 0 writes.
        state = {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in model.state_dict().items()}
        if rank == 0:
            torch.save(state, path)
    finally:
        dist.destroy_process_group()


def _fsdp2_available() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return False
    return dist.is_available() and dist.is_gloo_available()


@pytest.mark.skipif(not _fsdp2_available(), reason="torch.distributed.fsdp.fully_shard (FSDP2) with gloo")
def test_fsdp2_gloo_matches_the_same_arithmetic_in_one_process(tmp_path):
    path = str(tmp_path / "rank0.pt")
    mp.spawn(_fsdp_worker, args=(_free_port(), path), nprocs=WORLD, join=True)
    want = by_hand(make_optimized_model)
    got = torch.load(path)
    assert got.keys() == want.keys()
    assert any(type(m).__name__ == "InvertedResidual" and type(m).__module__.startswith("fastconv")
               for m in make_optimized_model().modules())  # fmt: skip
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-9, atol=1e-10, msg=lambda m: f"{key}: {m}")
