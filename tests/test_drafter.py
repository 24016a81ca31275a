"""The MTP cache kept by the engine (draft extend after each step) equals one rebuilt from scratch: after N steps,
drafts from the running cache equal drafts from a fresh prefill of the same committed tokens."""

from __future__ import annotations

import pytest
import torch
from models import agreeable_checkpoint

from specdec import LLM, SamplingParams, SpecConfig
from specdec.drafter import Drafter


@pytest.fixture(scope="module", params=[1, 2, 3], ids=["mtp1", "mtp2", "mtp3"])
def ckpt(request, tmp_path_factory):
    return agreeable_checkpoint(tmp_path_factory.mktemp("drafter"), seed=5, noise=0.14,
                                num_nextn_predict_layers=request.param)


def _record(monkeypatch) -> list[dict]:
    calls: list[dict] = []
    orig = Drafter.draft

    def spy(self, root, g, n_rows, *args, **kwargs):
        d = orig(self, root, g, n_rows, *args, **kwargs)
        calls.append({"g": g.clone(), "n": list(n_rows), "tokens": d.tree.tokens.clone(), "sizes": d.sizes})
        return d

    monkeypatch.setattr(Drafter, "draft", spy)
    return calls


@pytest.mark.parametrize("topk", [1, 3])
def test_drafts_after_n_steps_equal_fresh_drafts(ckpt, monkeypatch, topk):
    """With D MTP layers every layer's cache is extended incrementally (layer L lags L rows behind). A fixed shape:
    adaptive drafts depend on the engine's timings."""
    _check_fresh(ckpt, monkeypatch, SpecConfig(num_speculative_tokens=3, topk=topk, adaptive=False))


def test_drafts_after_plain_steps_equal_fresh_drafts(ckpt, monkeypatch):
    """Adaptive speculation decodes some steps plainly (here: two steps in three while both requests run); the next
    drafting step first extends the MTP cache with their rows (runner._catch_up), so its drafts are a fresh
    prefill's. The policy's choice is pinned: ungated full depth, or plain."""
    from specdec.draft_policy import DraftPolicy

    monkeypatch.setattr(DraftPolicy, "_choose",
                        lambda self, b, step: (0, None, 0.0) if b == 2 and step % 3 else (self.shape.k, None, 0.0))
    _check_fresh(ckpt, monkeypatch, SpecConfig(num_speculative_tokens=3))


