"""Kernel launch plumbing (kernels/triton_util.py): the CUDA device guard, device checks, compile-only launches."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
from _interp import DEVICE
from torch._subclasses.fake_tensor import FakeTensorMode

from specdec.kernels import triton_util
from specdec.kernels.triton_util import LazyKernel, check_device, compile_only, sm_count


class _Recorder:
    """Stands for a compiled kernel: records the CUDA device that is current when it is launched."""

    def __init__(self, current: list[int]):
        self.current, self.launched_on = current, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launched_on.append(self.current[-1])


def test_launch_runs_on_the_tensors_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """Triton launches on the current CUDA device; a launch must make its tensors' device current first."""
    current = [0]  # a stack of current devices, 0 outside any guard

    @contextmanager
    def device(d):
        current.append(torch.device(d).index)
        yield
        current.pop()

    monkeypatch.setattr(torch.cuda, "device", device)
    lk = LazyKernel(lambda: None, None, (), None)
    lk._kernel = _Recorder(current)
    with FakeTensorMode():
        x = torch.empty(4, device="cuda:1")  # a CUDA tensor without a GPU
    lk[(1,)](x, 4, BLOCK=8)
    assert lk._kernel.launched_on == [1]


def test_check_device() -> None:
    with FakeTensorMode():
        a, b = torch.empty(1, device="cuda:0"), torch.empty(1, device="cuda:1")
    with pytest.raises(ValueError, match="one device"):
        check_device(a, b)
    check_device(torch.zeros(1, device=DEVICE))
    with pytest.raises(ValueError, match="need CUDA tensors"):
        check_device(torch.zeros(1, device="meta"))  # meta only under compile_only
    with compile_only(lambda *a: None, sms=7):
        check_device(torch.zeros(1, device="meta"))


def test_compile_only_hands_launches_to_the_hook() -> None:
    seen = []
    lk = LazyKernel(lambda: None, None, (), None)  # never bound: the hook runs instead of the kernel
    with compile_only(lambda kernel, args, kwargs: seen.append((kernel, args, kwargs)), sms=132):
        lk[(1,)](torch.zeros(2, device="meta"), 5, BLOCK=16)
        assert sm_count(torch.device("meta")) == 132
    assert [(k, a[1], kw) for k, a, kw in seen] == [(lk, 5, {"BLOCK": 16})]
    assert triton_util._compile_hook is None and sm_count(torch.device("meta")) == 1
