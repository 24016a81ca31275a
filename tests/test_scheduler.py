"""The continuous-batching engine: requests that arrive at different times, a pool too small for all of them,
preemption, chunked prefill and aborts change nothing in what each request generates, and every block returns to
the pool."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from staggered import run_staggered

from specdec import LLM, SamplingParams, SpecConfig

TREE = SpecConfig(3, topk=2)
FIXED = SpecConfig(3, topk=2, adaptive=False)


@pytest.fixture(scope="module")
def alone(shared_ckpt: Path) -> LLM:
    return LLM(shared_ckpt, dtype="float32", speculative=TREE)


@pytest.fixture(scope="module")
def alone_fixed(shared_ckpt: Path) -> LLM:
    return LLM(shared_ckpt, dtype="float32", speculative=FIXED)


def _requests(seed: int, n: int, max_tokens: int = 30) -> list[tuple[list[int], SamplingParams]]:
    rng = random.Random(seed)
    return [([rng.randrange(2, 256) for _ in range(rng.randint(1, 40))],
             SamplingParams(max_tokens=rng.randint(1, max_tokens), temperature=0, ignore_eos=True))
            for _ in range(n)]


@pytest.mark.parametrize("adaptive", [True, False], ids=["adaptive", "fixed"])
@pytest.mark.parametrize("kv_tokens, max_seqs, chunk", [(None, 64, 512), (512, 64, 7), (2048, 5, 16)],
                         ids=["roomy", "tight-pool", "few-seqs"])
def test_staggered_arrivals_equal_each_request_alone(shared_ckpt: Path, alone: LLM, alone_fixed: LLM, kv_tokens,
                                                     max_seqs, chunk, adaptive: bool, seed: int) -> None:
    """16 greedy requests of different lengths arriving at different times; a pool that holds few of them (so
    they queue and get preempted: requests then outgrow their first block), few running slots, prompts prefilled
    in chunks of 7 or 16 tokens."""
    reqs = _requests(seed, 16, max_tokens=90 if kv_tokens == 512 else 30)
    llm = LLM(shared_ckpt, dtype="float32", speculative=TREE if adaptive else FIXED, kv_cache_tokens=kv_tokens,
              max_num_seqs=max_seqs, prefill_chunk=chunk)
    done = run_staggered(llm, reqs, seed)
    for i, (r, (prompt, p)) in enumerate(zip(done, reqs)):
        want = (alone if adaptive else alone_fixed).generate([prompt], p)[0]
        assert r.generated == want.token_ids, f"seed={seed} request {i} (preempted {r.metrics.num_preemptions}x)"
        assert r.finish_reason == "length"
        if not adaptive:  # adaptive drafts follow the engine's timings and load
            # the same drafts and steps too (a request preempted before its first token samples it at prefill again)
            assert r.metrics.num_accepted == want.metrics.num_accepted, f"seed={seed} request {i}"
    assert llm.engine.pool.usage() == 0 and not llm.engine.has_unfinished
    if kv_tokens == 512:
        assert sum(r.metrics.num_preemptions for r in done) > 0, f"seed={seed}: the tight pool never preempted"


def test_seeded_sampling_does_not_depend_on_the_batch(shared_ckpt: Path, alone: LLM, seed: int) -> None:
    rng = random.Random(seed)
    reqs = [([rng.randrange(2, 256) for _ in range(rng.randint(1, 20))],
             SamplingParams(max_tokens=20, temperature=0.9, top_p=0.95, seed=seed + i, ignore_eos=True))
            for i in range(8)]
    llm = LLM(shared_ckpt, dtype="float32", speculative=TREE, kv_cache_tokens=512)
    done = run_staggered(llm, reqs, seed)
    for i, (r, (prompt, p)) in enumerate(zip(done, reqs)):
        assert r.generated == alone.generate([prompt], p)[0].token_ids, f"seed={seed} request {i}"


def test_aborts_free_their_blocks_at_once(shared_ckpt: Path) -> None:
    llm = LLM(shared_ckpt, dtype="float32", speculative=TREE, kv_cache_tokens=1024)
    e = llm.engine
    a = e.add([5, 6, 7], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    b = e.add([8] * 30, SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    e.step()
    assert e.pool.usage() > 0 and len(a.generated) >= 1
    e.abort(a)
    assert a.finished and a.finish_reason == "abort" and a.table.blocks == []
    e.abort(b)
    assert e.pool.usage() == 0 and not e.has_unfinished
    it = llm.stream([1, 2, 3], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))
    next(it)
    assert e.pool.usage() > 0
    it.close()  # a stream closed early aborts its request
    assert e.pool.usage() == 0 and not e.has_unfinished


def test_a_request_larger_than_the_pool_is_refused(shared_ckpt: Path) -> None:
    llm = LLM(shared_ckpt, dtype="float32", speculative=TREE, kv_cache_tokens=128)
    with pytest.raises(ValueError, match=r"prompt 0: needs \d+ KV rows .* the whole pool holds 128"):
        llm.generate([[1] * 100], SamplingParams(max_tokens=50))
    assert llm.generate([[1] * 10], SamplingParams(max_tokens=20, ignore_eos=True))[0].finish_reason == "length"
    with pytest.raises(ValueError, match="kv_cache_tokens"):
        LLM(shared_ckpt, dtype="float32", kv_cache_tokens=0)
    with pytest.raises(ValueError, match="max_num_seqs"):
        LLM(shared_ckpt, dtype="float32", max_num_seqs=0)
