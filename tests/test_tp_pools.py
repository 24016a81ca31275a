"""Tensor parallelism when the KV pool runs out, and when the ranks' memory differs: rank 0 alone schedules, so every
rank must hold the pool rank 0 hands out (the smallest any rank's memory allows) and run the same forwards through
admission, preemption and prefix-cache eviction, or the group fails or the tokens change. (A module of its own:
test_tp.py's spawned groups live until its end, and a process drives one group at a time.)"""

from __future__ import annotations

import random
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from models import agreeable_checkpoint
from staggered import run_staggered
from test_tp import SHAPE, TREE

from specdec import LLM, SamplingParams
from specdec.draft_policy import DraftPolicy
from specdec.kv_pool import CPU_KV_SHARE, FREE_MEMORY_ENV, KVPool, kv_bytes_per_token
from specdec.model.checkpoint import tiny_config
from specdec.model.config import ModelConfig
from specdec.request import Request

BLOCKS = 8  # the pool the smaller rank's memory allows: 16 requests queue, get preempted and evict cached blocks


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return agreeable_checkpoint(tmp_path_factory.mktemp("tp_pool"), seed=0, noise=0.14, **SHAPE)


def test_a_tight_pool_preempts_alike_on_every_rank(ckpt: Path, seed: int) -> None:
    """8 requests at once in a pool of 6 blocks: they queue for blocks and running ones are preempted and
    recomputed. The worker runs rank 0's plans, so it must recompute what rank 0 preempted, or the tokens change;
    they must equal one rank's with the same pool. Greedy: a sampled token may fall the other side of a sampling
    boundary when 2-way sharded logits differ from one rank's by rounding (5e-6 flipped one of 560 with seed
    1111719408), which says nothing about scheduling; rank 0 ships its sampled tokens, so ranks never disagree."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 264, (int(n),), generator=g).tolist() for n in torch.randint(20, 60, (8,), generator=g)]
    params = SamplingParams(max_tokens=70, temperature=0, ignore_eos=True)
    kw = dict(dtype="float32", speculative=TREE, kv_cache_tokens=6 * 64)
    ref = LLM(ckpt, **kw).generate(prompts, params)
    with LLM(ckpt, tensor_parallel_size=2, **kw) as tp:
        out = tp.generate(prompts, params)
    assert [o.token_ids for o in out] == [r.token_ids for r in ref], f"seed {seed}"
    assert sum(o.metrics.num_preemptions for o in out) > 0, f"seed {seed}: the pool never ran out"


class _CountingEvictions(OrderedDict):
    """KVPool's cached, unreferenced blocks; it evicts one with popitem."""

    evicted = 0

    def popitem(self, last: bool = True) -> tuple:
        self.evicted += 1
        return super().popitem(last)


def _staggered(llm: LLM, reqs: list[tuple[list[int], SamplingParams]], seed: int) -> tuple[list[Request], int]:
    """The requests added a few at a time between steps (the same arrivals whatever the LLM), and how many cached
    blocks rank 0's pool evicted meanwhile."""
    pool: KVPool = llm.engine.pool
    pool._evictable = _CountingEvictions(pool._evictable)
    return run_staggered(llm, reqs, seed), pool._evictable.evicted


def test_ranks_with_different_memory_run_rank_0s_schedule(ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                                           seed: int) -> None:
    """Rank 0 reports ten times rank 1's free memory (the test hook kv_pool.FREE_MEMORY_ENV): each alone would size
    a different pool, and rank 0 would hand out blocks rank 1 lacks. The group takes the smaller pool, and 16
    staggered greedy requests sharing prompt prefixes queue, get preempted and evict cached blocks exactly as on
    one rank with that pool: the same tokens, acceptance, preemptions, cache hits and evictions. (Greedy: a sampled
    token can flip where two ranks' float rounding moves a CDF boundary past its uniform; the test above samples.)
    Adaptive speculation's timing-driven choice is pinned (some steps plain, the others gated), as in test_tp: two
    engines' own timings would choose differently."""
    monkeypatch.setattr(DraftPolicy, "_choose",
                        lambda self, b, step: (0, None, 0.0) if step % 3 == 1 else (self.shape.k, 0.3, 0.5))
    per_token = kv_bytes_per_token(ModelConfig.from_dict(tiny_config(**SHAPE)), torch.float32, mtp=True)
    small = BLOCKS * 64 * per_token / CPU_KV_SHARE
    monkeypatch.setenv(FREE_MEMORY_ENV, f"{10 * small:.0f},{small:.0f}")
    rng = random.Random(seed)
    prefixes = [[rng.randrange(1, 264) for _ in range(64 * (1 + i % 2))] for i in range(3)]
    reqs = [(prefixes[i % 3] + [rng.randrange(1, 264) for _ in range(rng.randint(1, 40))],
             SamplingParams(max_tokens=rng.randint(30, 90), temperature=0, ignore_eos=True)) for i in range(16)]
    with LLM(ckpt, dtype="float32", speculative=TREE, tensor_parallel_size=2) as tp:
        assert tp.engine.pool.num_blocks == BLOCKS, "the group takes the smallest rank's pool"
        out, evicted = _staggered(tp, reqs, seed)
    ref, ref_evicted = _staggered(LLM(ckpt, dtype="float32", speculative=TREE, kv_cache_tokens=BLOCKS * 64), reqs,
                                  seed)
    assert [r.generated for r in out] == [r.generated for r in ref], f"seed {seed}"
    for field in ("num_accepted", "accepted_per_position", "num_preemptions", "num_cached_tokens"):
        assert [getattr(r.metrics, field) for r in out] == [getattr(r.metrics, field) for r in ref], (field, seed)
    assert evicted == ref_evicted > 0, f"seed {seed}: {evicted} evictions, one rank {ref_evicted}"
    assert sum(r.metrics.num_preemptions for r in out) > 0 and sum(r.metrics.num_cached_tokens for r in out) > 0
