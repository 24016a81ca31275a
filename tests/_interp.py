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
