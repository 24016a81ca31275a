"""Tensor/expert parallel state and its collectives.

A process joins a group once, through `init_distributed` (which sets torch.distributed and the DistInfo
together), and reads its place through `get_dist()`. Layers are built with a DistInfo and call its collectives
(`dist.all_reduce(x)`, ...), which are no-ops on one rank, so a single-rank model never touches torch.distributed
even in a process that also hosts a tensor-parallel one.

Two planes: the layers' collectives run on the default group (gloo on CPU, NCCL on CUDA); rank 0's decisions
(start-up checks; under torchrun also the engine's step plans and what each phase committed: GroupChannel) travel on
the control group, a gloo group of host memory whose collectives wait as long as it takes, so that a follower idles
there between steps for hours without a timeout.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

CONTROL_BYTES = 4096  # the control plane's broadcast buffer: a step plan of a few dozen requests fits in one
CONTROL_TIMEOUT = timedelta(days=365)  # a follower waits for rank 0's next plan while the server idles


@dataclass(frozen=True)
class DistInfo:
    """This process's place in a tensor-parallel group (rank 0 of 1 outside any)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0  # its device index on this node (CUDA)
    group: Any = field(default=None, compare=False, repr=False)  # torch.distributed ProcessGroup; None = WORLD
    control: Any = field(default=None, compare=False, repr=False)  # gloo group of rank 0's decisions (host tensors)

    def shard(self, n: int, what: str) -> tuple[int, int]:
        """[start, end) of this rank's equal share of n items; raises ValueError naming `what` if n does not
        divide evenly."""
        if n % self.world_size:
            raise ValueError(f"{what}: {n} does not divide evenly over tensor_parallel_size={self.world_size}")
        k = n // self.world_size
        return self.rank * k, (self.rank + 1) * k

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum x over ranks, in place; returns x (every rank gets the same bits)."""
        if self.world_size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenate every rank's x along the last dim, in rank order (vocab-parallel logits)."""
        if self.world_size == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    # --- the control plane: host memory on the control group, rank 0 the source ---------------------------------

    def _share(self, x: torch.Tensor) -> torch.Tensor:
        """Rank 0's x (a CPU tensor, the same shape on every rank) on every rank, in place; returns x."""
        dist.broadcast(x, src=0, group=self.control)
        return x

    def share_object(self, obj: Any) -> Any:
        """Rank 0's obj (pickled; the others pass None) on every rank: one broadcast of a CONTROL_BYTES buffer
        when the pickle fits in it, a second one for the rest."""
        if self.world_size == 1:
            return obj
        room = CONTROL_BYTES - 8
        data = pickle.dumps(obj) if self.rank == 0 else b""
        buf = torch.zeros(CONTROL_BYTES, dtype=torch.uint8)
        if self.rank == 0:
            buf[:8] = torch.tensor([len(data)]).view(torch.uint8)
            buf[8:8 + min(len(data), room)] = _as_bytes(data[:room])
        n = int(self._share(buf)[:8].view(torch.int64))
        rest = b""
        if n > room:
            tail = _as_bytes(data[room:]) if self.rank == 0 else torch.empty(n - room, dtype=torch.uint8)
            rest = self._share(tail).numpy().tobytes()
        return obj if self.rank == 0 else pickle.loads(buf[8:8 + min(n, room)].numpy().tobytes() + rest)

    def min_max(self, values: list[int]) -> tuple[list[int], list[int]]:
        """Each value's minimum and maximum over the ranks (two all-reduces on the control group)."""
        lo, hi = torch.tensor(values, dtype=torch.int64), torch.tensor(values, dtype=torch.int64)
        if self.world_size > 1:
            dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=self.control)
            dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=self.control)
        return lo.tolist(), hi.tolist()


_DIST = DistInfo()


def _as_bytes(data: bytes) -> torch.Tensor:
    return torch.frombuffer(bytearray(data), dtype=torch.uint8)


class GroupChannel:
    """Rank 0's messages to the other ranks of a group, over its control group (DistInfo.share_object): rank 0 sends,
    the others receive, in the same order."""

    def __init__(self, info: DistInfo):
        self.info = info

    def send(self, obj: Any) -> None:
        self.info.share_object(obj)

    def recv(self) -> Any:
        return self.info.share_object(None)


def get_dist() -> DistInfo:
    """This process's DistInfo: the group it joined, else single-rank."""
    return _DIST


def set_dist(info: DistInfo) -> None:
    """Record the group this process joined (`init_distributed` and adopting a caller's group do this), or reset
    to single-rank. Raises RuntimeError when a group is already recorded: a process joins one group at a time."""
    global _DIST
    if info.world_size > 1 and _DIST.world_size > 1:
        raise RuntimeError(f"this process is already rank {_DIST.rank} of a {_DIST.world_size}-rank group")
    _DIST = info


def default_backend(device: torch.device) -> str:
    """NCCL for CUDA tensors, gloo for CPU ones."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def init_distributed(world_size: int, rank: int, backend: str | None = None, init_method: str | None = None, *,
                     store: dist.Store | None = None, local_rank: int | None = None,
                     timeout: timedelta | None = None) -> DistInfo:
    """Join a `world_size`-rank group as `rank`: torch.distributed's default process group and this process's
    DistInfo, both at once. Returns the DistInfo (also from `get_dist()`).

    backend: "nccl" or "gloo" (default: nccl when CUDA is available); NCCL ranks use cuda:local_rank (default:
    rank, right on a single node only). Rendezvous through `store` if given, else `init_method` (default
    "env://", as torchrun sets it).
    Raises ValueError for a rank outside [0, world_size), RuntimeError when this process is already in a group.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, {world_size})")
    if dist.is_initialized() or _DIST.world_size > 1:
        raise RuntimeError("torch.distributed is already initialized in this process: call shutdown_distributed() "
                           "before joining another group")
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    local_rank = rank if local_rank is None else local_rank
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    where = {"store": store} if store is not None else {"init_method": init_method or "env://"}
    if backend == "nccl":  # binds the group to this rank's GPU (NCCL would otherwise guess from the global rank)
        where["device_id"] = torch.device("cuda", local_rank)
    dist.init_process_group(backend, rank=rank, world_size=world_size, timeout=timeout, **where)
    return adopt_distributed(local_rank)


def adopt_distributed(local_rank: int) -> DistInfo:
    """Record the default process group (the caller's own, or init_distributed's) as this process's DistInfo, with
    a control group of its own (every rank of the group must call this at the same point)."""
    control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
    info = DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dist.group.WORLD, control)
    set_dist(info)
    return info


def shutdown_distributed() -> None:
    """Leave the group: destroy the default process group (if any) and reset DistInfo to single-rank."""
    global _DIST
    if dist.is_initialized():
        dist.destroy_process_group()
    _DIST = DistInfo()
