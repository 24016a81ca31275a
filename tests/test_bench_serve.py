"""`specdec bench serve`: a quick run against a server started in-process, one against a running server
(--base-url), the MTP comparison with its curve, and one-line errors for contradicting flags."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_errors import one_line_error
from models import VOCAB, agreeable_checkpoint, byte_bpe

from specdec import LLM
from specdec.cli import main
from specdec.prompts import held_out_prompts
from specdec.server.app import create_app
from specdec.server.background import BackgroundServer

FIELDS = {"completed", "failed", "duration", "total_input_tokens", "total_output_tokens", "request_throughput",
          "output_throughput", "mean_ttft_ms", "median_ttft_ms", "p99_ttft_ms", "mean_tpot_ms", "median_tpot_ms",
          "p99_tpot_ms", "mean_itl_ms", "median_itl_ms", "p99_itl_ms", "mean_e2el_ms", "spec_decode"}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = agreeable_checkpoint(tmp_path_factory.mktemp("bench_serve") / "ckpt", vocab_size=VOCAB)
    byte_bpe(held_out_prompts()).save(str(path / "tokenizer.json"))
    return path


def _check_run(r: dict, n: int, max_tokens: int, mtp: bool) -> None:
    assert FIELDS <= set(r), FIELDS - set(r)
    assert r["completed"] == n and r["failed"] == 0 and r["errors"] == []
    assert r["total_output_tokens"] == n * max_tokens == r["server_generation_tokens"]
    assert r["output_throughput"] == pytest.approx(r["total_output_tokens"] / r["duration"])
    assert 0 < r["median_ttft_ms"] <= r["p99_ttft_ms"] and 0 < r["mean_tpot_ms"] and 0 < r["mean_itl_ms"]
    s = r["spec_decode"]
    if mtp:
        k = len(s["acceptance_rate_per_position"])
        # adaptive speculation (the default) drafts at most k a step, fewer or none where they would not pay
        assert k == 3 and s["num_drafts"] > 0 and 0 <= s["num_draft_tokens"] <= k * s["num_drafts"]
        assert s["acceptance_length"] == pytest.approx(1 + s["num_accepted_tokens"] / s["num_drafts"])
        assert s["acceptance_rate_per_position"] == sorted(s["acceptance_rate_per_position"], reverse=True)
        # the prefill emits the first token, each verify step 1 + its accepted drafts (the last one cut at max_tokens)
        assert n + s["num_drafts"] <= n * max_tokens <= n + s["num_drafts"] + s["num_accepted_tokens"]
    else:
        assert s["num_drafts"] == 0 and s["acceptance_length"] is None


def test_in_process_run(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "r.json"
    assert main(["bench", "serve", "--model", str(ckpt), "--num-prompts", "18", "--max-tokens", "8",
                 "--max-concurrency", "3", "--request-rate", "50", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    for row in ("successful requests", "output token throughput (tok/s)", "median TTFT (ms)", "p99 TPOT (ms)",
                "mean ITL (ms)", "acceptance length", "acceptance per position", "input tokens from the prefix cache"):
        assert row in text, text
    r = json.loads(out.read_text())
    _check_run(r, 18, 8, mtp=True)
    assert r["spec_decode"]["num_draft_tokens"] > 0  # a fresh engine's first steps sweep the depths ungated
    # the last 3 repeat the first 3 of the 15 held-out prompts: their full blocks come from the prefix cache
    assert 0 < r["total_cached_tokens"] < r["total_input_tokens"] and r["total_cached_tokens"] % 64 == 0
    assert r["max_concurrency"] == 3 and r["request_rate"] == 50


def test_against_a_running_server(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    llm = LLM(ckpt, dtype="float32", speculative=None)
    out = tmp_path / "r.json"
    with BackgroundServer(create_app(llm, "plain")) as s:
        assert main(["bench", "serve", "--base-url", s.base_url, "--num-prompts", "4", "--max-tokens", "6",
                     "--json", str(out)]) == 0
    assert f"against {s.base_url}" in capsys.readouterr().out
    _check_run(json.loads(out.read_text()), 4, 6, mtp=False)


def test_compare_mtp_curve(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("matplotlib")
    out, png = tmp_path / "c.json", tmp_path / "c.png"
    assert main(["bench", "serve", "--model", str(ckpt), "--num-prompts", "4", "--max-tokens", "6", "--compare-mtp",
                 "--concurrency", "1", "2", "--num-warmups", "0", "--json", str(out), "--plot", str(png)]) == 0
    text = capsys.readouterr().out
    assert "MTP tok/s" in text and "fixed tok/s" in text and "MTP drafts/step" in text and "speedup" in text
    c = json.loads(out.read_text())
    assert c["concurrency"] == [1, 2] and len(c["speedup"]) == len(c["fixed_speedup"]) == 2
    for a, f, b, x, y in zip(c["with_mtp"], c["fixed_mtp"], c["without_mtp"], c["speedup"], c["fixed_speedup"]):
        _check_run(a, 4, 6, mtp=True)
        _check_run(f, 4, 6, mtp=True)
        _check_run(b, 4, 6, mtp=False)
        assert x == pytest.approx(a["output_throughput"] / b["output_throughput"])
        assert y == pytest.approx(f["output_throughput"] / b["output_throughput"])
        # the fixed shape (k=3 chain) verifies 3 drafts a step; adaptive at most that
        s = f["spec_decode"]
        assert s["num_draft_tokens"] == 3 * s["num_drafts"]
        assert a["spec_decode"]["num_draft_tokens"] <= 3 * a["spec_decode"]["num_drafts"]
    # adaptive's first level sweeps the depths ungated (its warm-up); at the next, its estimates may say plain steps
    assert c["with_mtp"][0]["spec_decode"]["num_draft_tokens"] > 0
    assert [r["max_concurrency"] for r in c["with_mtp"]] == [1, 2]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("argv, needle", [
    (["--base-url", "http://127.0.0.1:9", "--no-mtp"], "drop --no-mtp"),
    (["--base-url", "http://127.0.0.1:9", "--compare-mtp"], "drop --compare-mtp"),
    (["--base-url", "http://127.0.0.1:9"], "no OpenAI-compatible server answers"),
    (["--plot", "x.png"], "only with --compare-mtp"),
    (["--compare-mtp", "--max-concurrency", "2"], "drop --max-concurrency"),
    (["--compare-mtp", "--concurrency", "0"], "each must be >= 1"),
    (["--request-rate", "0"], "must be > 0"),
])
def test_bad_flags_are_one_line_errors(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    one_line_error(capsys, ["bench", "serve", "--num-prompts", "1", *argv], needle)


def test_shared_prefix_requests(tmp_path: Path) -> None:
    """bench/shared_prefix.py writes requests that share their first characters, readable by --input-file."""
    out = tmp_path / "s.jsonl"
    subprocess.run([sys.executable, "bench/shared_prefix.py", "--out", str(out), "--num-prompts", "3",
                    "--prefix-chars", "500"], check=True, capture_output=True, cwd=Path(__file__).parents[1])
    prompts = [json.loads(line)["prompt"] for line in out.read_text().splitlines()]
    assert len(prompts) == 3 and len({p[:500] for p in prompts}) == 1 and len(set(prompts)) == 3
