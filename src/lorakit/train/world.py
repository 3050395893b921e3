"""Which process of a training job this is, and the torch.distributed process group around a run.

torchrun starts one process per device and tells each who it is through the environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT or its own rendezvous store). The loop asks only
`world.rank` / `world.size` (which share of each step's examples to read), `world.is_main`
(whether to write files) and `world.strategy` (how parallel.py wraps the model).
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import Tensor

from lorakit.models import pick_device

from .config import ConfigError

STRATEGIES = ("none", "ddp", "fsdp")


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0  # the process's index on its machine: which GPU it drives
    strategy: str = "none"  # none (one process), ddp or fsdp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def launched_world(distributed: str, env: Mapping[str, str] = os.environ) -> World:
    """The World that torchrun's variables in `env` describe, with the strategy `distributed` asks for.

    One process runs alone whatever `distributed` says, so the same config works with and without
    torchrun; several processes use DDP unless the config asks for FSDP.
    """
    size = _env_int(env, "WORLD_SIZE", 1)
    if size < 1:
        raise ConfigError(f"WORLD_SIZE={size}: must be at least 1")
    if size == 1:
        return World()
    if distributed == "none":
        raise ConfigError(
            f"distributed: none, but {size} processes were started (WORLD_SIZE={size}); set distributed "
            "to auto, ddp or fsdp, or start a single process"
        )
    if distributed not in ("auto", "ddp", "fsdp"):
        raise ConfigError(f"distributed: expected auto, none, ddp or fsdp, got {distributed!r}")
    if "RANK" not in env:
        raise ConfigError(f"WORLD_SIZE={size} but RANK is not set; start the processes with torchrun")
    rank, local_rank = _env_int(env, "RANK", 0), _env_int(env, "LOCAL_RANK", 0)
    if not 0 <= rank < size:
        raise ConfigError(f"RANK={rank} is outside WORLD_SIZE={size}")
    return World(rank, size, local_rank, "ddp" if distributed == "auto" else distributed)


def train_device(option: str, world: World) -> torch.device:
    """This process's device: with several processes on GPUs, the GPU of its local rank."""
    device = pick_device(option)
    if not world.distributed:
        return device
    if device.type == "cuda":
        if torch.cuda.device_count() <= world.local_rank:
            raise ConfigError(f"LOCAL_RANK={world.local_rank}, but this machine has only "
                              f"{torch.cuda.device_count()} GPU(s); use --nproc-per-node {torch.cuda.device_count()}")
        return torch.device("cuda", world.local_rank)
    if device.type != "cpu":
        raise ConfigError(f"device: multi-process training runs on cuda or cpu, not {device.type}")
    return device


def backend_for(device: torch.device) -> str:
    """NCCL between GPUs, gloo between CPU processes."""
    return "nccl" if device.type == "cuda" else "gloo"


def join_process_group(world: World, device: torch.device, timeout_s: float) -> None:
    """Join the job's process group, once per process (nothing to do for one process).

    `timeout_s` bounds how long a collective waits for a rank that died or hangs. The group lives
    until the process exits: a later `train` in the same process reuses it (a group destroyed and
    made again under torchrun would meet the old one's stale rendezvous keys and hang).
    """
    if not world.distributed:
        return
    if dist.is_initialized():
        if (dist.get_rank(), dist.get_world_size()) != (world.rank, world.size):
            raise RuntimeError(f"the process group is rank {dist.get_rank()} of {dist.get_world_size()}, "
                               f"but the environment says rank {world.rank} of {world.size}")
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend_for(device), timeout=timedelta(seconds=timeout_s),
                            device_id=device if device.type == "cuda" else None)
    atexit.register(_leave)


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


# -- collectives (no-ops for one process) ------------------------------------------------------
def barrier(world: World) -> None:
    """Wait until every rank gets here (e.g. until rank 0 has written a file the others read)."""
    if world.distributed:
        dist.barrier()


def all_sum(tensor: Tensor, world: World) -> Tensor:
    """`tensor` summed over the ranks, in place (one collective)."""
    if world.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def _env_int(env: Mapping[str, str], name: str, default: int) -> int:
    value = env.get(name, "")
    if value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name}={value!r}: expected an integer (set by torchrun)") from None
