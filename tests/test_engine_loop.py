"""LLM.engine_step and the server's engine loop (server/loop.py) without HTTP: an add the engine refuses is a
RequestRejected carrying its key (the loop finds the job by the key, whatever the message says), a key that is
live or repeated is refused, and the loop reads the engine's load through LLM.engine_stats."""

from __future__ import annotations

import dataclasses
import queue
from pathlib import Path

import pytest

from specdec import LLM, SamplingParams, SpecConfig
from specdec.api import RequestRejected
from specdec.scheduler import EngineStats
from specdec.server.loop import EngineLoop, Job, Update

P = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(shared_ckpt: Path) -> LLM:
    return LLM(shared_ckpt, dtype="float32", speculative=SpecConfig(3))


def serve(llm: LLM, adds: list[tuple[str, list[int], SamplingParams]]) -> dict[str, list[Update]]:
    """Submit the adds to an engine loop at once; every update each one got, up to its last."""
    got: queue.Queue[tuple[str, Update]] = queue.Queue()
    loop = EngineLoop(llm, 16, lambda job: None)
    loop.start()
    ups: dict[str, list[Update]] = {key: [] for key, _, _ in adds}
    try:
        for key, ids, params in adds:
            loop.submit(Job(key, ids, params, lambda u, key=key: got.put((key, u))))
        while not all(u and u[-1].finished for u in ups.values()):
            key, u = got.get(timeout=60)
            ups[key].append(u)
    finally:
        loop.stop()
    assert loop.down is None
    return ups


def _idle(llm: LLM) -> bool:
    """Nothing running or waiting and no block held (an MTP engine's drafting statistics aside)."""
    return dataclasses.replace(llm.engine_stats(), drafting=None) == EngineStats()


def test_duplicate_keys_are_refused(llm: LLM) -> None:
    with pytest.raises(RequestRejected, match="added twice") as e:
        llm.engine_step(adds=[("a", [5, 6], P), ("a", [7], P)])
    assert e.value.key == "a" and isinstance(e.value, ValueError)
    assert _idle(llm), "a refused call queues nothing"
    a = llm.engine_step(adds=[("a", [5, 6], dataclasses.replace(P, max_tokens=40))])["a"]
    with pytest.raises(RequestRejected, match="in use") as e:
        llm.engine_step(adds=[("b", [5], P), ("a", [7], P)])
    assert e.value.key == "a" and llm.engine_stats().running == 1, "b was not queued either"
    llm.engine_step(aborts=["a"])
    assert a.request.finished and _idle(llm)
    a.take()
    assert a.finish_reason == "abort"


def test_a_refused_add_fails_that_job_alone(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    add = llm.engine.add

    def picky(prompt: list[int], params: SamplingParams, where: str = "prompt"):
        if prompt == [7, 7, 7]:
            raise ValueError("sevens are not served")  # names no request: the key travels in RequestRejected
        return add(prompt, params, where)

    monkeypatch.setattr(llm.engine, "add", picky)
    ups = serve(llm, [("bad", [7, 7, 7], P), ("good", [5, 6], P)])
    err = ups["bad"][-1].error
    assert isinstance(err, RequestRejected) and err.key == "bad" and "sevens" in str(err)
    assert ups["good"][-1].error is None and sum(len(o.token_ids) for u in ups["good"] for o in u.outs) == 6
    assert _idle(llm)
