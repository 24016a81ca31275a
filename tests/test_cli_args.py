"""Arguments are refused before anything loads (each case names a checkpoint that does not exist, so an argument
checked only after loading would show up as "no checkpoint here" instead), output paths are tried before a run,
and a Ctrl-C between a stream's items stops the stream as one inside it does."""

from __future__ import annotations

from pathlib import Path

import pytest
from cli_errors import one_line_error
from models import agreeable_checkpoint

from specdec.cli import common, main

NO_CKPT = ["--model", "/nonexistent-ckpt"]


@pytest.mark.parametrize("argv, needles", [
    (["bench", "latency", "--runs", "0"], ["--runs", "must be a positive integer, got 0"]),
    (["bench", "latency", "--batch-size", "0"], ["--batch-size", "must be a positive integer"]),
    (["bench", "latency", "--num-iters-warmup", "-1"], ["--num-iters-warmup", "must be an integer >= 0, got -1"]),
    (["bench", "latency", "--num-prompts", "0"], ["--num-prompts", "must be a positive integer"]),
    (["bench", "acceptance", "--batch-size", "-2"], ["--batch-size", "must be a positive integer"]),
    (["bench", "serve", "--num-prompts", "0"], ["--num-prompts", "must be a positive integer"]),
    (["demo", "--max-tokens", "0"], ["--max-tokens", "must be a positive integer"]),
    (["demo", "--num-prompts", "0"], ["--num-prompts", "must be a positive integer"]),
    (["generate", "--prompt", "x", "--threads", "0"], ["--threads", "must be a positive integer"]),
    (["generate", "--prompt", "x", "--tp", "-1"], ["--tp", "must be a positive integer"]),
    (["generate", "--prompt", "x", "--seed", "-1"], ["--seed", "must be an integer >= 0"]),
    (["generate", "--prompt", "x", "--max-tokens", "1.5"], ["--max-tokens", "expected a positive integer, got '1.5'"]),
    (["serve", "--threads", "0"], ["--threads", "must be a positive integer"]),
    (["inspect", "/nonexistent-ckpt", "--tp", "0"], ["--tp", "must be a positive integer"]),
    # relaxed acceptance has no sampling rule: refused with a sampling temperature, from the flags or a JSONL line
    (["generate", "--prompt", "x", "--acceptance", "relaxed", "--temperature", "0.7"],
     ["--acceptance relaxed applies to greedy decoding only: drop --temperature 0.7"]),
    (["bench", "latency", "--acceptance", "relaxed", "--temperature", "1"], ["greedy decoding only"]),
    (["bench", "latency", "--json", "/proc/x.json"], ["--json /proc/x.json: cannot be written"]),
])
def test_refused_before_loading(argv: list[str], needles: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    argv = argv if argv[0] == "inspect" else argv + NO_CKPT
    one_line_error(capsys, argv, *needles)


def test_relaxed_acceptance_with_a_sampling_request(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "r.jsonl"
    f.write_text('{"prompt_token_ids": [0, 5]}\n{"prompt_token_ids": [0, 7], "temperature": 0.5}\n')
    one_line_error(capsys, ["generate", "--input-file", str(f), "--acceptance", "relaxed", *NO_CKPT],
                   f"{f} line 2: relaxed acceptance applies to greedy decoding only", "temperature 0.5")


def test_output_paths_are_tried_and_left_as_they_were(tmp_path: Path) -> None:
    new, old = tmp_path / "new.json", tmp_path / "old.json"
    old.write_text("keep")
    common.check_output(str(new), "--json")
    common.check_output(str(old), "--json")
    assert not new.exists() and old.read_text() == "keep"
    with pytest.raises(ValueError, match="cannot be written"):
        common.check_output("/proc/x.json", "--json")  # /proc takes no new files, whoever asks (root included)


def test_a_ctrl_c_between_items_is_thrown_into_the_stream() -> None:
    """What reaches the stream is the interrupt itself, not the GeneratorExit of a close: a tensor-parallel stream
    that is closed runs its call to the end on every rank; one interrupted stops the group at once."""
    seen: list[type] = []

    def stream():
        try:
            yield 1
            yield 2
        except BaseException as e:
            seen.append(type(e))
            raise

    g = stream()
    with pytest.raises(KeyboardInterrupt), common.interrupts_into(g):
        for _ in g:
            raise KeyboardInterrupt  # as if Ctrl-C landed while the item was printed
    assert seen == [KeyboardInterrupt]
    g = stream()
    with pytest.raises(KeyboardInterrupt), common.interrupts_into(g):
        next(g)
        g.throw(KeyboardInterrupt)  # the interrupt landed inside the stream, which has ended: raised once more
    assert seen == [KeyboardInterrupt, KeyboardInterrupt]


def test_threads_beyond_the_cores_warn_in_one_line(capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ckpt = agreeable_checkpoint(tmp_path / "ckpt")
    f = tmp_path / "one.jsonl"
    f.write_text('{"prompt_token_ids": [0, 5]}\n')
    monkeypatch.setattr("specdec.api.usable_cores", lambda: 1)
    argv = ["generate", "--model", str(ckpt), "--input-file", str(f), "--threads", "1000", "--max-tokens", "2"]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert err == "specdec: warning: threads=1000 exceeds the 1 CPU cores this process may use; using 1\n", err
