"""Tensor parallelism when a worker dies, between steps or in the middle of one: the group stops with an error naming
the rank within seconds, and one-rank LLMs in the same process keep working; a signalled `--tp 2` run exits quietly.
In a module of its own, so it starts only after test_tp.py's groups have closed (a process drives one spawned group
at a time)."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch.distributed as dist
from cli_runs import signal_after_lines
from models import agreeable_checkpoint
from tp_torchrun import GREEDY, PROMPTS

from specdec import LLM, SamplingParams, SpecConfig
from specdec.engine import Engine
from specdec.launcher import FAILURE_REPORT_S, TensorParallelError
from specdec.model.parallel import DistInfo, get_dist

SHAPE = dict(vocab_size=264, num_attention_heads=6, num_key_value_heads=6, n_routed_experts=6,
             moe_intermediate_size=48)


def test_a_dead_worker_stops_the_group(tmp_path: Path) -> None:
    ckpt = agreeable_checkpoint(tmp_path / "ckpt", seed=0, noise=0.14, **SHAPE)
    tp = LLM(ckpt, dtype="float32", speculative=SpecConfig(3, topk=2), tensor_parallel_size=2)
    procs = list(tp.tp.driver.procs)
    it = tp.stream(PROMPTS[0], GREEDY)
    next(it)
    os.kill(procs[0].pid, signal.SIGKILL)
    with pytest.raises(TensorParallelError, match=r"rank 1 died \(exit code -9\) during stream\(\)"):
        list(it)
    with pytest.raises(TensorParallelError, match="group is down"):
        tp.logits(PROMPTS[0])
    assert get_dist() == DistInfo() and not dist.is_initialized()
    single = LLM(ckpt, dtype="float32", speculative=None)
    assert single.generate([PROMPTS[1]], GREEDY)[0].finish_reason == "length"  # one rank still works here


def test_a_worker_that_dies_mid_step_is_named_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker is killed in the middle of rank 0's third verify step (after the verify forward, before the
    step's commit ships): rank 0's next collective fails, and rank 0 raises TensorParallelError naming rank 1 well
    within its wait for the worker's own report (FAILURE_REPORT_S), never a collective's timeout."""
    ckpt = agreeable_checkpoint(tmp_path / "ckpt", seed=0, noise=0.14, **SHAPE)
    tp = LLM(ckpt, dtype="float32", speculative=SpecConfig(3), tensor_parallel_size=2)
    victim, verified, killed = tp.tp.driver.procs[0], Engine.verified, []

    def killing(self: Engine, *args, **kwargs):
        if len(killed) < 3:
            killed.append(time.monotonic())
            if len(killed) == 3:
                os.kill(victim.pid, signal.SIGKILL)
        return verified(self, *args, **kwargs)

    monkeypatch.setattr(Engine, "verified", killing)
    with pytest.raises(TensorParallelError, match=r"rank 1 died \(exit code -9\) during generate\(\)"):
        tp.generate([PROMPTS[0]], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    print(f"raised {time.monotonic() - killed[-1]:.3f} s after the kill")
    assert time.monotonic() - killed[-1] < FAILURE_REPORT_S + 2 and len(killed) == 3
    assert get_dist() == DistInfo() and not dist.is_initialized()


@pytest.fixture(scope="module")
def long_run(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """`generate --tp 2` argv over 12 requests, the last one thousands of tokens long: 11 results come out, then
    it runs until signalled."""
    d = tmp_path_factory.mktemp("signals")
    ckpt = agreeable_checkpoint(d / "ckpt", seed=0, noise=0.14, max_position_embeddings=4096, **SHAPE)
    f = d / "requests.jsonl"
    f.write_text("".join(json.dumps({"prompt_token_ids": [0, 5 + i, 9], "max_tokens": 3000 if i == 11 else 2,
                                     "ignore_eos": True}) + "\n" for i in range(12)))
    return ["generate", "--model", str(ckpt), "--input-file", str(f), "--json", "--no-mtp", "--tp", "2"]


@pytest.mark.parametrize("sig, group, code", [(signal.SIGINT, True, 130), (signal.SIGTERM, False, -signal.SIGTERM)])
def test_a_signalled_tp_run_exits_quietly(long_run: list[str], sig: int, group: bool, code: int) -> None:
    """Ctrl-C (SIGINT to the whole process group, as a terminal sends it) or SIGTERM to rank 0 alone: the run
    stops within seconds, prints nothing on stderr (no worker traceback, no "leaked semaphore" warning from
    multiprocessing's resource tracker), and the 11 results that finished are on stdout."""
    r = signal_after_lines(long_run, 11, sig, group)
    assert r.returncode == code and r.stderr == "", (r.returncode, r.stderr)
    assert r.seconds < 15 and sorted(json.loads(x)["line"] for x in r.stdout) == list(range(1, 12)), r
