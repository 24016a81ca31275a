"""Phase timings for the engine's decode steps that never add a host sync."""

from __future__ import annotations

import time
from typing import Any

import torch

from .outputs import Metrics


class StepClock:
    """Phase timings that never add a host sync: perf_counter on a CPU; on CUDA, events whose durations are read
    at the step's next sync (`synced`), so a phase's time is its GPU time, not the time to launch it."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._pending: list[tuple[list[Metrics], str, Any, Any]] = []

    def mark(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def add(self, metrics: list[Metrics], field: str, start: Any, end: Any) -> None:
        """Add the time from start to end to every metrics' `field` (now on a CPU; at the next sync on CUDA)."""
        if self.cuda:
            self._pending.append((metrics, field, start, end))
        else:
            for m in metrics:
                setattr(m, field, getattr(m, field) + end - start)

    def synced(self) -> None:
        """The device is idle up to here: resolve every pending duration whose end event has completed."""
        keep = []
        for metrics, field, start, end in self._pending:
            if not end.query():
                keep.append((metrics, field, start, end))
                continue
            dt = start.elapsed_time(end) / 1e3
            for m in metrics:
                setattr(m, field, getattr(m, field) + dt)
        self._pending = keep
