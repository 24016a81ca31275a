"""Logprobs (vLLM's SamplingParams.logprobs): each generated token's log-probability and the top-n, under the main
model's raw distribution at its position, the same whether the token came from plain decoding, a chain or a tree,
and equal to the log_softmax of LLM.logits over the whole sequence (the slow reference)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from specdec import LLM, SamplingParams, SpecConfig

SPECS = {"plain": None, "chain": SpecConfig(3), "tree": SpecConfig(3, topk=2, num_draft_tokens=6)}


@pytest.fixture(scope="module")
def ref(shared_ckpt: Path) -> LLM:
    return LLM(shared_ckpt, dtype="float32", speculative=None)


def _check(ref: LLM, prompt: list[int], out, n: int) -> None:
    assert out.logprobs is not None and len(out.logprobs) == len(out.token_ids)
    full = ref.logits(prompt + out.token_ids[:-1]).log_softmax(-1)  # [T, V], the slow reference
    for j, (tok, d) in enumerate(zip(out.token_ids, out.logprobs)):
        row = full[len(prompt) - 1 + j]
        assert next(iter(d)) == tok, f"token {j}: the chosen token comes first"
        assert d[tok] == pytest.approx(row[tok].item(), abs=1e-4), f"token {j}"
        top = row.topk(n)
        for t, v in zip(top.indices.tolist(), top.values.tolist()):
            assert d[t] == pytest.approx(v, abs=1e-4), f"token {j}, top token {t}"
        assert set(d) == set(top.indices.tolist()) | {tok}


@pytest.mark.parametrize("name", SPECS)
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_logprobs_equal_the_full_sequence_reference(shared_ckpt: Path, ref: LLM, name: str, temperature: float,
                                                    seed: int) -> None:
    """A batch where only some requests ask (n = 0, 2 or 5); sampled tokens get the raw distribution's
    log-probabilities, not the tempered one's."""
    rng = random.Random(seed)
    llm = LLM(shared_ckpt, dtype="float32", speculative=SPECS[name])
    prompts = [[rng.randrange(2, 256) for _ in range(rng.randint(1, 20))] for _ in range(4)]
    ns = [0, None, 2, 5]
    params = [SamplingParams(max_tokens=rng.randint(1, 16), temperature=temperature, seed=seed + i,
                             ignore_eos=True, logprobs=n) for i, n in enumerate(ns)]
    for prompt, out, n in zip(prompts, llm.generate(prompts, params), ns):
        if n is None:
            assert out.logprobs is None
        else:
            _check(ref, prompt, out, n)


def test_logprobs_end_where_the_tokens_end_and_stream_per_step(shared_ckpt: Path, ref: LLM) -> None:
    """A stop token inside an accepted run cuts the logprobs with the tokens; stream_steps gives each step's."""
    llm = LLM(shared_ckpt, dtype="float32", speculative=SPECS["chain"])
    prompt = [5, 9, 200]
    full = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0].token_ids
    stop = full[7]
    out = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, logprobs=1,
                                                stop_token_ids=[stop]))[0]
    assert out.token_ids == full[:full.index(stop) + 1]
    _check(ref, prompt, out, 1)
    steps = list(llm.stream_steps(prompt, SamplingParams(max_tokens=20, temperature=0, ignore_eos=True,
                                                         logprobs=1)))
    assert all(len(s.logprobs) == len(s.token_ids) for s in steps)
    merged = [d for s in steps for d in s.logprobs]
    assert [next(iter(d)) for d in merged] == full


@pytest.mark.parametrize("bad", [-1, 21, True, 2.0])
def test_bad_logprobs_are_refused(bad) -> None:
    with pytest.raises(ValueError, match="SamplingParams.logprobs must be None or an integer in"):
        SamplingParams(logprobs=bad)


def test_logprobs_are_finite_and_normalized(shared_ckpt: Path) -> None:
    """logprobs=20 on a tiny vocabulary: values are log-probabilities (<= 0, their exp sums to at most 1)."""
    llm = LLM(shared_ckpt, dtype="float32", speculative=SPECS["tree"])
    out = llm.generate([[3, 4]], SamplingParams(max_tokens=6, temperature=0.7, seed=3, logprobs=20))[0]
    for d in out.logprobs:
        v = torch.tensor(list(d.values()))
        assert torch.isfinite(v).all() and (v <= 0).all() and v.exp().sum() <= 1 + 1e-5


@pytest.mark.parametrize("chunk", [512, 7])
def test_prompt_logprobs_equal_the_reference(shared_ckpt: Path, ref: LLM, chunk: int) -> None:
    """prompt_logprobs: None for the first prompt token, then each token's log-probability and the top-n given the
    tokens before it, the same when the prompt is prefilled in chunks of 7; such a request skips the prefix cache."""
    llm = LLM(shared_ckpt, dtype="float32", speculative=SPECS["chain"], prefill_chunk=chunk)
    prompt = [(7 * i) % 250 + 2 for i in range(150)]
    llm.generate([prompt], SamplingParams(max_tokens=2))  # its blocks are now cached
    out = llm.generate([prompt, [4, 5]], [SamplingParams(max_tokens=3, prompt_logprobs=2),
                                          SamplingParams(max_tokens=3)])
    assert out[0].metrics.num_cached_tokens == 0 and out[1].prompt_logprobs is None
    lps = out[0].prompt_logprobs
    assert len(lps) == len(prompt) and lps[0] is None
    full = ref.logits(prompt).log_softmax(-1)
    for j in range(1, len(prompt)):
        row, d = full[j - 1], lps[j]
        assert next(iter(d)) == prompt[j] and d[prompt[j]] == pytest.approx(row[prompt[j]].item(), abs=1e-4)
        assert set(d) == set(row.topk(2).indices.tolist()) | {prompt[j]}, f"prompt token {j}"


def test_prompt_logprobs_survive_preemption(shared_ckpt: Path) -> None:
    """A pool that preempts: recomputed prompts do not score their tokens twice."""
    prompts = [[(5 * i + k) % 250 + 2 for i in range(90)] for k in range(3)]
    params = SamplingParams(max_tokens=60, temperature=0, ignore_eos=True, prompt_logprobs=0)
    roomy = LLM(shared_ckpt, dtype="float32", speculative=SPECS["tree"]).generate(prompts, params)
    tight = LLM(shared_ckpt, dtype="float32", speculative=SPECS["tree"], kv_cache_tokens=384, prefill_chunk=32)
    out = tight.generate(prompts, params)
    assert sum(o.metrics.num_preemptions for o in out) > 0
    for a, b in zip(out, roomy):
        assert len(a.prompt_logprobs) == 90 and a.token_ids == b.token_ids
        for x, y in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:]):
            assert list(x) == list(y) and list(x.values()) == pytest.approx(list(y.values()), abs=1e-4)
