"""The caller's side of a request (request_state.py): text and stop strings are made outside the engine lock; a
stop string cuts the output after the token whose text completed it, even inside an accepted run or when the
engine ran on meanwhile, and ends the request in the engine before the caller sees the end."""

from __future__ import annotations

import dataclasses
import queue
import random
import time
from pathlib import Path

import pytest
from models import VOCAB, agreeable_checkpoint, byte_bpe

from specdec import LLM, SamplingParams, SpecConfig
from specdec.detokenizer import TextTracker
from specdec.prompts import held_out_prompts
from specdec.request_state import RequestState
from specdec.server.loop import EngineLoop, Job, Update

PROMPT = "def f(x):\n"
FREE = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=1)


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    path = agreeable_checkpoint(tmp_path_factory.mktemp("stops"), vocab_size=VOCAB, seed=1, noise=0.14)
    byte_bpe(held_out_prompts()).save(str(Path(path) / "tokenizer.json"))
    # a fixed shape: the tests compare logprobs of two runs exactly, and a token's logprobs differ in the last bits
    # with the verify step's shape (adaptive speculation picks shapes from timings)
    return LLM(path, dtype="float32", speculative=SpecConfig(3, adaptive=False))


def _stops(text: str, seed: int, n: int = 4, end: int | None = None) -> list[str]:
    """n two-character stop strings from text[:end], at random places (printable ASCII: the tiny model also writes
    bytes that render as U+FFFD)."""
    end = len(text) if end is None else end
    ok = [i for i in range(1, end - 1) if all(c.isascii() and c.isprintable() for c in text[i:i + 2])]
    assert len(ok) >= 2 * n, text
    rng = random.Random(seed)
    return [text[i:i + 2] for i in rng.sample(ok, n)]


def test_a_stop_string_cuts_tokens_text_logprobs_and_counts(llm: LLM, seed: int) -> None:
    free = llm.generate([PROMPT], FREE)[0]
    assert free.metrics.num_accepted > 0, "no draft accepted: a stop never lands inside an accepted run"
    for stop in _stops(free.text, seed):
        out = llm.generate([PROMPT], dataclasses.replace(FREE, stop=[stop]))[0]
        n = len(out.token_ids)
        assert out.finish_reason == "stop" and out.stop_reason == stop, f"seed={seed} stop={stop!r}"
        assert out.text == free.text[:free.text.index(stop)], f"seed={seed} stop={stop!r}"
        assert out.token_ids == free.token_ids[:n], f"seed={seed} stop={stop!r}"
        decode = llm.tokenizer.decode
        assert stop in decode(out.token_ids) and stop not in decode(out.token_ids[:-1]), f"seed={seed} {stop!r}"
        assert out.logprobs == free.logprobs[:n] and out.metrics.num_generated == n, f"seed={seed} stop={stop!r}"
        assert llm.engine.stats().running == 0 and llm.engine.pool.usage() == 0


def test_the_text_is_made_outside_the_engine_lock(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    held: list[bool] = []
    push = TextTracker.push

    def spy(self: TextTracker, token: int) -> str:
        held.append(llm.engine.lock._is_owned())
        return push(self, token)

    monkeypatch.setattr(TextTracker, "push", spy)
    llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert held and not any(held)


def test_a_stop_string_ends_the_request_before_the_caller_sees_the_end(llm: LLM, seed: int) -> None:
    free = llm.generate([PROMPT], FREE)[0]
    stop = _stops(free.text, seed, 1)[0]
    steps = []
    for step in llm.stream_steps(PROMPT, dataclasses.replace(FREE, stop=[stop])):
        steps.append(step)
        if step.finished:  # its blocks are back before the caller sees its last step
            assert llm.engine.stats().running == 0 and llm.engine.pool.usage() == 0, f"seed={seed} {stop!r}"
    assert steps[-1].finished and "".join(s.text for s in steps) == free.text[:free.text.index(stop)]


def test_tokens_the_engine_emitted_past_the_stop_are_dropped(llm: LLM, seed: int) -> None:
    """Another thread may step the engine before this caller takes its outputs: the output still ends at the
    stop string, the counts with it, and the engine runs the request until the caller aborts it."""
    free = llm.generate([PROMPT], FREE)[0]
    stop = _stops(free.text, seed, 1, end=len(free.text) // 2)[0]
    e = llm.engine
    params = dataclasses.replace(FREE, stop=[stop], max_tokens=FREE.max_tokens + 8)  # never ends by length here
    r = RequestState(e.add(llm.encode(PROMPT), params), llm.tokenizer, e.lock)
    cut = next(n for n in range(len(free.token_ids) + 1) if stop in llm.tokenizer.decode(free.token_ids[:n]))
    while len(r.request.generated) < cut + 2:
        e.step()  # nobody takes: the engine runs on past the stop string
    outs = r.take()
    n = len(r.generated)
    assert r.finish_reason == "stop" and r.stop_reason == stop and len(r.request.generated) > n, f"seed={seed}"
    assert [t for o in outs for t in o.token_ids] == r.generated == free.token_ids[:n], f"seed={seed} {stop!r}"
    assert r.logprobs == free.logprobs[:n] and r.metrics.num_generated == n, f"seed={seed} {stop!r}"
    assert r.needs_abort and not r.take()
    e.abort(r.request)
    assert not r.needs_abort and e.pool.usage() == 0 and r.finish_reason == "stop"


def test_the_server_loop_aborts_a_stop_strings_request_in_its_next_step(llm: LLM, seed: int) -> None:
    free = llm.generate([PROMPT], FREE)[0]
    stop = _stops(free.text, seed, 1, end=len(free.text) // 2)[0]
    params = dataclasses.replace(FREE, stop=[stop], max_tokens=200)  # ended by length it would run on long after
    got: queue.Queue[Update] = queue.Queue()
    job = Job("s", llm.encode(PROMPT), params, got.put)
    loop = EngineLoop(llm, 4, lambda job: None)
    loop.start()
    try:
        loop.submit(job)
        ups = [got.get(timeout=60)]
        while not ups[-1].finished:
            ups.append(got.get(timeout=60))
        deadline = time.monotonic() + 30
        while not job.request.request.finished and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        loop.stop()
    assert "".join(o.text for u in ups for o in u.outs) == free.text[:free.text.index(stop)], f"seed={seed}"
    assert job.request.finish_reason == "stop" and job.request.stop_reason == stop and ups[-1].error is None
    core = job.request.request
    assert core.finish_reason == "abort" and len(core.generated) < len(job.request.generated) + 5, f"seed={seed}"
