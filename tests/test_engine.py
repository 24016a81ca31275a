"""Greedy speculative decoding is token-identical to plain greedy decoding."""

from __future__ import annotations

import json
import random
import shutil

import pytest
from models import agreeable_checkpoint

from specdec import LLM, SamplingParams, SpecConfig

CASES = [  # (k, topk, num_draft_tokens)
    (1, 1, None), (2, 1, None), (4, 1, None), (2, 2, None), (4, 2, 6), (2, 4, None), (3, 4, 5), (4, 4, 12),
]


@pytest.fixture(scope="module", params=[0, 1])
def ckpt(request, tmp_path_factory):
    seed = request.param
    path = agreeable_checkpoint(tmp_path_factory.mktemp(f"agree{seed}"), seed=seed, noise=0.14,
                                q_lora_rank=None if seed else 48)
    return path


@pytest.fixture(scope="module")
def plain(ckpt):
    return LLM(ckpt, dtype="float32", speculative=None)


def _prompts(batch: int, rng: random.Random) -> list[list[int]]:
    lens = [1] + [rng.randint(1, 24) for _ in range(batch - 1)]
    return [[rng.randrange(2, 256) for _ in range(n)] for n in lens[:batch]]


@pytest.mark.parametrize("k,topk,budget", CASES)
def test_greedy_spec_equals_plain(ckpt, plain, k, topk, budget, seed):
    rng = random.Random(seed)
    batch = rng.randint(1, 8)
    prompts = _prompts(batch, rng)
    params = [SamplingParams(max_tokens=rng.randint(1, 24), temperature=0, ignore_eos=True) for _ in prompts]
    ref = plain.generate(prompts, params)
    spec = LLM(ckpt, dtype="float32", speculative=SpecConfig(num_speculative_tokens=k, topk=topk,
                                                              num_draft_tokens=budget))
    out = spec.generate(prompts, params)
    for i, (r, o, p) in enumerate(zip(ref, out, params)):
        assert o.token_ids == r.token_ids, f"seed={seed} request {i}"
        assert len(o.token_ids) == p.max_tokens and o.finish_reason == "length", f"seed={seed} request {i}"
        # every verify step emits its accepted drafts plus one token (the last step may be cut by max_tokens)
        m = o.metrics
        assert m.num_steps - 1 + m.num_accepted >= m.num_generated - 1 >= m.num_steps - 1, f"seed={seed}"


