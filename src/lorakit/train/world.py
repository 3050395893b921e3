"""Which process of a training job this is. One process today; torchrun's DDP/FSDP slot in here.

The loop asks only `world.rank` / `world.size` (which share of each step's examples to read)
and `world.is_main` (whether to write files), so multi-process training changes this module
and the model wrapping, not the loop.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_world(distributed: str) -> World:
    """The World for the `distributed` option; refuses what is not implemented yet, rather than guess."""
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if distributed in ("ddp", "fsdp"):
        raise NotImplementedError(f"distributed: {distributed!r} is not supported yet; use 'auto' or 'none'")
    if launched > 1:
        raise NotImplementedError(
            f"started as {launched} processes (WORLD_SIZE={launched}), but multi-process training is not "
            "supported yet; run a single process"
        )
    return World()
