"""Measurements behind `specdec bench` and `specdec demo`: timed runs, interleaved A/B latency, acceptance
statistics per draft position, and a sweep over draft shapes. Results are plain JSON-able dicts.

Every configuration decodes with its own Engine over one loaded model (`LLM.with_speculative`), so an A/B comparison
or a sweep loads the checkpoint once and every configuration runs on the same weights, warm caches included.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from tqdm import tqdm

from .api import LLM
from .outputs import Metrics
from .params import SamplingParams, SpecConfig

# `bench acceptance --sweep`: chains of depth 1-4, then trees at a few node budgets
SWEEP_GRID: tuple[SpecConfig, ...] = (
    SpecConfig(1), SpecConfig(2), SpecConfig(3), SpecConfig(4),
    SpecConfig(2, topk=2), SpecConfig(3, topk=2, num_draft_tokens=4), SpecConfig(3, topk=2),
    SpecConfig(4, topk=2, num_draft_tokens=6),
)


def spec_dict(spec: SpecConfig | None) -> dict:
    if spec is None:
        return {"mtp": False}
    return {"mtp": True, "num_speculative_tokens": spec.num_speculative_tokens, "topk": spec.topk,
            "num_draft_tokens": spec.budget}


@dataclass(frozen=True)
class Run:
    """One generate call: its requests' metrics and its wall time (a batch's requests share it)."""

    metrics: list[Metrics]
    seconds: float


def timed(llm: LLM, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams]) -> Run:
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    return Run([o.metrics for o in outs], time.perf_counter() - t0)


def batches(prompts: list, size: int) -> list[list]:
    if size < 1:
        raise ValueError(f"--batch-size {size}: must be a positive integer")
    return [prompts[i:i + size] for i in range(0, len(prompts), size)]


def summarize(runs: list[Run]) -> dict:
    """tokens_per_s: generated tokens / wall time; ms_per_token: per request, (wall - time to first token) per token
    after the first, averaged; ttft_ms: mean time to first token; mean_accepted_length: tokens per main-model step
    (the prefill counts as one, as in Metrics); acceptance_rate: accepted / drafted (None without MTP);
    ms_per_step, draft_ms_per_step, verify_ms_per_step: the engine time of one decode step (verify steps, the
    prefill left out) and its drafting (MTP forwards, trees, the MTP cache extend) and verifying (the main forward,
    acceptance, commit) parts."""
    ms = [m for r in runs for m in r.metrics]
    steps = sum(m.num_decode_steps for m in ms)
    per_step = lambda field: 1e3 * sum(getattr(m, field) for m in ms) / steps if steps else None
    seconds = sum(r.seconds for r in runs)
    tokens = sum(m.num_generated for m in ms)
    tpot = [(r.seconds - m.first_token_time) / (m.num_generated - 1)
            for r in runs for m in r.metrics if m.num_generated > 1]
    drafted = sum(m.num_drafted for m in ms)
    return {
        "tokens_per_s": tokens / seconds if seconds else 0.0,
        "ms_per_token": 1e3 * sum(tpot) / len(tpot) if tpot else None,
        "ttft_ms": 1e3 * sum(m.first_token_time for m in ms) / len(ms),
        "mean_accepted_length": tokens / max(1, sum(m.num_steps for m in ms)),
        "acceptance_rate": sum(m.num_accepted for m in ms) / drafted if drafted else None,
        "ms_per_step": (per_step("draft_time") or 0) + (per_step("verify_time") or 0) if steps else None,
        "draft_ms_per_step": per_step("draft_time"), "verify_ms_per_step": per_step("verify_time"),
        "num_requests": len(ms), "num_tokens": tokens, "time_s": seconds,
    }


def _bar(total: int, desc: str) -> tqdm:
    return tqdm(total=total, desc=desc, file=sys.stderr, disable=None, leave=False)  # silent when not a terminal


def _requests(prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams],
              batch_size: int) -> list[tuple[list, list[SamplingParams]]]:
    """(prompts, their SamplingParams) per batch."""
    ps = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
    return list(zip(batches(prompts, batch_size), batches(ps, batch_size)))


def latency_ab(mtp: LLM, plain: LLM, prompts: list[str | list[int]],
               params: SamplingParams | list[SamplingParams], runs: int = 3, warmup: int = 1, batch_size: int = 1,
               log: Callable[[str], None] | None = None) -> dict:
    """The same requests with and without MTP, after `warmup` untimed passes of the first batch on each; within a
    run the two alternate batch by batch, who goes first swapping every batch (ABBA), so drift hits both alike.
    `log` (if given) gets one line per finished run.

    Returns {"speedup", "speedup_per_run", "mean_accepted_length", "with_mtp", "without_mtp"}: speedup is the
    ratio of tokens/s measured in this same call; with_mtp is summarize + acceptance_stats, without_mtp summarize."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"--runs {runs} / warm-up {warmup}: need runs >= 1 and warm-up >= 0")
    groups = _requests(prompts, params, batch_size)
    for _ in range(warmup):
        timed(mtp, *groups[0])
        timed(plain, *groups[0])
    a: list[Run] = []
    b: list[Run] = []
    per_run = []
    with _bar(2 * runs * len(groups), "bench latency") as bar:
        for r in range(runs):
            ra: list[Run] = []
            rb: list[Run] = []
            pair = ((mtp, ra), (plain, rb))
            for i, g in enumerate(groups):
                for x, out in pair if (r * len(groups) + i) % 2 == 0 else pair[::-1]:
                    out.append(timed(x, *g))
                    bar.update()
            sa, sb = summarize(ra)["tokens_per_s"], summarize(rb)["tokens_per_s"]
            per_run.append(sa / max(sb, 1e-12))
            if log is not None:
                log(f"run {r + 1}/{runs}: with MTP {sa:.1f} tokens/s, without {sb:.1f} tokens/s, "
                    f"{per_run[-1]:.2f}x")
            a += ra
            b += rb
    with_mtp = summarize(a) | acceptance_stats([m for run in a for m in run.metrics])
    without = summarize(b)
    return {"speedup": with_mtp["tokens_per_s"] / max(without["tokens_per_s"], 1e-12), "speedup_per_run": per_run,
            "mean_accepted_length": with_mtp["mean_accepted_length"],
            "with_mtp": with_mtp | spec_dict(mtp.speculative), "without_mtp": without | spec_dict(None)}


