"""The sm_90 compile check (python -m specdec.kernels.aot): every kernel at its launcher's block sizes for
DeepSeek-V3's shapes, compiled ahead of time by Triton's own ptxas without a GPU. Runs in subprocesses: the check
needs a process where triton was imported without TRITON_INTERPRET=1."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

KERNELS = ["act_quant_kernel", "weight_dequant_kernel", "fp8_gemm_kernel", "moe_gate_up_kernel", "moe_down_kernel",
           "mla_kernel", "mla_merge_kernel"]


def _python(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=timeout)


def _report(p: subprocess.CompletedProcess) -> str:
    return f"exit {p.returncode}\n{p.stdout}\n{p.stderr[-3000:]}"


@pytest.mark.gpu_scripts
def test_every_kernel_compiles_for_sm90() -> None:
    p = _python("-m", "specdec.kernels.aot", "--arch", "90")
    print(p.stdout)  # the variant table, for `pytest -s`
    assert p.returncode == 0 and "all required variants compile" in p.stdout, _report(p)
    ok = {line.split()[1] for line in p.stdout.splitlines() if line.strip().startswith("ok")}
    assert set(KERNELS) <= ok, _report(p)
    assert "FAIL" not in p.stdout


def test_the_cases_cover_both_splits_and_dtypes() -> None:
    from specdec.kernels.aot import cases
    from specdec.kernels.warmup import Dequant, Gemm, Mla, Moe

    got = cases(90)
    names = {f"{c} {d}" for c, d in got}
    for what in ("H=16", "H=128", "E=32/256", "E=256/256", "float32", "plain", "tree", "captured"):  # TP=8 and
        assert any(what in n for n in names), f"no {what} case"  # TP=1, fp32 MLA, BF16 MoE, trees, CUDA graphs
    assert {type(c) for c, _ in got} == {Gemm, Moe, Mla, Dequant}
    assert not any(isinstance(c, (Gemm, Dequant)) or (isinstance(c, Moe) and c.block) for c, _ in cases(80)), \
        "no FP8 on sm_80"


def test_the_check_fails_on_compile_errors_and_shared_memory() -> None:
    """An FP8 dot with K = 16 (what gemm_block_k used to allow: the interpreter runs it, sm_90 does not) and a
    shared-memory limit below act_quant's 32 bytes must both fail the check."""
    code = """
import sys
from specdec.kernels import aot, fp8
from specdec.kernels.warmup import Gemm
fp8.gemm_block_k = lambda block_k: 16
aot.cases = lambda arch: [(Gemm(4, 64, 64, (16, 16)), aot.torch.bfloat16)]
aot.SHARED_LIMIT[90] = 16
sys.exit(aot.check(90))
"""
    p = _python("-c", code)
    assert p.returncode == 2, _report(p)
    fails = [line for line in p.stdout.splitlines() if line.strip().startswith("FAIL")]
    assert any("fp8_gemm_kernel" in line and "K >= 32" in line for line in fails), _report(p)
    assert any("act_quant_kernel" in line and "shared     32 B" in line for line in fails), _report(p)


@pytest.mark.slow
@pytest.mark.parametrize("args", [["--arch", "90", "--alternatives"], ["--arch", "80"]])
def test_alternatives_and_sm80(args: list[str]) -> None:
    """The autotuner's other candidates (reported, may fail) and the sm_80 BF16 fallback (must compile)."""
    p = _python("-m", "specdec.kernels.aot", *args)
    print(p.stdout)
    assert p.returncode == 0 and "all required variants compile" in p.stdout, _report(p)
    if "80" in args:
        assert "fp8" not in p.stdout.replace("fp8_linear", ""), "no FP8 kernel on sm_80"
