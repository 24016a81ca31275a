"""Tensor parallelism when the KV pool runs out: every rank schedules from its own pool, so every rank must admit,
preempt and recompute alike, or the group hangs or the tokens change. (A module of its own: test_tp.py's spawned
groups live until its end, and a process drives one group at a time.)"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from models import agreeable_checkpoint
from test_tp import SHAPE, TREE

from specdec import LLM, SamplingParams


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return agreeable_checkpoint(tmp_path_factory.mktemp("tp_pool"), seed=0, noise=0.14, **SHAPE)


def test_a_tight_pool_preempts_alike_on_every_rank(ckpt: Path, seed: int) -> None:
    """8 requests at once in a pool of 6 blocks: they queue for blocks and running ones are preempted and
    recomputed. Each rank schedules from its own pool, so a rank that decided otherwise would hang the group or
    change the tokens; they must equal one rank's with the same pool (greedy and seeded sampling)."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, 264, (int(n),), generator=g).tolist() for n in torch.randint(20, 60, (8,), generator=g)]
    params = [SamplingParams(max_tokens=70, temperature=0 if i % 2 else 0.8, seed=seed + i, ignore_eos=True)
              for i in range(8)]
    kw = dict(dtype="float32", speculative=TREE, kv_cache_tokens=6 * 64)
    ref = LLM(ckpt, **kw).generate(prompts, params)
    with LLM(ckpt, tensor_parallel_size=2, **kw) as tp:
        out = tp.generate(prompts, params)
    assert [o.token_ids for o in out] == [r.token_ids for r in ref], f"seed {seed}"
    assert sum(o.metrics.num_preemptions for o in out) > 0, f"seed {seed}: the pool never ran out"