def test_acceptance_is_partial(ckpt, plain):
    """The fixture model must exercise both accepted and rejected drafts, else the tests above prove little."""
    spec = LLM(ckpt, dtype="float32", speculative=SpecConfig(num_speculative_tokens=3))
    prompts = [[5, 9, 200], [17], [3, 4, 5, 6, 7, 8, 9, 10]]
    out = spec.generate(prompts, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    drafted = sum(o.metrics.num_drafted for o in out)
    accepted = sum(o.metrics.num_accepted for o in out)
    assert 0 < accepted < drafted


@pytest.mark.parametrize("k,topk", [(3, 1), (3, 2)])
def test_stop_and_max_tokens_inside_accepted_runs(ckpt, plain, k, topk):
    prompts = [[11, 12, 13], [40], [90, 91]]
    free = plain.generate(prompts, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
    spec = LLM(ckpt, dtype="float32", speculative=SpecConfig(num_speculative_tokens=k, topk=topk))
    for cut in (1, 2, 5, 9):
        # stop at the first occurrence of the token plain decoding produced at position `cut`
        stops = [f.token_ids[cut] for f in free]
        params = [SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[s], ignore_eos=True) for s in stops]
        out = spec.generate(prompts, params)
        for f, o, s in zip(free, out, stops):
            end = f.token_ids.index(s) + 1
            assert o.token_ids == f.token_ids[:end]
            assert o.finish_reason == "stop"
        out = spec.generate(prompts, SamplingParams(max_tokens=cut, temperature=0, ignore_eos=True))
        for f, o in zip(free, out):
            assert o.token_ids == f.token_ids[:cut] and o.finish_reason == "length"


def test_eos_stops_unless_ignored(ckpt, plain):
    free = plain.generate([[7, 8]], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0].token_ids
    eos = free[3]
    tmp = ckpt.parent / "eos"
    shutil.copytree(ckpt, tmp, dirs_exist_ok=True)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["eos_token_id"] = eos
    (tmp / "config.json").write_text(json.dumps(cfg))
    spec = LLM(tmp, dtype="float32", speculative=SpecConfig(num_speculative_tokens=4))
    out = spec.generate([[7, 8]], SamplingParams(max_tokens=20, temperature=0))[0]
    assert out.token_ids == free[:free.index(eos) + 1] and out.finish_reason == "stop"
    out = spec.generate([[7, 8]], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    assert out.token_ids == free


@pytest.mark.parametrize("topk", [1, 2])
def test_a_chains_verify_step_is_causal(ckpt, topk):
    """A chain's verify forward carries a causal AttnMeta (kernels without custom masks, flashinfer's, take it);
    a tree's does not."""
    spec = LLM(ckpt, dtype="float32", speculative=SpecConfig(num_speculative_tokens=3, topk=topk))
    seen, real = [], spec.model.forward

    def forward(tokens, positions, meta, cache):
        seen.append((any(meta.host_ctx_lens), meta.max_new, meta.is_causal))
        return real(tokens, positions, meta, cache)

    spec.model.forward = forward
    spec.generate([[5, 6]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    verify = [causal for cached, n, causal in seen if cached and n > 1]
    assert verify and all(c == (topk == 1) for c in verify), seen


def test_stream_matches_generate(ckpt):
    spec = LLM(ckpt, dtype="float32", speculative=SpecConfig(num_speculative_tokens=3, topk=2))
    p = SamplingParams(max_tokens=25, temperature=0, ignore_eos=True)
    assert list(spec.stream([1, 2, 3], p)) == spec.generate([[1, 2, 3]], p)[0].token_ids


@pytest.mark.parametrize("adaptive", [False, True], ids=["fixed", "adaptive"])
def test_metrics_arithmetic(ckpt, adaptive):
    k, topk, budget = 3, 2, 5
    spec = LLM(ckpt, dtype="float32", speculative=SpecConfig(num_speculative_tokens=k, topk=topk,
                                                              num_draft_tokens=budget, adaptive=adaptive))
    out = spec.generate([[4, 5, 6], [9]], SamplingParams(max_tokens=33, temperature=0, ignore_eos=True))
    for o in out:
        m = o.metrics
        assert m.num_generated == len(o.token_ids) == 33
        if adaptive:  # fewer nodes where unlikely accepted, or none (a plain step)
            assert 0 < m.num_drafted <= (m.num_steps - 1) * budget
        else:
            assert m.num_drafted == (m.num_steps - 1) * budget  # the prefill step drafts nothing
            assert m.drafted_per_position == [m.num_steps - 1] * k
        assert m.num_accepted == sum(m.accepted_per_position)
        assert len(m.accepted_per_position) == len(m.drafted_per_position) == k
        assert all(a >= b for a, b in zip(m.accepted_per_position, m.accepted_per_position[1:]))
        assert all(a >= b for a, b in zip(m.drafted_per_position, m.drafted_per_position[1:]))
        assert all(a <= d for a, d in zip(m.accepted_per_position, m.drafted_per_position))
        # each verify step emits its accepted drafts + one bonus token, except where max_tokens cut the last one
        assert m.num_generated <= 1 + m.num_accepted + (m.num_steps - 1)
        assert m.num_generated >= m.num_steps
        assert m.mean_accepted_length == pytest.approx(m.num_generated / m.num_steps)
        assert m.draft_time > 0 and m.verify_time > 0


def test_plain_metrics(plain):
    o = plain.generate([[1, 2]], SamplingParams(max_tokens=7, temperature=0, ignore_eos=True))[0]
    assert o.metrics.num_steps == 7 and o.metrics.mean_accepted_length == 1.0 and o.metrics.num_drafted == 0


def test_bf16_spec_equals_plain_bf16(ckpt):
    prompts = [[3, 4, 5], [6]]
    p = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    ref = LLM(ckpt, speculative=None).generate(prompts, p)
    out = LLM(ckpt, speculative=SpecConfig(num_speculative_tokens=2, topk=2)).generate(prompts, p)
    assert [o.token_ids for o in out] == [r.token_ids for r in ref]


def test_invalid_requests(plain):
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=1.5)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=-2)
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpecConfig(num_speculative_tokens=0)
    with pytest.raises(ValueError, match="num_draft_tokens"):
        SpecConfig(num_speculative_tokens=2, topk=2, num_draft_tokens=9)
    with pytest.raises(ValueError, match="context"):
        plain.generate([[1] * 500], SamplingParams(max_tokens=100))
    with pytest.raises(ValueError, match="empty"):
        plain.generate([[]], SamplingParams())
    with pytest.raises(ValueError, match="outside the vocabulary"):
        plain.generate([[10_000]], SamplingParams())
    with pytest.raises(ValueError, match="tokenizer"):
        plain.generate(["text needs a tokenizer"], SamplingParams())


def test_seeded_sampling_is_reproducible(ckpt):
    spec = LLM(ckpt, dtype="float32", speculative=SpecConfig(num_speculative_tokens=3, topk=2))
    p = [SamplingParams(max_tokens=15, temperature=0.9, top_p=0.95, seed=s) for s in (1, 2, 1)]
    out = spec.generate([[5, 6], [5, 6], [5, 6]], p)
    assert out[0].token_ids == out[2].token_ids
    assert out[0].token_ids != out[1].token_ids, "another seed draws another continuation"
    again = spec.generate([[5, 6]], p[1])[0]
    assert again.token_ids == out[1].token_ids, "a seeded request does not depend on its batch"


def test_with_speculative_shares_weights_and_decodes_as_a_fresh_llm(ckpt, plain):
    spec = SpecConfig(num_speculative_tokens=3, topk=2)
    view = plain.with_speculative(spec)
    assert view.model is plain.model and view.speculative == spec and plain.speculative is None
    p = SamplingParams(max_tokens=15, temperature=0, ignore_eos=True)
    fresh = LLM(ckpt, dtype="float32", speculative=spec).generate([[9, 8]], p)[0]
    got = view.generate([[9, 8]], p)[0]
    assert got.token_ids == fresh.token_ids and got.metrics.num_accepted == fresh.metrics.num_accepted
    assert plain.with_speculative(None) is plain
