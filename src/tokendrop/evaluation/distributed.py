"""Several processes for `tokendrop eval`: `torchrun` or `accelerate launch` start them, this module shares the work.

    torchrun --nproc_per_node 2 -m tokendrop eval --data DIR --json results.jsonl

The launcher sets WORLD_SIZE, RANK and LOCAL_RANK in each process. Rank r answers questions r, r + W,
r + 2W, ... (W processes); after each configuration rank 0 gathers every rank's answers, puts them back
in the questions' order, scores and writes them. Other ranks write nothing. Backends: gloo on CPU, nccl
on CUDA (each process on GPU LOCAL_RANK). Without those variables: one process, no process group.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class Ranks:
    """This process's place among `world` processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    def __post_init__(self):
        if self.world < 1 or not 0 <= self.rank < self.world or self.local_rank < 0:
            raise ValueError(f"RANK must be in [0, WORLD_SIZE) and LOCAL_RANK >= 0, got RANK={self.rank}, "
                             f"WORLD_SIZE={self.world}, LOCAL_RANK={self.local_rank}")

    @property
    def main(self) -> bool:
        """Rank 0: the process that scores, prints and writes."""
        return self.rank == 0

    def shard(self, items: list) -> list:
        """This rank's share: items rank, rank + world, rank + 2 * world, ..."""
        return items[self.rank :: self.world]

    def gather(self, local: list) -> list | None:
        """On rank 0, every rank's `shard` results put back in the original order; None on other ranks."""
        if self.world == 1:
            return list(local)
        import torch.distributed as dist

        parts = [None] * self.world if self.main else None
        dist.gather_object(local, parts, dst=0)
        if not self.main:
            return None
        out = [None] * sum(len(part) for part in parts)
        for rank, part in enumerate(parts):
            out[rank :: self.world] = part  # the inverse of shard()
        return out


def from_env(env=os.environ) -> Ranks:
    """The ranks a launcher set (WORLD_SIZE, RANK, LOCAL_RANK); one process when they are absent."""
    try:
        world = int(env.get("WORLD_SIZE", 1))
        rank = int(env.get("RANK", 0))
        local_rank = int(env.get("LOCAL_RANK", rank))
    except ValueError:
        raise ValueError("WORLD_SIZE, RANK and LOCAL_RANK must be integers, got "
                         f"{env.get('WORLD_SIZE')!r}, {env.get('RANK')!r}, {env.get('LOCAL_RANK')!r}") from None
    return Ranks(rank, world, local_rank)


def init(env=os.environ) -> Ranks:
    """The ranks from the environment, with the process group started when there are several."""
    ranks = from_env(env)
    if ranks.world > 1:
        import torch
        import torch.distributed as dist

        if not dist.is_initialized():
            if torch.cuda.is_available():
                torch.cuda.set_device(ranks.local_rank)  # nccl's collectives run on this process's GPU
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return ranks


def device(ranks: Ranks):
    """The device this rank's model goes on: its own GPU under several processes, else the default (None)."""
    import torch

    return f"cuda:{ranks.local_rank}" if ranks.world > 1 and torch.cuda.is_available() else None


def close() -> None:
    """End the process group `init` started (a no-op in one process)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
