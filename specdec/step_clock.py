"""Phase timings for the engine's decode steps that never add a host sync."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .outputs import Metrics


class StepClock:
    """Phase timings that never add a host sync: perf_counter on a CPU; on CUDA, events whose durations are read
    at the step's next sync (`synced`), so a phase's time is its GPU time, not the time to launch it."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._pending: list[tuple[Callable[[list[float]], None], Sequence[Any]]] = []

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def then(self, fn: Callable[[list[float]], None], marks: Sequence[Any]) -> None:
        """Call fn with the seconds between consecutive marks: now on a CPU; on CUDA at the first sync after the
        last mark has completed."""
        if self.cuda:
            self._pending.append((fn, marks))
        else:
            fn([b - a for a, b in zip(marks, marks[1:])])

    def add(self, metrics: list[Metrics], field: str, start: Any, end: Any) -> None:
        """Add the time from start to end to every metrics' `field` (now on a CPU; at the next sync on CUDA)."""
        def add(dt: list[float]) -> None:
            for m in metrics:
                setattr(m, field, getattr(m, field) + dt[0])

        self.then(add, (start, end))

    def synced(self) -> None:
        """The device is idle up to here: resolve every pending duration whose end event has completed."""
        keep = []
        for fn, marks in self._pending:
            if not marks[-1].query():
                keep.append((fn, marks))
                continue
            fn([a.elapsed_time(b) / 1e3 for a, b in zip(marks, marks[1:])])
        self._pending = keep
