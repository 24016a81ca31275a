"""bench/kernel_bench.py --smoke: every kernel group at tiny shapes (the interpreter without a GPU), table last."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from _interp import DEVICE  # noqa: F401  (sets TRITON_INTERPRET=1 without a GPU)

pytestmark = pytest.mark.interpreter


def test_bench_smoke(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    path = Path(__file__).parents[1] / "bench" / "kernel_bench.py"
    spec = importlib.util.spec_from_file_location("bench_kernels", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up
    spec.loader.exec_module(bench)
    assert bench.main(["--smoke"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    kernels = {line.split()[0] for line in lines[-10:]}
    assert {"fp8_gemm", "act_quant", "weight_dequant", "moe", "mla"} <= kernels, "the table comes last"
    assert not any(" FAIL" in line for line in lines)
