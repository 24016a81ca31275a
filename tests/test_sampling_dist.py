"""Speculative sampling keeps the main model's distribution: the 2nd and 3rd generated tokens, sampled many
times with and without MTP (chain and tree), against the exact distribution enumerated from the model, with
top-k / top-p and with penalties (whose target at a tree node counts its drafted ancestors)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from models import agreeable_checkpoint
from penalty_reference import adjusted_reference
from stats import assert_matches

from specdec import LLM, SamplingParams, SpecConfig
from specdec.draft_policy import DraftPolicy
from specdec.sampling import process_logits

V = 16
PROMPT = [3, 7, 2]
N = 2000


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return agreeable_checkpoint(tmp_path_factory.mktemp("smallvocab"), seed=3, noise=0.12, head_scale=0.25,
                                vocab_size=V, eos_token_id=None, bos_token_id=None)


def _probs(llm: LLM, generated: list[int], sp: SamplingParams) -> torch.Tensor:
    logits = adjusted_reference(llm.logits(PROMPT + generated)[-1], PROMPT, generated, sp)[None]
    return process_logits(logits, torch.tensor([sp.temperature]), torch.tensor([sp.top_k]),
                          torch.tensor([sp.top_p]))[0]


def exact_marginals(llm: LLM, sp: SamplingParams) -> tuple[torch.Tensor, torch.Tensor]:
    """P(2nd token) and P(3rd token), enumerating every (1st, 2nd) prefix."""
    p1 = _probs(llm, [], sp).double()
    p2 = torch.zeros(V, dtype=torch.float64)
    p3 = torch.zeros(V, dtype=torch.float64)
    for a in range(V):
        if p1[a] == 0:
            continue
        pa = _probs(llm, [a], sp).double()
        p2 += p1[a] * pa
        for b in range(V):
            if pa[b] > 0:
                p3 += p1[a] * pa[b] * _probs(llm, [a, b], sp).double()
    return p2, p3


SETTINGS = [SamplingParams(max_tokens=3, temperature=1.0, ignore_eos=True),
            SamplingParams(max_tokens=3, temperature=0.7, top_k=6, top_p=0.9, ignore_eos=True),
            SamplingParams(max_tokens=3, temperature=0.9, presence_penalty=2.0, frequency_penalty=1.0,
                           repetition_penalty=1.8, ignore_eos=True)]
SPECS = [None, SpecConfig(num_speculative_tokens=2), SpecConfig(num_speculative_tokens=2, topk=2),
         SpecConfig(num_speculative_tokens=3, topk=3, num_draft_tokens=5)]
# adaptive speculation (on in SPECS) drafts a seeded request's whole shape; GATED's requests have no seed of their
# own, so each drafts only the nodes whose calibrated confidence reaches a floor (the policy's choice pinned below)
GATED = [SpecConfig(num_speculative_tokens=3), SpecConfig(num_speculative_tokens=3, topk=2)]  # chain, tree


@pytest.mark.parametrize("si", range(len(SETTINGS)))
def test_second_and_third_token_distribution(ckpt, si, seed, monkeypatch):
    sp = SETTINGS[si]
    plain = LLM(ckpt, dtype="float32", speculative=None)
    p2, p3 = exact_marginals(plain, sp)
    base_seed = seed  # fresh samples every run
    # the gated engines' first two steps learn the calibration ungated, then nodes below 0.75 are dropped
    monkeypatch.setattr(DraftPolicy, "_choose", lambda self, b, step: (self.shape.k, None if step < 2 else 0.75, 0.5))
    for spec in SPECS + GATED:
        gated = any(spec is x for x in GATED)
        llm = plain if spec is None else LLM(ckpt, dtype="float32", speculative=spec, seed=base_seed)
        params = [dataclasses.replace(sp, seed=None if gated else base_seed + i) for i in range(N)]
        out = llm.generate([PROMPT] * N, params)
        toks = torch.tensor([o.token_ids for o in out])
        assert toks.shape == (N, 3)
        what = f"seed={seed} {spec}"
        assert_matches(torch.bincount(toks[:, 1], minlength=V), p2, what=what + " token 2")
        assert_matches(torch.bincount(toks[:, 2], minlength=V), p3, what=what + " token 3")
        if spec is not None:
            accepted = sum(o.metrics.num_accepted for o in out)
            assert accepted > N // 10, f"{what}: drafts are rarely accepted, so acceptance went unexercised"
        if gated and spec.topk > 1:  # (a chain's node here is calibrated at 0.9 or more: it rarely falls below)
            drafted = sum(o.metrics.num_drafted for o in out)
            # each request drafts once (max_tokens caps its first decode step at depth 1: topk nodes ungated)
            assert 0 < drafted < spec.topk * N, f"{what}: never gated"
