"""Prefix caching: requests that share full 64-token blocks with earlier ones reuse their KV rows, generate exactly
what they generate when every prompt is recomputed, and every block stays accounted for."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from models import agreeable_checkpoint
from staggered import run_staggered

from specdec import LLM, SamplingParams, SpecConfig

SPECS = {"plain": None, "chain": SpecConfig(3), "tree": SpecConfig(3, topk=2),
         "fixed-tree": SpecConfig(3, topk=2, adaptive=False)}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return agreeable_checkpoint(tmp_path_factory.mktemp("prefix"), seed=3, noise=0.14, max_position_embeddings=1024)


def _requests(seed: int, n: int, temperature: float = 0.0, max_tokens: int = 40
              ) -> list[tuple[list[int], SamplingParams]]:
    """Prompts made of one of three stems (130-260 tokens, cut to at least half: so two prompts of a stem share a
    block or more, some ending inside one) and a random tail (sometimes empty), as chat turns and shared system
    prompts give."""
    rng = random.Random(seed)
    stems = [[rng.randrange(2, 256) for _ in range(rng.randint(130, 260))] for _ in range(3)]
    reqs = []
    for i in range(n):
        stem = rng.choice(stems)
        prompt = stem[:rng.randint(len(stem) // 2, len(stem))] + [rng.randrange(2, 256)
                                                                  for _ in range(rng.choice([0, 1, 5, 70]))]
        reqs.append((prompt or [7], SamplingParams(max_tokens=rng.randint(1, max_tokens), temperature=temperature,
                                                    seed=seed + i, ignore_eos=True)))
    return reqs


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("kv_tokens", [None, 512], ids=["roomy", "tight-pool"])
def test_cached_prefixes_generate_what_recomputation_does(ckpt: Path, name: str, kv_tokens: int | None,
                                                          seed: int) -> None:
    """20 staggered greedy requests over shared stems, with the prefix cache and without; a tight pool also
    evicts cached blocks and preempts running requests."""
    reqs = _requests(seed, 20, max_tokens=120 if kv_tokens else 40)  # long answers outgrow a tight pool
    kw = dict(dtype="float32", speculative=SPECS[name], kv_cache_tokens=kv_tokens, prefill_chunk=48)
    llm = LLM(ckpt, **kw)
    cached = run_staggered(llm, reqs, seed, max_per_step=2)
    ref = LLM(ckpt, enable_prefix_caching=False, **kw)
    fresh = run_staggered(ref, reqs, seed, max_per_step=2)
    for i, (a, b) in enumerate(zip(cached, fresh)):
        assert a.generated == b.generated, f"seed={seed} request {i} ({a.metrics.num_cached_tokens} cached tokens)"
        if SPECS[name] is not None and not SPECS[name].adaptive:  # adaptive drafts follow the engine's timings
            # the same drafts: a wrong MTP row would change acceptance, never the (lossless) output
            assert a.metrics.num_accepted == b.metrics.num_accepted, f"seed={seed} request {i}"
        assert a.metrics.num_cached_tokens % 64 == 0 and a.metrics.num_cached_tokens < len(a.prompt)
    pool = llm.engine.pool
    assert pool.usage() == 0 and pool.num_free_blocks == pool.num_blocks, f"seed={seed}"
    assert sum(r.metrics.num_cached_tokens for r in cached) > 0, f"seed={seed}: no request hit the cache"
    assert sum(r.metrics.num_cached_tokens for r in fresh) == 0
    if kv_tokens:
        assert sum(r.metrics.num_preemptions for r in cached) > 0, f"seed={seed}: the tight pool never preempted"


def test_pool_accounting(ckpt: Path) -> None:
    """A fixed shape: adaptive speculation's plain steps leave their MTP rows to the next drafting step, and a
    block is indexed once final in both caches, so which blocks a finished request leaves cached depends on them."""
    llm = LLM(ckpt, dtype="float32", speculative=SpecConfig(3, adaptive=False), kv_cache_tokens=1024)
    pool = llm.engine.pool
    stem = list(range(2, 202))  # 200 tokens: 3 full blocks
    p = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    first = llm.generate([stem], SamplingParams(max_tokens=70, temperature=0, ignore_eos=True))[0]
    assert first.metrics.num_cached_tokens == 0
    assert pool.usage() == 0 and pool.num_free_blocks == pool.num_blocks  # cached blocks count as free
    again = llm.generate([stem], p)[0]
    assert again.metrics.num_cached_tokens == 192 and again.token_ids == first.token_ids[:10]
    longer = llm.generate([stem + first.token_ids + [9] * 60], p)[0]  # the first answer's block 3 too
    assert longer.metrics.num_cached_tokens == 256
    # a prompt that needs every block evicts every cached one (the order: tests/test_kv_pool.py)
    llm.generate([[3] * (pool.num_tokens - 4 - llm.engine.step_rows)], SamplingParams(max_tokens=4, ignore_eos=True))
    assert llm.generate([stem], p)[0].metrics.num_cached_tokens == 0
    assert pool.usage() == 0


@pytest.mark.parametrize("name, want", [("plain", 64), ("chain", 0)])
def test_a_block_is_shared_only_with_the_tokens_its_mtp_rows_saw(ckpt: Path, name: str, want: int) -> None:
    """MTP row 63 pairs token 64 with the main model's state at 63: two prompts whose first 64 tokens agree but
    whose 65th differ share block 0 in plain decoding only."""
    llm = LLM(ckpt, dtype="float32", speculative=SPECS[name])
    p = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    head = list(range(10, 74))
    llm.generate([head + [100, 101, 102]], p)
    out = llm.generate([head + [200, 201, 202]], p)[0]
    assert out.metrics.num_cached_tokens == want
    ref = LLM(ckpt, dtype="float32", speculative=SPECS[name], enable_prefix_caching=False)
    assert out.token_ids == ref.generate([head + [200, 201, 202]], p)[0].token_ids
    # a block is keyed by every token before it: the same second block after another first one is not shared
    second = list(range(100, 164))
    llm.generate([head + second + [5]], p)
    assert llm.generate([head[::-1] + second + [5]], p)[0].metrics.num_cached_tokens == 0


def test_seeded_sampling_is_unchanged_by_the_cache(ckpt: Path, seed: int) -> None:
    reqs = _requests(seed, 10, temperature=0.9)
    kw = dict(dtype="float32", speculative=SPECS["tree"])
    a = run_staggered(LLM(ckpt, **kw), reqs, seed, max_per_step=2)
    b = run_staggered(LLM(ckpt, enable_prefix_caching=False, **kw), reqs, seed, max_per_step=2)
    assert [r.generated for r in a] == [r.generated for r in b], f"seed={seed}"
    assert sum(r.metrics.num_cached_tokens for r in a) > 0


def test_more_than_one_mtp_layer_recomputes_prompts(tmp_path: Path) -> None:
    """With two MTP layers the drafter's carry (an MTP layer's output) is not in the cache: prompts are recomputed
    under speculation, and cached in plain decoding."""
    path = agreeable_checkpoint(tmp_path / "d2", seed=1, num_nextn_predict_layers=2)
    prompt, p = list(range(2, 140)), SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    spec = LLM(path, dtype="float32", speculative=SpecConfig(2))
    spec.generate([prompt], p)
    assert spec.generate([prompt], p)[0].metrics.num_cached_tokens == 0
    plain = spec.with_speculative(None)
    plain.generate([prompt], p)
    assert plain.generate([prompt], p)[0].metrics.num_cached_tokens == 128
    with pytest.raises(ValueError, match="enable_prefix_caching must be True or False"):
        LLM(path, dtype="float32", enable_prefix_caching="yes")
