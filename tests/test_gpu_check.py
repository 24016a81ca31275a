"""bench/gpu_check.py --smoke: every section at tiny shapes on the CPU (Triton's interpreter), one JSON report; the
graphs section runs the padded graph path (capture skipped) under the host-read guard."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from _interp import DEVICE  # sets TRITON_INTERPRET=1 without a GPU

pytestmark = [pytest.mark.interpreter, pytest.mark.gpu_scripts]


def test_gpu_check_smoke(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = Path(__file__).parents[1] / "bench" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    check = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, check)
    spec.loader.exec_module(check)
    out = tmp_path / "check.json"
    assert check.main(["--smoke", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["ok"] and not report["skipped"]
    assert set(report["sections"]) == {"kernels", "gemm", "mla", "model", "graphs"}
    rows = [r for k in ("kernels", "gemm", "mla") for r in report["sections"][k]]
    assert {"weight_dequant", "act_quant", "fp8_gemm", "moe", "mla"} <= {r["kernel"] for r in rows}
    assert all(r["ok"] and r["GB/s"] is not None for r in rows)
    run = report["sections"]["model"]["runs"]["triton"]
    assert run["lossless"] and run["plain"]["tokens"] == run["mtp"]["tokens"] and run["adjusted_lossless"]
    assert [len(t) for t in run["plain"]["tokens"]] == [4, 4] and run["mtp"]["steps"] >= 1
    assert (run["plain"]["syncs"] is None) == (DEVICE.type != "cuda"), "syncs are counted on CUDA only"
    graphs = report["sections"]["graphs"]
    assert graphs["equal"] and [b["batch"] for b in graphs["batches"]] == [3]
    plain, mtp = graphs["batches"][0]["plain"], graphs["batches"][0]["mtp"]
    assert plain["equal"] and mtp["equal"] and plain["graphs"]["tokens_per_s"] > 0 < plain["eager"]["tokens_per_s"]
    assert plain["graphs"]["replays"]["main seqs=4 n=1"] >= 1, "three requests pad to the bucket of four"
    replays = mtp["graphs"]["replays"]
    assert replays["main seqs=4 n=4"] >= 1 and replays["mtp0 seqs=4 n=1"] >= 1, replays  # verify k=3, draft steps