def test_gated_steps_over_live_chains_draft_as_alone(ckpt, monkeypatch):
    """A gated chain batch runs each draft step over the chains still going on alone (drafter._draft_chain): a
    request's kept nodes, and the draft logits each came from, equal what it drafts by itself from a fresh prefill
    of the same tokens, up to the shorter of the two (alone, its chain's continuation weighs only its own surplus).
    The calibration is pinned to one value per margin bin, so the gate follows the margins alone, and the floor
    (0.5) ends chains at unequal depths."""
    from specdec.cost_model import CALIBRATION_SIZE, NUM_BINS, Calibration
    from specdec.draft_policy import DraftPolicy

    table = tuple(0.45 + 0.05 * (i % NUM_BINS) for i in range(CALIBRATION_SIZE))
    monkeypatch.setattr(Calibration, "table", lambda self: table)
    monkeypatch.setattr(Calibration, "mean", lambda self, mode=None: 0.7)
    monkeypatch.setattr(DraftPolicy, "_choose", lambda self, b, step: (self.shape.k, 0.5, 0.0))
    llm = LLM(ckpt, dtype="float32", speculative=SpecConfig(num_speculative_tokens=4))
    calls = _record(monkeypatch)
    logits: list[list[torch.Tensor]] = []  # per draft call, each step's logits [B, V]
    children, draft = Drafter._children, Drafter.draft
    monkeypatch.setattr(Drafter, "draft", lambda self, *a, **kw: logits.append([]) or draft(self, *a, **kw))
    monkeypatch.setattr(Drafter, "_children", lambda self, x, *a, **kw: logits[-1].append(x.clone())
                        or children(self, x, *a, **kw))
    prompts = [[5, 6, 7], [100], [9, 8, 7, 6], [40, 41]]
    out = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))

    def gapped(s: list[int]) -> bool:  # a step ran over a later chain after an earlier one had ended
        return any(s[b2] >= s[b1] + 2 for b1 in range(len(s)) for b2 in range(b1 + 1, len(s)))

    uneven = [i for i, c in enumerate(calls) if c["tokens"].shape[0] == len(prompts) and c["sizes"]
              and gapped(c["sizes"])]
    assert uneven, "no batch step ran over part of its chains"
    for step in uneven:
        c = calls[step]
        for b, (p, o) in enumerate(zip(prompts, out)):
            committed = (p + o.token_ids)[:c["n"][b]]
            before = len(calls)
            llm.generate([committed], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
            f = calls[before]
            n = min(c["sizes"][b], f["sizes"][0] if f["sizes"] else f["tokens"].shape[1])
            assert torch.equal(c["tokens"][b, :n], f["tokens"][0, :n]), (step, b)
            for j in range(n - 1):  # node j + 1 came from step j's logits
                x, y = logits[step][j][b], logits[before][j][0]
                assert ((x - y).norm() / y.norm()).item() < 1e-5, (step, b, j)


def _check_fresh(ckpt, monkeypatch, spec: SpecConfig) -> None:
    llm = LLM(ckpt, dtype="float32", speculative=spec)
    calls = _record(monkeypatch)
    prompts = [[5, 6, 7], [100]]
    out = llm.generate(prompts, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    full = [i for i, c in enumerate(calls) if c["tokens"].shape[0] == len(prompts)]  # both requests active
    assert len(full) >= 4
    for step in (full[2], full[-1]):
        c = calls[step]
        for b, (p, o) in enumerate(zip(prompts, out)):
            n = c["n"][b]  # committed tokens in the main cache; the root is token n
            committed = (p + o.token_ids)[:n]
            calls_before = len(calls)
            fresh = llm.generate([committed], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
            f = calls[calls_before]  # the fresh run's first draft: its MTP cache was built in one prefill
            assert fresh[0].token_ids[0] == c["tokens"][b, 0].item()  # same root
            g_run, g_fresh = c["g"][b], f["g"][0]
            assert ((g_run - g_fresh).norm() / g_fresh.norm()).item() < 1e-5
            # adaptive: fewer near max_tokens, a prefix of the chain (a ragged batch pads the shorter rows)
            n_nodes = c["tokens"].shape[1] if c["sizes"] is None else c["sizes"][b]
            assert torch.equal(c["tokens"][b, :n_nodes], f["tokens"][0, :n_nodes])


@pytest.mark.parametrize("topk", [1, 2])
def test_draft_step_j_runs_layer_min_j_d_minus_1(ckpt, monkeypatch, topk):
    from specdec.model.transformer import DeepseekV3

    d = LLM(ckpt, dtype="float32", speculative=None).config.num_nextn_predict_layers
    k = 4
    # a fixed shape: every step drafts all k (adaptive's first steps sweep the depths, and stop at a shallower one)
    llm = LLM(ckpt, dtype="float32", speculative=SpecConfig(num_speculative_tokens=k, topk=topk, adaptive=False))
    calls: list[int] = []
    orig = DeepseekV3.mtp_forward
    monkeypatch.setattr(DeepseekV3, "mtp_forward", lambda self, depth, *a: calls.append(depth) or orig(self, depth, *a))
    plain = LLM(ckpt, dtype="float32", speculative=None)
    p = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    calls.clear()
    assert llm.generate([[3, 4, 5]], p)[0].token_ids == plain.generate([[3, 4, 5]], p)[0].token_ids
    # the prefill's extend runs layers 0..D-1; then each step drafts (steps j = 1..k-1 run layer min(j, D-1))
    # and extends again
    step = [min(j, d - 1) for j in range(1, k)] + list(range(d))
    assert calls[:d] == list(range(d)) and calls[d:d + len(step)] == step
