"""Target adjustments (logit_bias, min_tokens, penalties): the batched, tree-aware fast path against a
token-by-token reference of vLLM's / OpenAI's definitions (adjusted_reference, shared with the sampling-distribution
test), with each tree node's context (committed tokens plus its drafted ancestors and itself) spelled out."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch
from models import agreeable_checkpoint
from penalty_reference import adjusted_reference

from specdec import LLM, SamplingParams, SpecConfig
from specdec.penalties import Penalties


def test_tree_penalties_match_the_reference(seed: int) -> None:
    rng = random.Random(seed)
    b, n, v = 3, 6, 12
    reqs, parents = [], []
    for i in range(b):
        generated = [rng.randrange(v) for _ in range(rng.randint(1, 8))]
        params = SamplingParams(presence_penalty=rng.uniform(-2, 2), frequency_penalty=rng.uniform(-2, 2),
                                repetition_penalty=rng.uniform(0.5, 2), max_tokens=16,
                                logit_bias={rng.randrange(v): rng.uniform(-100, 100) for _ in range(3)},
                                min_tokens=len(generated) + 2 - i // 2) if i != 1 else SamplingParams()
        reqs.append(SimpleNamespace(params=params, prompt=[rng.randrange(v) for _ in range(rng.randint(1, 6))],
                                    generated=generated, stop_ids=frozenset(rng.sample(range(v), 2))))
        parents.append([-1] + [rng.randrange(j) for j in range(1, n)])  # a random tree, node 0 the root
    tokens = torch.tensor([[r.generated[-1]] + [rng.randrange(v) for _ in range(n - 1)] for r in reqs])
    mask = torch.zeros(b, n, n, dtype=torch.bool)
    for i, par in enumerate(parents):
        for j in range(n):
            a = j
            while a >= 0:
                mask[i, j, a] = True
                a = par[a]
    logits = torch.randn(b * n, v, generator=torch.Generator().manual_seed(seed)) * 3
    pen = Penalties.build(reqs, v, torch.device("cpu"))
    got = pen.apply(logits, SimpleNamespace(mask=mask, tokens=tokens, depth=mask.sum(-1) - 1)).view(b, n, v)
    for i, r in enumerate(reqs):
        for j in range(n):
            path = [tokens[i, a].item() for a in range(1, n) if mask[i, j, a]]  # drafted ancestors and itself
            want = adjusted_reference(logits.view(b, n, v)[i, j], r.prompt, r.generated + path, r.params,
                                      r.stop_ids)
            assert torch.allclose(got[i, j], want, atol=1e-4, rtol=1e-5), f"seed={seed} request {i} node {j}"
    plain = pen.apply(logits.view(b, n, v)[:, 0])  # one row a request, no tree
    for i, r in enumerate(reqs):
        want = adjusted_reference(logits.view(b, n, v)[i, 0], r.prompt, r.generated, r.params, r.stop_ids)
        assert torch.allclose(plain[i], want, atol=1e-4, rtol=1e-5), f"seed={seed} request {i}"


def test_no_penalized_request_builds_nothing() -> None:
    reqs = [SimpleNamespace(params=SamplingParams(), prompt=[1], generated=[2], stop_ids=frozenset())]
    assert Penalties.build(reqs, 8, torch.device("cpu")) is None


@pytest.mark.parametrize("field, value", [("presence_penalty", 2.5), ("frequency_penalty", -3.0),
                                          ("repetition_penalty", 0.0), ("presence_penalty", float("nan")),
                                          ("repetition_penalty", True)])
def test_bad_penalties_are_refused(field: str, value: float) -> None:
    with pytest.raises(ValueError, match=f"SamplingParams.{field} must be"):
        SamplingParams(**{field: value})


def test_greedy_speculative_decoding_with_penalties_equals_plain(tmp_path, seed: int) -> None:
    """Penalized greedy decoding: chains and trees give the plain tokens, and the penalties change them."""
    ckpt = agreeable_checkpoint(tmp_path / "ck", seed=1, noise=0.14)
    rng = random.Random(seed)
    prompts = [[9] * 20, [rng.randrange(2, 256) for _ in range(rng.randint(1, 12))], [5, 6, 7]]
    params = [SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, repetition_penalty=1.6),
              SamplingParams(max_tokens=30, temperature=0, ignore_eos=True, presence_penalty=rng.uniform(0.5, 2),
                             frequency_penalty=rng.uniform(0.5, 2)),
              SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)]
    plain = LLM(ckpt, dtype="float32", speculative=None)
    want = plain.generate(prompts, params)
    unpenalized = plain.generate(prompts[:1], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0]
    assert unpenalized.token_ids != want[0].token_ids, "the repetition penalty changed nothing"
    for spec in (SpecConfig(3), SpecConfig(3, topk=2, num_draft_tokens=6)):
        out = LLM(ckpt, dtype="float32", speculative=spec).generate(prompts, params)
        for i, (o, w) in enumerate(zip(out, want)):
            assert o.token_ids == w.token_ids, f"seed={seed} {spec} request {i}"
        assert sum(o.metrics.num_accepted for o in out) > 0


def test_logit_bias_and_min_tokens_under_speculation(tmp_path, seed: int) -> None:
    """A -100 bias bans a token; min_tokens holds a stop token back (here the one greedy decoding emits 3rd);
    chains and trees equal plain decoding under both."""
    ckpt = agreeable_checkpoint(tmp_path / "ck", seed=2, noise=0.14)
    plain = LLM(ckpt, dtype="float32", speculative=None)
    prompt = [random.Random(seed).randrange(2, 256) for _ in range(8)]
    free = plain.generate([prompt], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0].token_ids
    banned, stop = free[0], free[2]
    params = [SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logit_bias={banned: -100}),
              SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop_token_ids=[stop], min_tokens=8),
              SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, stop_token_ids=[stop])]
    want = plain.generate([prompt] * 3, params)
    assert banned not in want[0].token_ids
    assert stop not in want[1].token_ids[:7] and len(want[2].token_ids) <= 3
    for spec in (SpecConfig(3), SpecConfig(3, topk=2, num_draft_tokens=6)):
        out = LLM(ckpt, dtype="float32", speculative=spec).generate([prompt] * 3, params)
        assert [o.token_ids for o in out] == [w.token_ids for w in want], f"seed={seed} {spec}"


@pytest.mark.parametrize("kw, match", [({"logit_bias": {3: 101}}, "logit_bias"), ({"logit_bias": {-1: 1}},
                                       "logit_bias"), ({"min_tokens": 20, "max_tokens": 10}, "min_tokens")])
def test_bad_bias_and_min_tokens_are_refused(kw: dict, match: str) -> None:
    with pytest.raises(ValueError, match=f"SamplingParams.{match} must be"):
        SamplingParams(**kw)
