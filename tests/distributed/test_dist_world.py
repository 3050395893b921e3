"""The pieces around multi-process training that need no second process: who am I, which device, which
strategy, and the plan that keeps every rank's collectives in step."""

from __future__ import annotations

import pytest
import torch

from lorakit.train import ConfigError, TrainConfig
from lorakit.train.batches import StepPlan
from lorakit.train.world import World, backend_for, launched_world, train_device

TORCHRUN_ENV = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}


def test_one_process_runs_alone_whatever_the_config_says():
    for distributed in ("auto", "none", "ddp", "fsdp"):
        assert launched_world(distributed, {}) == World()
        assert launched_world(distributed, {"WORLD_SIZE": "1", "RANK": "0"}) == World()
    assert not World().distributed and World().is_main


def test_torchrun_environment_gives_rank_and_strategy():
    assert launched_world("auto", TORCHRUN_ENV) == World(rank=3, size=4, local_rank=1, strategy="ddp")
    assert launched_world("ddp", TORCHRUN_ENV).strategy == "ddp"
    world = launched_world("fsdp", TORCHRUN_ENV)
    assert world.strategy == "fsdp" and world.distributed and not world.is_main


@pytest.mark.parametrize("distributed, env, message", [
    ("none", TORCHRUN_ENV, r"distributed: none, but 4 processes were started"),
    ("auto", {"WORLD_SIZE": "2"}, r"WORLD_SIZE=2 but RANK is not set"),
    ("auto", {"WORLD_SIZE": "two"}, r"WORLD_SIZE='two': expected an integer"),
    ("auto", {"WORLD_SIZE": "2", "RANK": "2"}, r"RANK=2 is outside WORLD_SIZE=2"),
    ("auto", {**TORCHRUN_ENV, "LOCAL_RANK": "x"}, r"LOCAL_RANK='x'"),
])
def test_bad_launch_environments_are_named(distributed, env, message):
    with pytest.raises(ConfigError, match=message):
        launched_world(distributed, env)


def test_device_and_backend():
    world = World(rank=1, size=2, local_rank=1, strategy="ddp")
    assert train_device("cpu", world) == torch.device("cpu")
    assert backend_for(torch.device("cpu")) == "gloo" and backend_for(torch.device("cuda", 1)) == "nccl"
    with pytest.raises(ConfigError, match="multi-process training runs on cuda or cpu, not mps"):
        train_device("mps", world)
    if not torch.cuda.is_available():
        assert train_device("auto", world) == torch.device("cpu")


def test_dist_timeout_is_validated():
    assert TrainConfig(data="x.jsonl").dist_timeout == 600
    with pytest.raises(ConfigError, match="dist_timeout: must be a positive number"):
        TrainConfig(data="x.jsonl", dist_timeout=0)


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_rank_zero_has_the_most_micro_batches(world_size):
    """The loop gives every rank as many micro-batches as rank 0 (fillers where short); that is only
    enough if no rank ever has more than rank 0."""
    for n in range(1, 30):
        for batch_size in (1, 2, 3):
            for grad_accum in (1, 2):
                plan = StepPlan(n, batch_size, grad_accum, seed=1, world_size=world_size)
                for step in range(plan.steps_per_epoch):
                    counts = [len(plan.micro_batches(step, r)) for r in range(world_size)]
                    assert max(counts) == counts[0] <= grad_accum, (n, batch_size, grad_accum, step, counts)
                    shares = [i for r in range(world_size) for mb in plan.micro_batches(step, r) for i in mb]
                    assert sorted(shares) == sorted(plan.step_indices(step))  # disjoint, nothing lost
