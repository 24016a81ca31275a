"""`specdec bench latency`'s floor and op counts: the kernels that ran, the loaded model's resident weight bytes, the
one-core bandwidth and each step's time as a multiple of its weights' read time, in the text and the JSON; with
--profile, the ops of one plain step, one verify step and the drafting. A tiny checkpoint keeps it fast."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from models import agreeable_checkpoint

from specdec import LLM, roofline
from specdec.cli import main
from specdec.cli.bench_latency import format_floor
from specdec.roofline import resident_weight_bytes


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return agreeable_checkpoint(tmp_path_factory.mktemp("bench") / "ckpt", seed=2)


@pytest.fixture(autouse=True)
def small_bandwidth_buffer(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(roofline, "MIN_BUFFER", 2**20)
    monkeypatch.setattr(roofline, "LLC_FACTOR", 0)


def run(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], *flags: str) -> tuple[str, dict]:
    requests = tmp_path / "r.jsonl"
    requests.write_text('{"prompt_token_ids": [0, 5, 9, 200, 17]}\n{"prompt_token_ids": [3, 1, 4, 1, 5, 9]}\n')
    out = tmp_path / "lat.json"
    assert main(["bench", "latency", "--model", str(ckpt), "--input-file", str(requests), "--max-tokens", "6",
                 "--runs", "1", "--num-speculative-tokens", "2", "--json", str(out), *flags]) == 0
    return capsys.readouterr().out, json.loads(out.read_text())


def test_floor_in_text_and_json(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text, r = run(ckpt, tmp_path, capsys)
    k = r["kernels"]
    assert k["backend"] == "torch" and k["custom_ops"] == sorted(k["custom_ops"])
    assert all(op.startswith("specdec.") for op in k["custom_ops"]) and (k["isa"] is None) == (not k["custom_ops"])
    want = resident_weight_bytes(LLM(ckpt, dtype="float32", speculative=None).model)
    assert r["resident_weight_bytes"] == want | {"total": sum(want.values())}
    f = r["floor"]
    assert f["read_bandwidth_gbs"] > 0 and f["bandwidth_buffer_bytes"] == 2**20
    bandwidth = f["read_bandwidth_gbs"] * 1e9
    for part, ms in (("plain", r["without_mtp"]["ms_per_step"]), ("mtp", r["with_mtp"]["ms_per_step"]),
                     ("verify", r["with_mtp"]["verify_ms_per_step"]), ("draft", r["with_mtp"]["draft_ms_per_step"])):
        x = f[part]
        assert x["ms"] == ms and x["floor_ms"] == pytest.approx(1e3 * x["weight_bytes"] / bandwidth)
        assert x["multiple"] == pytest.approx(ms / x["floor_ms"]) and x["weight_bytes"] > 0, part
    assert f["mtp"]["weight_bytes"] == f["verify"]["weight_bytes"] + f["draft"]["weight_bytes"]
    assert f["plain"]["weight_bytes"] < r["resident_weight_bytes"]["total"]
    assert "steps" not in r and "ops of one decode step" not in text
    for line in ("kernels: torch backend", "resident weights: ", "floor: one core reads ", "plain step", "MTP step",
                 "  verify", "  drafting"):
        assert line in text, line
    assert f"{f['plain']['multiple']:.1f}x" in text


def test_profile_prints_and_writes_op_counts(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text, r = run(ckpt, tmp_path, capsys, "--profile")
    layers = LLM(ckpt, dtype="float32", speculative=None).config.num_hidden_layers
    s = r["steps"]
    assert (s["plain"]["layers"], s["plain"]["tokens"]) == (layers, 1)
    assert (s["verify"]["layers"], s["verify"]["tokens"]) == (layers, 3)  # chain k=2: root + 2 drafts
    assert s["draft"]["layers"] == 2 and s["draft"]["tokens"] is None  # the MTP extend, then one chain step
    for step in s.values():
        top = list(step["top_ops"].values())
        assert top == sorted(top, reverse=True) and sum(top) <= step["ops"]
        assert step["ops_per_layer"] == pytest.approx(step["ops"] / step["layers"])
    assert s["verify"]["ops_per_token_layer"] == pytest.approx(s["verify"]["ops"] / (3 * layers))
    assert s["plain"]["weight_bytes"] == r["floor"]["plain"]["weight_bytes"]
    for line in ("ops of one decode step", "plain step", "verify step", "drafting", "top ops, plain step: "):
        assert line in text, line


def test_floor_text_without_a_floor() -> None:
    r = {"kernels": {"backend": "triton", "custom_ops": [], "isa": None},
         "resident_weight_bytes": {"bfloat16": 3_000_000, "float8_e4m3fn": 9_000_000, "total": 12_000_000},
         "floor": None}
    assert format_floor(r).splitlines() == [
        "kernels: triton backend", "resident weights: 12.0 MB (float8_e4m3fn 9.0, bfloat16 3.0)",
        "floor: measured on a CPU with the torch backend only (Triton kernels read weights unseen by the dispatcher)"]