def acceptance_stats(metrics: list[Metrics]) -> dict:
    """Acceptance per draft depth over every verify step (the prefill verifies nothing and is left out).

    acceptance_rate_per_position[d]: share of verify steps whose depth-d draft was accepted (acceptance is a prefix,
    so the curve never rises); conditional_acceptance_rate_per_position[d]: the same given depth d-1 was accepted;
    accepted_length_histogram[L]: verify steps that emitted L tokens (L - 1 accepted drafts plus the bonus)."""
    k = max((len(m.accepted_per_position) for m in metrics), default=0)
    steps = sum(max(m.num_steps - 1, 0) for m in metrics)
    at_least = [steps] + [sum(m.accepted_per_position[d] for m in metrics if d < len(m.accepted_per_position))
                          for d in range(k)]
    drafted = sum(m.num_drafted for m in metrics)
    tokens = sum(m.num_generated for m in metrics)
    return {
        "mean_accepted_length": tokens / max(1, sum(m.num_steps for m in metrics)),
        "acceptance_rate": sum(m.num_accepted for m in metrics) / drafted if drafted else None,
        "acceptance_rate_per_position": [n / steps if steps else 0.0 for n in at_least[1:]],
        "conditional_acceptance_rate_per_position": [n / p if p else 0.0 for p, n in zip(at_least, at_least[1:])],
        "accepted_length_histogram": {str(a + 1): at_least[a] - (at_least[a + 1] if a < k else 0)
                                      for a in range(k + 1)},
        "num_verify_steps": steps, "num_tokens": tokens, "num_requests": len(metrics),
    }


def sweep(llm: LLM, specs: list[SpecConfig | None], prompts: list[str | list[int]],
          params: SamplingParams | list[SamplingParams], seed: int = 0, batch_size: int = 1,
          runs: int = 1) -> list[dict]:
    """Every configuration over the same requests (each warmed up on the first batch; configurations take turns
    batch by batch, the order rotating). One dict per configuration: spec_dict + summarize + acceptance_stats."""
    llms = [llm.with_speculative(s, seed) for s in specs]
    groups = _requests(prompts, params, batch_size)
    for x in llms:
        timed(x, *groups[0])
    results: list[list[Run]] = [[] for _ in llms]
    with _bar(runs * len(groups) * len(llms), "bench sweep") as bar:
        for r in range(runs):
            for i, g in enumerate(groups):
                shift = (r * len(groups) + i) % len(llms)
                for j in list(range(shift, len(llms))) + list(range(shift)):
                    results[j].append(timed(llms[j], *g))
                    bar.update()
    return [spec_dict(s) | acceptance_stats([m for run in res for m in run.metrics]) | summarize(res)
            for s, res in zip(specs, results)]
