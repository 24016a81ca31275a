"""`specdec generate / bench latency / bench acceptance / demo`: output shapes, streaming equal to batch output,
one-line errors for bad flags and malformed JSONL, and the held-out prompt set. Tiny agreeable checkpoints (with a
byte-level BPE tokenizer where text prompts are needed) and a handful of tokens keep it fast."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cli_errors import one_line_error
from cli_runs import signal_after_lines
from models import VOCAB, agreeable_checkpoint, byte_bpe

from specdec.cli import main
from specdec.detokenizer import Detokenizer
from specdec.prompts import HELD_OUT, held_out_prompts


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An agreeable tiny checkpoint with a tokenizer, so text prompts and the built-in prompts work."""
    path = agreeable_checkpoint(tmp_path_factory.mktemp("cli") / "ckpt", vocab_size=VOCAB)
    byte_bpe(held_out_prompts()).save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def ckpt_ids(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Without a tokenizer: prompts must be token ids."""
    return agreeable_checkpoint(tmp_path_factory.mktemp("cli") / "ckpt", seed=3)


def jsonl(path: Path, *lines: str) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


# --- generate ------------------------------------------------------------------------------------------------------

def test_generate_json(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "--model", str(ckpt), "--prompt", "def f(x):\n", "--max-tokens", "6", "--ignore-eos",
                 "--json"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1
    r = json.loads(lines[0])
    assert isinstance(r["text"], str) and len(r["token_ids"]) == 6 and r["finish_reason"] == "length"
    m = r["metrics"]
    assert m["num_generated"] == 6 and len(m["accepted_per_position"]) == 3
    assert {"mean_accepted_length", "acceptance_rate", "first_token_time"} <= set(m)


def test_generate_stream_equals_batch_and_plain(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The streamed text is the batch output's text; greedy MTP and --no-mtp agree; a stats line ends it."""
    base = ["generate", "--model", str(ckpt), "--prompt", "import os\n", "--max-tokens", "12", "--ignore-eos"]
    assert main([*base, "--json"]) == 0
    text = json.loads(capsys.readouterr().out)["text"]
    for extra, tag in (([], "[adaptive MTP k=2 topk=2 budget=3]"), (["--no-mtp"], "[no MTP]")):
        spec = ["--num-speculative-tokens", "2", "--topk", "2", "--num-draft-tokens", "3"] if not extra else extra
        assert main([*base, *spec]) == 0
        out = capsys.readouterr().out
        streamed, stats = out.removesuffix("\n").rsplit("\n", 1)
        assert streamed == text
        assert stats.startswith(tag) and "tokens/s" in stats and "mean accepted length" in stats
        assert ("acceptance rate" in stats) == (not extra)


def test_generate_input_file(ckpt_ids: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = jsonl(tmp_path / "r.jsonl", '{"prompt_token_ids": [0, 5, 9, 200]}', "", '{"prompt_token_ids": [0, 7]}')
    assert main(["generate", "--model", str(ckpt_ids), "--input-file", str(f), "--max-tokens", "4", "--json"]) == 0
    rows = sorted((json.loads(x) for x in capsys.readouterr().out.strip().splitlines()), key=lambda r: r["request_id"])
    assert [(r["request_id"], r["line"]) for r in rows] == [(0, 1), (1, 3)]  # written as they finish, tagged
    assert rows[0]["prompt_token_ids"] == [0, 5, 9, 200] and rows[0]["text"] is None
    assert main(["generate", "--model", str(ckpt_ids), "--input-file", str(f), "--max-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "line 3" in out and "2 requests" in out.splitlines()[-1]


@pytest.mark.parametrize("json_out", [True, False])
def test_ctrl_c_keeps_the_finished_results(json_out: bool, tmp_path: Path) -> None:
    """Each request's result is written as it finishes: Ctrl-C after 11 of 12 keeps those 11 (it used to print
    nothing at all), and exits 130 without a traceback."""
    ckpt = agreeable_checkpoint(tmp_path / "ckpt", seed=3, max_position_embeddings=4096)
    f = jsonl(tmp_path / "r.jsonl", *(json.dumps({"prompt_token_ids": [0, 5 + i], "ignore_eos": True,
                                                  "max_tokens": 4000 if i == 0 else 2}) for i in range(12)))
    argv = ["generate", "--model", str(ckpt), "--input-file", str(f), "--no-mtp", *(["--json"] if json_out else [])]
    r = signal_after_lines(argv, 11 if json_out else 22, signal.SIGINT, group=True)
    assert r.returncode == 130 and r.stderr == "", (r.returncode, r.stderr)
    if json_out:
        assert sorted(json.loads(x)["line"] for x in r.stdout) == list(range(2, 13))
    else:
        heads = [x for x in r.stdout if x.startswith("=== request")]
        assert len(heads) == 11 and len(r.stdout) == 22, r.stdout
        assert not any(x.startswith("=== request 0 ") for x in heads), "request 0 is the one still running"


@pytest.mark.parametrize("lines, needles", [
    (['{"prompt": "a"}', '{"prompt": "b"'], ["line 2", "not valid JSON"]),
    (['{"prompt": "a"}', "", '{"text": "b"}'], ["line 3", "exactly one of"]),
    (['{"prompt": "a", "prompt_token_ids": [1]}'], ["line 1", "exactly one of"]),
    (['["a"]'], ["line 1", "exactly one of"]),
    (['{"prompt_token_ids": [1, "2"]}'], ["line 1", "prompt_token_ids"]),
    (['{"prompt_token_ids": []}'], ["line 1", "prompt_token_ids"]),
    (['{"prompt": ""}'], ["line 1", "non-empty string"]),
    ([""], ["no requests"]),
])
def test_jsonl_errors(lines: list[str], needles: list[str], ckpt_ids: Path, tmp_path: Path,
                      capsys: pytest.CaptureFixture[str]) -> None:
    f = jsonl(tmp_path / "bad.jsonl", *lines)
    one_line_error(capsys, ["generate", "--model", str(ckpt_ids), "--input-file", str(f)], str(f), *needles)


def test_input_errors_after_load(ckpt_ids: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Requests the model cannot take are named by line: text without a tokenizer, ids past the vocabulary."""
    f = jsonl(tmp_path / "r.jsonl", '{"prompt_token_ids": [0, 1]}', '{"prompt_token_ids": [0, 999]}')
    one_line_error(capsys, ["generate", "--model", str(ckpt_ids), "--input-file", str(f)], "line 2", "999")
    f = jsonl(tmp_path / "t.jsonl", '{"prompt": "hello"}')
    one_line_error(capsys, ["generate", "--model", str(ckpt_ids), "--input-file", str(f)], "line 1", "tokenizer")
    one_line_error(capsys, ["bench", "latency", "--model", str(ckpt_ids)], "held-out prompt 0", "tokenizer")


@pytest.mark.parametrize("argv, needle", [
    (["generate", "--prompt", "x", "--input-file", "f"], "not allowed with"),
    (["generate"], "exactly one of --prompt"),
    (["generate", "--prompt", "x", "--bogus"], "unrecognized arguments"),
    (["generate", "--prompt", "x", "--max-tokens", "two"], "--max-tokens: expected a positive integer, got 'two'"),
    (["generate", "--prompt", "x", "--temperature", "-1"], "temperature"),
    (["generate", "--prompt", "x", "--top-p", "0"], "top_p"),
    (["generate", "--prompt", "x", "--topk", "0"], "topk"),
    (["generate", "--prompt", "x", "--num-draft-tokens", "9"], "num_draft_tokens"),
    (["generate", "--input-file", "/nonexistent.jsonl"], "/nonexistent.jsonl"),
    (["generate", "--prompt", "x", "--model", "/nonexistent-ckpt"], "/nonexistent-ckpt"),
    (["bench", "latency", "--json", "/no/such/dir/out.json"], "/no/such/dir"),
    (["bench", "acceptance", "--model", "/nonexistent-ckpt"], "specdec bench acceptance: error"),
    (["demo", "--model", "/nonexistent-ckpt"], "no checkpoint"),
])
def test_argument_errors(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    one_line_error(capsys, argv, needle)


def test_tp_passes_through(ckpt: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    """--tp reaches LLM(tensor_parallel_size=...), which decides what it supports."""
    one_line_error(capsys, ["generate", "--model", str(ckpt), "--prompt", "x", "--tp", "0"], "--tp",
                   "must be a positive integer, got 0")
    seen = {}

    def fake_llm(path: Path, **kw: object) -> None:
        seen.update(kw)
        raise ValueError("stopped")

    monkeypatch.setattr("specdec.cli.common.LLM", fake_llm)
    one_line_error(capsys, ["generate", "--model", str(ckpt), "--prompt", "x", "--tp", "2"], "stopped")
    assert seen["tensor_parallel_size"] == 2


def test_subprocess_error_has_no_traceback(tmp_path: Path) -> None:
    f = jsonl(tmp_path / "bad.jsonl", '{"prompt": "a"}', "{oops")
    r = subprocess.run([sys.executable, "-m", "specdec", "generate", "--input-file", str(f)], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.count("\n") == 1 and "line 2" in r.stderr, r.stderr


# --- bench ---------------------------------------------------------------------------------------------------------

def test_bench_latency_json(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "lat.json"
    assert main(["bench", "latency", "--model", str(ckpt), "--num-prompts", "2", "--max-tokens", "5", "--runs", "2",
                 "--temperature", "0.7", "--json", str(out)]) == 0
    table = capsys.readouterr().out
    assert "adaptive MTP" in table and "fixed MTP" in table and "without MTP" in table and "speedup" in table
    assert "adaptive vs fixed" in table and "median" in table
    r = json.loads(out.read_text())
    assert r["speedup"] > 0 and len(r["speedup_per_run"]) == len(r["adaptive_vs_fixed_per_run"]) == 2
    assert r["adaptive_vs_fixed"] == pytest.approx(r["with_mtp"]["tokens_per_s"] / r["fixed_mtp"]["tokens_per_s"])
    assert r["with_mtp"]["adaptive"] and not r["fixed_mtp"]["adaptive"]
    assert r["mean_accepted_length"] == r["with_mtp"]["mean_accepted_length"] >= 1
    for side in ("with_mtp", "fixed_mtp", "without_mtp"):
        s = r[side]
        assert s["num_requests"] == 4 and s["num_tokens"] == 20  # EOS ignored: exactly --max-tokens each
        assert s["tokens_per_s"] > 0 and s["ms_per_token"] > 0 and s["ttft_ms"] > 0
    assert r["without_mtp"]["mean_accepted_length"] == 1.0 and r["without_mtp"]["acceptance_rate"] is None
    assert len(r["with_mtp"]["acceptance_rate_per_position"]) == 3


def test_bench_acceptance_sweep_json(ckpt_ids: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = jsonl(tmp_path / "r.jsonl", '{"prompt_token_ids": [0, 5, 9, 200, 17]}')
    out = tmp_path / "acc.json"
    assert main(["bench", "acceptance", "--model", str(ckpt_ids), "--input-file", str(f), "--max-tokens", "8",
                 "--sweep", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "draft position" in text and "tokens per verify step" in text and "fastest:" in text
    r = json.loads(out.read_text())
    rates = r["acceptance_rate_per_position"]
    assert len(rates) == 3 and all(0 <= b <= a <= 1 for a, b in zip(rates, rates[1:]))
    hist = r["accepted_length_histogram"]
    assert list(hist) == ["1", "2", "3", "4"] and sum(hist.values()) == r["num_verify_steps"] > 0
    accepted = sum((int(n) - 1) * c for n, c in hist.items())
    assert accepted == round(r["acceptance_rate"] * r["num_drafted"])
    drafts = r["draft_rate_per_position"]  # adaptive: a k=3 chain drafts at most 3 a step, fewer where unlikely
    assert len(drafts) == 3 and r["num_drafted"] == round(sum(drafts) * r["num_verify_steps"])
    assert r["mean_accepted_length"] >= 1
    # the adaptive k=3 chain, no MTP, and 8 fixed shapes (the fixed k=3 chain among them)
    assert len(r["sweep"]) == 10 and sum(not row["mtp"] for row in r["sweep"]) == 1
    assert r["sweep"][0]["adaptive"] and sum(row.get("adaptive", False) for row in r["sweep"]) == 1
    assert "adaptive vs the best fixed shape" in text and "cost model" in text
    assert r["cost_model"]["adaptive"] and r["cost_model"]["buckets"][0]["batch"] == "1"
    assert r["best"]["mtp"] and r["best"]["tokens_per_s"] == max(x["tokens_per_s"] for x in r["sweep"] if x["mtp"])


def test_bench_acceptance_plot(ckpt_ids: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:
    f = jsonl(tmp_path / "r.jsonl", '{"prompt_token_ids": [0, 5, 9]}')
    argv = ["bench", "acceptance", "--model", str(ckpt_ids), "--input-file", str(f), "--max-tokens", "4",
            "--plot", str(tmp_path / "acc.png")]
    with monkeypatch.context() as m:
        m.setitem(sys.modules, "matplotlib", None)  # as if not installed
        one_line_error(capsys, argv, "pip install 'specdec[plot]'")
    pytest.importorskip("matplotlib")
    assert main(argv) == 0
    assert (tmp_path / "acc.png").read_bytes()[:4] == b"\x89PNG"


# --- demo, prompts, detokenizer ------------------------------------------------------------------------------------

def test_demo(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--model", str(ckpt), "--max-tokens", "6", "--num-prompts", "1"]) == 0
    out = capsys.readouterr().out
    assert "glob.py" in out and "identical tokens with and without MTP: yes" in out
    assert "speedup" in out and "mean accepted length" in out


def test_held_out_prompts() -> None:
    a, b = held_out_prompts(17), held_out_prompts(17)
    assert a == b and len(a) == 17 and len(set(a)) == 17
    assert all(199 <= len(p) <= 400 and not p.endswith("\n") for p in a)
    assert len(HELD_OUT) == 15 and a[:15] == held_out_prompts()
    with pytest.raises(ValueError):
        held_out_prompts(0)


def test_detokenizer_holds_back_partial_utf8() -> None:
    tok = byte_bpe(["plain ascii only"])  # so multi-byte characters split over byte tokens
    text = "déjà vu ✓ — naïve 🙂 end"
    ids = tok.encode(text).ids
    d = Detokenizer(tok)
    pieces = [d.push([t]) for t in ids]
    assert "".join(pieces) + d.flush() == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


# --- issue-9 cases: one-line errors, checks before the run, per-request JSONL settings, new flags ---------------

@pytest.mark.parametrize("argv, needle", [
    (["generate", "--prompt", "x", "--max-tok", "3"], "unrecognized arguments: --max-tok"),  # no abbreviations
    (["generate", "--prompt", "x", "--no-mtp", "--topk", "2"], "--no-mtp decodes without drafts: drop --topk"),
    (["generate", "--prompt", "x", "--relaxed-topk", "-1"], "relaxed_topk"),
    (["generate", "--prompt", "x", "--num-speculative-tokens", "0"], "num_speculative_tokens"),
    (["generate", "--prompt", "x\udcff"], "--prompt: not valid UTF-8 text"),
    (["generate", "--prompt", ""], "--prompt: the prompt is empty"),
    (["generate", "--prompt", "x", "--stop-token-ids", "-3"], "stop_token_ids"),
    (["inspect", "tests/data/deepseek-v3-config.json", "--gpu-mem-gb", "inf"], "positive, finite"),
    (["inspect", "tests/data/deepseek-v3-config.json", "--gpu-mem-gb", "nan"], "positive, finite"),
    (["bench", "latency", "--model", "/nonexistent-ckpt", "--json", "/dev/full"], "--json /dev/full: cannot be"),
    (["bench", "latency", "--model", "/nonexistent-ckpt", "--json", "/tmp"], "--json /tmp: is a directory"),
    (["bench", "acceptance", "--model", "/nonexistent-ckpt", "--plot", "x.jpg2"], "unknown format '.jpg2'"),
    (["generate", "--input-file", "tests"], "tests: is a directory"),
])
def test_more_argument_errors(argv: list[str], needle: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Each is refused before any model is loaded (several name a checkpoint that does not exist)."""
    one_line_error(capsys, argv, needle)


def test_model_dependent_errors(ckpt: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one_line_error(capsys, ["generate", "--model", str(ckpt), "--prompt", "x", "--topk", "1000"],
                   "topk 1000 exceeds the vocabulary")
    if not __import__("torch").cuda.is_available():
        one_line_error(capsys, ["generate", "--model", str(ckpt), "--prompt", "x", "--device", "cuda"],
                       "no CUDA device")
    bad = Path(shutil.copytree(ckpt, tmp_path / "badtok"))
    (bad / "tokenizer.json").write_text("not a tokenizer")
    one_line_error(capsys, ["generate", "--model", str(bad), "--prompt", "x"], "not a valid tokenizer.json")


def test_jsonl_per_request_settings_and_encoding(ckpt_ids: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    f = jsonl(tmp_path / "r.jsonl", '{"prompt_token_ids": [0, 5, 9], "max_tokens": 3, "ignore_eos": true}',
              '{"prompt_token_ids": [0, 7], "max_tokens": 6, "temperature": 0.8, "seed": 3, "ignore_eos": true}')
    assert main(["generate", "--model", str(ckpt_ids), "--input-file", str(f), "--json"]) == 0
    rows = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert [len(r["token_ids"]) for r in rows] == [3, 6]
    assert main(["generate", "--model", str(ckpt_ids), "--input-file", str(f), "--json"]) == 0
    again = [json.loads(x) for x in capsys.readouterr().out.strip().splitlines()]
    assert again[1]["token_ids"] == rows[1]["token_ids"], "a seeded request repeats"
    f = jsonl(tmp_path / "k.jsonl", '{"prompt_token_ids": [0, 5], "max_token": 3}')
    one_line_error(capsys, ["generate", "--model", str(ckpt_ids), "--input-file", str(f)], "line 1",
                   "unknown key(s) max_token")
    f = jsonl(tmp_path / "t.jsonl", '{"prompt_token_ids": [0, 5], "temperature": -1}')
    one_line_error(capsys, ["generate", "--model", str(ckpt_ids), "--input-file", str(f)], "line 1", "temperature")
    f = tmp_path / "u.jsonl"
    f.write_bytes(b'{"prompt_token_ids": [0, 5]}\n{"prompt": "\xff"}\n')
    one_line_error(capsys, ["generate", "--model", str(ckpt_ids), "--input-file", str(f)], "line 2",
                   "not valid UTF-8")


def test_stop_strings_and_stop_token_ids(ckpt: Path, capsys: pytest.CaptureFixture[str]) -> None:
    base = ["generate", "--model", str(ckpt), "--prompt", "def f(x):\n", "--max-tokens", "12", "--ignore-eos",
            "--json"]
    assert main(base) == 0
    free = json.loads(capsys.readouterr().out)
    text, ids = free["text"], free["token_ids"]
    stop = text[len(text) // 2:len(text) // 2 + 2]
    assert main([*base, "--stop", stop]) == 0
    cut = json.loads(capsys.readouterr().out)
    assert cut["finish_reason"] == "stop" and cut["stop_reason"] == stop
    assert cut["text"] == text[:text.index(stop)] and ids[:len(cut["token_ids"])] == cut["token_ids"]
    assert main([*base, "--stop-token-ids", str(ids[3])]) == 0
    cut = json.loads(capsys.readouterr().out)
    assert cut["token_ids"] == ids[:ids.index(ids[3]) + 1] and cut["stop_reason"] == ids[3]


def test_version_and_light_import(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("specdec 0.")
    # the console script imports only argparse before main() runs, so Ctrl-C while torch loads lands in main
    r = subprocess.run([sys.executable, "-c", "import sys, specdec.cli; print('torch' in sys.modules)"],
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "False", r.stderr


def test_ctrl_c_while_loading_is_quiet(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    import specdec.cli as cli

    def interrupted() -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "build_parser", interrupted)
    assert cli.main(["generate", "--prompt", "x"]) == 130
    assert capsys.readouterr().err == ""


def test_example_requests_file_parses() -> None:
    from specdec.cli.common import EXAMPLE, read_requests

    reqs = read_requests(Path(__file__).parents[1] / EXAMPLE)
    assert len(reqs) == 5 and any(r.overrides for r in reqs)
    assert any(isinstance(r.prompt, list) for r in reqs) and any(isinstance(r.prompt, str) for r in reqs)
    assert dict(reqs[4].overrides)["logit_bias"] == {13: -100}  # OpenAI's string keys read as token ids
