"""One LLM called from two threads at once gives the results each call gives alone (the model keeps no state
between forwards; every call decodes in caches of its own)."""

from __future__ import annotations

import random
import threading

import pytest
import torch
from models import agreeable_checkpoint

from specdec import LLM, SamplingParams, SpecConfig

CALLS = 30


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory) -> LLM:
    return LLM(agreeable_checkpoint(tmp_path_factory.mktemp("threads"), seed=4), dtype="float32",
               speculative=SpecConfig(3, topk=2))


def _call(llm: LLM, i: int) -> object:
    """Call i of a thread: greedy and seeded-sampled generation of prompts of varying length (so concurrent
    forwards have different shapes), streams, logits."""
    rng = random.Random(i)
    prompt = [rng.randrange(2, 256) for _ in range(rng.randint(1, 20))]
    kind = i % 4
    if kind == 0:
        return llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].token_ids
    if kind == 1:
        return llm.generate([prompt, prompt[:3]], SamplingParams(max_tokens=10, temperature=0.8, seed=i,
                                                                 ignore_eos=True))[1].token_ids
    if kind == 2:
        return list(llm.stream(prompt, SamplingParams(max_tokens=9, temperature=0, ignore_eos=True)))
    return llm.logits(prompt)


def test_two_threads_give_the_single_thread_results(llm: LLM, seed: int) -> None:
    offsets = (seed % 1000, seed % 1000 + CALLS)  # the two threads make different calls
    want = {i: _call(llm, i) for o in offsets for i in range(o, o + CALLS)}
    got: dict[int, object] = {}
    errors: list[BaseException] = []

    def worker(o: int) -> None:
        try:
            for i in range(o, o + CALLS):
                got[i] = _call(llm, i)
        except BaseException as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(o,)) for o in offsets]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"seed={seed}: {errors[0]!r}"
    for i, w in want.items():
        if isinstance(w, torch.Tensor):
            assert torch.equal(got[i], w), f"seed={seed} call {i}: logits differ"
        else:
            assert got[i] == w, f"seed={seed} call {i}"


def test_rope_keeps_no_state(llm: LLM) -> None:
    """What broke before: Rope cached cos/sin on the module by tensor identity, so threads overwrote each other."""
    rope = llm.model.model.rope
    before = {k for k, v in vars(rope).items() if isinstance(v, (torch.Tensor, tuple))}
    llm.logits([1, 2, 3])
    after = {k for k, v in vars(rope).items() if isinstance(v, (torch.Tensor, tuple))}
    assert after == before
