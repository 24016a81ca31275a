"""Logit processing and sampling primitives against brute-force references."""

from __future__ import annotations

import pytest
import torch
from stats import assert_matches

from specdec.sampling import SamplingBatch, gumbel_topk, process_logits, sample_from


def _reference(logits: torch.Tensor, t: float, k: int, p: float) -> torch.Tensor:
    """One row, the obvious way: temperature, keep top-k, keep the smallest prefix reaching top_p."""
    x = logits / t
    order = x.argsort(descending=True).tolist()
    if k:
        order = order[:k]
    probs = x[order].softmax(-1)
    keep, mass = [], 0.0
    for i, pr in zip(order, probs.tolist()):
        keep.append(i)
        mass += pr
        if mass >= p:
            break
    out = torch.zeros_like(x)
    out[keep] = x[keep].softmax(-1)
    return out


def test_process_logits_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 50, generator=g) * 3
    t = torch.tensor([1.0, 0.5, 2.0, 0.7, 1.0, 1.3])
    k = torch.tensor([0, 5, 0, 10, 1, 3])
    p = torch.tensor([1.0, 1.0, 0.5, 0.8, 1.0, 0.3])
    got = process_logits(logits, t, k, p)
    for i in range(6):
        ref = _reference(logits[i], t[i].item(), k[i].item(), p[i].item())
        assert torch.allclose(got[i], ref, atol=1e-6), f"seed={seed} row {i}"


def test_unfiltered_fast_path_equals_process_logits(seed):
    logits = torch.randn(4, 30, generator=torch.Generator().manual_seed(seed))
    sb = SamplingBatch(greedy=torch.zeros(2, dtype=torch.bool), any_sampled=True,
                       temperature=torch.tensor([0.7, 1.5]), top_k=torch.zeros(2, dtype=torch.long),
                       top_p=torch.ones(2), any_filtered=False)
    slow = process_logits(logits, torch.tensor([0.7, 0.7, 1.5, 1.5]), torch.zeros(4, dtype=torch.long),
                          torch.ones(4))
    assert torch.allclose(sb.probs(logits, 2), slow, atol=1e-6), f"seed={seed}"


def test_sample_from_and_gumbel_topk_distributions(seed):
    v, n = 7, 40_000
    g = torch.Generator().manual_seed(seed)
    probs = torch.rand(v, generator=g)
    probs[2] = 0  # never drawn
    probs /= probs.sum()
    ids = sample_from(probs.expand(n, v), torch.rand(n, generator=g))
    assert_matches(torch.bincount(ids, minlength=v), probs, what=f"seed={seed} sample_from")
    first, score = gumbel_topk(probs.log().expand(n, v), torch.rand(n, v, generator=g), 3)
    assert_matches(torch.bincount(first[:, 0], minlength=v), probs, what=f"seed={seed} first draw")  # a plain sample
    assert (first[:, 0] != first[:, 1]).all() and (first[:, 1] != first[:, 2]).all()  # without replacement
    # the second draw follows q with the first removed
    x0 = first[:, 0] == 0
    q1 = probs.clone()
    q1[0] = 0
    assert_matches(torch.bincount(first[x0, 1], minlength=v), q1 / q1.sum(), what=f"seed={seed} second draw")
    assert torch.equal(score[0], probs.log().topk(3).values)  # rank scores ignore which token was drawn


def test_sampling_batch_draws_once_per_request_and_step(seed):
    """Each request's uniforms for a step come from one draw of its own generator, so a seeded request draws
    the same numbers whatever else is in its batch; greedy-only batches draw nothing."""
    from specdec.params import SamplingParams

    sampled, greedy = SamplingParams(temperature=0.8, top_k=5), SamplingParams(temperature=0)
    gens = lambda: [torch.Generator().manual_seed(seed + i) for i in range(2)]
    sb = SamplingBatch.build([sampled, greedy], gens(), 10, torch.device("cpu"))
    alone = SamplingBatch.build([sampled], gens()[:1], 10, torch.device("cpu"))
    a, b = sb.uniform((3,)), sb.uniform((2, 2))
    assert a.shape == (2, 3) and b.shape == (2, 2, 2) and sb.any_filtered
    assert torch.equal(a[0], alone.uniform((3,))[0]), f"seed={seed}"
    with pytest.raises(RuntimeError, match="exhausted"):
        sb.uniform((4,))
    none = SamplingBatch.build([greedy, greedy], gens(), 10, torch.device("cpu"))
    assert not none.any_sampled and none.buffer is None
