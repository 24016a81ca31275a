"""Triton FP8 kernels (act_quant, weight_dequant, fp8_gemm) against their plain-torch references."""

from __future__ import annotations

import pytest
import torch
from _interp import DEVICE, poisoned, rel, wide_rows

from specdec.kernels import fp8

pytestmark = pytest.mark.interpreter


def _randn(g: torch.Generator, *shape: int, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, generator=g) * scale).to(DEVICE)


@pytest.mark.parametrize("m,k,block", [(1, 128, 128), (5, 200, 128), (19, 96, 32)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_act_quant_matches_reference_bitwise(seed: int, m: int, k: int, block: int, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(seed)
    # rows of very different magnitude, one all-zero row: scales span decades and hit the clamp_min
    x = (_randn(g, m, k) * torch.logspace(-3, 3, m, device=DEVICE)[:, None]).to(dtype)
    x[m // 2] = 0
    with poisoned():
        q, s = fp8.act_quant(x, block)
    q_ref, s_ref = fp8.act_quant_ref(x, block)
    assert q.dtype == fp8.FP8 and s.shape == s_ref.shape
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0, msg=f"seed {seed}")
    assert torch.equal(q.float(), q_ref.float()), f"seed {seed}: {(q.float() != q_ref.float()).sum()} codes differ"


@pytest.mark.parametrize("n,k,bn,bk", [(200, 130, 128, 128), (48, 80, 32, 32), (16, 16, 16, 16)])
def test_weight_dequant_partial_blocks(seed: int, n: int, k: int, bn: int, bk: int) -> None:
    g = torch.Generator().manual_seed(seed)
    w, s = fp8.weight_quant_ref(_randn(g, n, k), bn, bk)
    with poisoned():
        y = fp8.weight_dequant(w, s, bn, bk)
        y16 = fp8.weight_dequant(w, s, bn, bk, dtype=torch.bfloat16)
    assert torch.equal(y, fp8.weight_dequant_ref(w, s, bn, bk)), f"seed {seed}"
    assert y16.dtype == torch.bfloat16
    assert rel(y16, y) < 8e-3, f"seed {seed}"  # within one bf16 ulp (the interpreter truncates, GPUs round)


def test_weight_dequant_rejects_wrong_scale_grid() -> None:
    w = torch.zeros(64, 64, dtype=fp8.FP8, device=DEVICE)
    with pytest.raises(ValueError, match="scale shape"):
        fp8.weight_dequant(w, torch.ones(1, 1, device=DEVICE), 32, 32)


@pytest.mark.parametrize("m,n,k,bn,bk", [(1, 48, 64, 32, 32), (5, 200, 300, 128, 128), (37, 80, 96, 32, 32)])
def test_fp8_gemm(seed: int, m: int, n: int, k: int, bn: int, bk: int) -> None:
    g = torch.Generator().manual_seed(seed)
    a, w = _randn(g, m, k), _randn(g, n, k, scale=0.1)
    aq, a_s = fp8.act_quant_ref(a, bk)
    wq, w_s = fp8.weight_quant_ref(w, bn, bk)
    with poisoned():
        c = fp8.fp8_gemm(aq, a_s, wq, w_s, bn, bk)
        c16 = fp8.fp8_gemm(aq, a_s, wq, w_s, bn, bk, out_dtype=torch.bfloat16)
    ref = fp8.fp8_gemm_ref(aq, a_s, wq, w_s, bn, bk)
    assert c.shape == (m, n) and c16.dtype == torch.bfloat16
    assert rel(c, ref) < 1e-5, f"seed {seed}: same quantized inputs"
    assert rel(c16, ref) < 8e-3, f"seed {seed}: bf16 output"
    assert rel(c, a @ w.T) < 6e-2, f"seed {seed}: vs the unquantized product"


def test_fp8_gemm_checks_inputs() -> None:
    a = torch.zeros(4, 48, dtype=fp8.FP8, device=DEVICE)
    with pytest.raises(ValueError, match="multiple of 32"):  # an FP8 tl.dot on sm_90 needs K >= 32
        fp8.fp8_gemm(a, torch.ones(4, 3, device=DEVICE), a, torch.ones(1, 3, device=DEVICE), 16, 16)
    with pytest.raises(ValueError, match="do not fit"):
        fp8.fp8_gemm(a, torch.ones(4, 1, device=DEVICE), a, torch.ones(1, 2, device=DEVICE), 32, 32)
    with pytest.raises(ValueError, match="float8"):
        fp8.fp8_gemm(a.float(), torch.ones(4, 2, device=DEVICE), a, torch.ones(1, 2, device=DEVICE), 32, 32)


def test_act_quant_row_offsets_past_int32(seed: int) -> None:
    """Row 2 of x starts 2^31 + 128 elements in: an int32 rows * stride would read the wrong row."""
    g = torch.Generator().manual_seed(seed)
    x = wide_rows(3, 128, torch.bfloat16)
    x.copy_(_randn(g, 3, 128).bfloat16())
    q, s = fp8.act_quant(x, 128)
    q_ref, s_ref = fp8.act_quant_ref(x.clone(), 128)
    assert torch.equal(s, s_ref), f"seed {seed}: scales {s.tolist()} vs {s_ref.tolist()}"
    assert torch.equal(q.float(), q_ref.float()), f"seed {seed}"


def test_fp8_gemm_row_offsets_past_int32(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    aq, a_s = fp8.act_quant_ref(_randn(g, 3, 64), 32)
    a = wide_rows(3, 64, fp8.FP8)
    a.copy_(aq)
    wq, w_s = fp8.weight_quant_ref(_randn(g, 48, 64, scale=0.1), 32, 32)
    c = fp8.fp8_gemm(a, a_s, wq, w_s, 32, 32)
    assert rel(c, fp8.fp8_gemm_ref(aq, a_s, wq, w_s, 32, 32)) < 1e-5, f"seed {seed}"
