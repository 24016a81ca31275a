"""Tensor/expert parallel state: set once, read through `get_dist()`; collectives are no-ops on one rank."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1

    def shard(self, n: int, what: str) -> tuple[int, int]:
        """[start, end) of this rank's equal share of n items; raises if n does not divide."""
        if n % self.world_size:
            raise ValueError(f"{what}: {n} does not divide evenly over tensor_parallel_size={self.world_size}")
        k = n // self.world_size
        return self.rank * k, (self.rank + 1) * k


_DIST = DistInfo()


def get_dist() -> DistInfo:
    return _DIST


def set_dist(info: DistInfo) -> None:
    """Called once per process by the launcher, before any model is built."""
    global _DIST
    _DIST = info


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    if _DIST.world_size == 1:
        return x
    dist.all_reduce(x)
    return x


def all_gather_last(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's x along the last dim (vocab-parallel logits)."""
    if _DIST.world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_DIST.world_size)]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=-1)
