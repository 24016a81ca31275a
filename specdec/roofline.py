"""The floor a CPU decode step is judged by: the time its weights take to read at one core's memory bandwidth.

`read_bandwidth` measures this machine's one-thread read bandwidth (the best of a few float32 sums over a buffer
much larger than the last-level cache). `weight_tensors` lists what a loaded model holds as weights, one tensor per
storage, and `resident_weight_bytes` sums them by dtype: float32, BF16 and FP8 count as held. The bytes a step reads
are observed by profiling.py; `step_floor` puts a step's time beside their read time, as a multiple.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

MIN_BUFFER = 256 * 2**20  # the bandwidth buffer: at least this, and LLC_FACTOR x the last-level cache
LLC_FACTOR = 8
REPEATS = 10  # timed sums; the fastest counts (more tries find a quiet moment on a busy machine)
CACHE_DIR = Path("/sys/devices/system/cpu/cpu0/cache")


def last_level_cache_bytes() -> int | None:
    """The largest cache cpu0 reports (Linux sysfs), in bytes; None where it says nothing."""
    sizes = {}
    for index in CACHE_DIR.glob("index*"):
        try:
            level, size = (index / "level").read_text().strip(), (index / "size").read_text().strip()
        except OSError:
            continue
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(size[-1:], 1)
        sizes[int(level)] = int(size.rstrip("KMG")) * scale
    return sizes[max(sizes)] if sizes else None


def read_bandwidth(repeats: int = REPEATS) -> tuple[float, int]:
    """(bytes/s, buffer bytes): one thread summing a float32 buffer of max(MIN_BUFFER, LLC_FACTOR x the last-level
    cache), the fastest of `repeats` sums after one untimed. torch's thread count is 1 meanwhile and restored after."""
    nbytes = max(MIN_BUFFER, LLC_FACTOR * (last_level_cache_bytes() or 0))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        buf = torch.ones(nbytes // 4)  # written once, so every page is resident before the timed reads
        buf.sum()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            buf.sum()
            best = min(best, time.perf_counter() - t0)
    finally:
        torch.set_num_threads(threads)
    return nbytes / best, nbytes


def storage_key(t: torch.Tensor) -> int:
    """What identifies a tensor's memory: its storage's address (views and shared parameters share it)."""
    return t.untyped_storage().data_ptr()


def weight_tensors(model: nn.Module) -> dict[int, torch.Tensor]:
    """storage_key -> one tensor on each storage that holds weights: parameters, persistent buffers, and tensors a
    module keeps as attributes (weights laid out again at load: fused projections, MLA's absorbed products).
    Non-persistent buffers (RoPE tables, norm constants) are derived from the config, not weights; empty
    storages are left out."""
    out: dict[int, torch.Tensor] = {}
    for m in model.modules():
        held = [*m._parameters.values(), *vars(m).values(),
                *(b for n, b in m._buffers.items() if n not in m._non_persistent_buffers_set)]
        for t in held:
            if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                out.setdefault(storage_key(t), t)
    return out


def resident_weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes the model's weights occupy, by dtype ("float32", "bfloat16", "float8_e4m3fn", ...), each storage
    counted once however many tensors share it."""
    out: dict[str, int] = {}
    for t in weight_tensors(model).values():
        name = str(t.dtype).removeprefix("torch.")
        out[name] = out.get(name, 0) + t.untyped_storage().nbytes()
    return out


def step_floor(ms: float | None, nbytes: int, bandwidth: float) -> dict[str, float | int | None]:
    """A step of `ms` milliseconds (None: not measured) that reads nbytes of weights: {"weight_bytes", "floor_ms"
    (their read time at bandwidth bytes/s), "ms", "multiple" (ms / floor_ms)}."""
    floor = 1e3 * nbytes / bandwidth
    return {"weight_bytes": nbytes, "floor_ms": floor, "ms": ms,
            "multiple": ms / floor if ms is not None and floor else None}
