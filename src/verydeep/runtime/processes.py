"""The processes a run is made of: this one's place among those ``torchrun`` started, and how many
data-loading processes to start beside it."""

from __future__ import annotations

import os
from dataclasses import dataclass

from verydeep.runtime.limits import usable_cores


@dataclass(frozen=True)
class Processes:
    """This process's place among those ``torchrun`` started (RANK, WORLD_SIZE, LOCAL_RANK)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Processes:
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                   int(os.environ.get("LOCAL_RANK", 0)))

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def loader_workers(given: int | None = None) -> int:
    """Data-loading processes: ``given`` when set, else one per core this process may use, less one for
    the network, at least one and at most 8."""
    return max(1, min(8, usable_cores() - 1)) if given is None else given
