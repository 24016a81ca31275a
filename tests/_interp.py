"""Shared by the Triton kernel tests: interpreter on CPU, poisoned allocations, relative error.

Importing this module sets TRITON_INTERPRET=1 when there is no GPU. specdec imports triton only at a kernel's first
launch (kernels/triton_util.py), so importing this before or after specdec both work, as long as nothing in the
process has imported triton itself before.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


@contextmanager
def poisoned() -> Iterator[None]:
    """Every torch.empty inside the block comes back NaN-filled (floats) so a kernel that skips an element of its
    output or of a scratch buffer it reads shows up as NaN."""
    real = torch.empty

    def empty(*args, **kwargs):
        t = real(*args, **kwargs)
        if t.dtype.is_floating_point:
            t.fill_(float("nan"))
        return t

    with mock.patch.object(torch, "empty", empty):
        yield


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| in float64 (NaN anywhere gives NaN)."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def wide_rows(rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
    """A [rows, cols] view (rows >= 3) whose row stride, 2^30 + 64 elements, puts row 2 past 2^31 elements: a kernel
    that multiplies row * stride in int32 wraps there. The buffer also spans the 2^31 elements before the view, so
    a wrapped offset reads the wrong (untouched, zero) memory instead of faulting. Reserves 4-8 GiB of virtual memory
    (CPU) but touches only rows x cols elements; on a GPU the memory is real."""
    stride, before = 2**30 + 64, 2**31
    n = before + (rows - 1) * stride + cols
    nbytes = n * torch.empty(0, dtype=dtype).element_size()
    try:
        buf = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    except (RuntimeError, MemoryError) as e:
        pytest.skip(f"cannot reserve {nbytes / 2**30:.0f} GiB for a wide-stride view: {e}")
    return buf.view(dtype).as_strided((rows, cols), (stride, 1), before)
