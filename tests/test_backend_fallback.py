"""Backend.resolve on GPUs with and without FP8 (no GPU needed: the device queries are stubbed)."""

from __future__ import annotations

import warnings

import pytest
import torch
from _interp import DEVICE, rel

from specdec.kernels.backend import Backend
from specdec.kernels.fp8 import weight_quant_ref

CUDA = torch.device("cuda")


def _gpu(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], name: str) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)


@pytest.mark.parametrize("name", ["auto", "triton"])
def test_gpu_without_fp8_gets_bf16_weights(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    _gpu(monkeypatch, (8, 0), "NVIDIA A100-SXM4-80GB")
    with pytest.warns(UserWarning, match="A100.*no FP8") as notice:
        b = Backend.resolve(name, CUDA)
    assert len(notice) == 1 and "\n" not in str(notice[0].message), "one one-line notice"
    assert (b.name, b.fp8, b.keep_fp8) == ("triton", False, False)


@pytest.mark.parametrize("capability", [(8, 9), (9, 0), (10, 0)])
def test_fp8_gpus_keep_fp8_weights(monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int]) -> None:
    _gpu(monkeypatch, capability, "some GPU")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = Backend.resolve("triton", CUDA)
        assert Backend.resolve("torch", CUDA).keep_fp8 is False, "the torch backend dequantizes at load"
    assert b.fp8 and b.keep_fp8


def test_without_fp8_linears_dequantize(seed: int) -> None:
    """Should an FP8 weight reach a non-FP8 backend, fp8_linear dequantizes it (the torch path) and moe refuses."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 64, generator=g).to(DEVICE)
    w, s = weight_quant_ref(torch.randn(32, 64, generator=g).to(DEVICE), 32, 32)
    y = Backend("triton", fp8=False).fp8_linear(x, w, s, (32, 32))
    assert rel(y, Backend("torch").fp8_linear(x, w, s, (32, 32))) == 0.0, f"seed {seed}"
    with pytest.raises(ValueError, match="without FP8"):
        Backend("triton", fp8=False).moe(x, torch.zeros(3, 1, dtype=torch.long, device=DEVICE),
                                         torch.ones(3, 1, device=DEVICE), w[None], w.T[None], s[None], s[None],
                                         (32, 32))
