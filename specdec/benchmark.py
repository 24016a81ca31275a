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

# `bench acceptance --sweep`: fixed chains of depth 1-4, then fixed trees at a few node budgets
SWEEP_GRID: tuple[SpecConfig, ...] = tuple(SpecConfig(k, topk=w, num_draft_tokens=n, adaptive=False) for k, w, n in (
    (1, 1, None), (2, 1, None), (3, 1, None), (4, 1, None), (2, 2, None), (3, 2, 4), (3, 2, None), (4, 2, 6)))


def spec_dict(spec: SpecConfig | None) -> dict:
    if spec is None:
        return {"mtp": False}
    return {"mtp": True, "num_speculative_tokens": spec.num_speculative_tokens, "topk": spec.topk,
            "num_draft_tokens": spec.budget, "adaptive": spec.adaptive}


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
               log: Callable[[str], None] | None = None, fixed: LLM | None = None) -> dict:
    """The same requests with and without MTP (and, given `fixed`, a second MTP configuration: adaptive speculation's
    fixed shape), after `warmup` untimed passes of the first batch on each; within a run they take turns batch by
    batch, who goes first rotating every batch, so drift hits all alike. `log` (if given) gets one line per run.

    Returns {"speedup", "speedup_per_run", "mean_accepted_length", "with_mtp", "without_mtp"} and, with fixed,
    {"fixed_mtp", "fixed_speedup", "fixed_speedup_per_run", "adaptive_vs_fixed", "adaptive_vs_fixed_per_run"}:
    speedups are ratios of tokens/s measured in this same call (speedup: with_mtp over without_mtp); with_mtp and
    fixed_mtp are summarize + acceptance_stats, without_mtp summarize."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"--runs {runs} / warm-up {warmup}: need runs >= 1 and warm-up >= 0")
    groups = _requests(prompts, params, batch_size)
    llms = {"with_mtp": mtp, **({"fixed_mtp": fixed} if fixed is not None else {}), "without_mtp": plain}
    names = list(llms)
    for _ in range(warmup):
        for x in llms.values():
            timed(x, *groups[0])
    done: dict[str, list[Run]] = {n: [] for n in names}
    per_run: dict[str, list[float]] = {"speedup": [], "fixed_speedup": [], "adaptive_vs_fixed": []}
    with _bar(len(names) * runs * len(groups), "bench latency") as bar:
        for r in range(runs):
            this: dict[str, list[Run]] = {n: [] for n in names}
            for i, g in enumerate(groups):
                shift = (r * len(groups) + i) % len(names)
                for n in names[shift:] + names[:shift]:
                    this[n].append(timed(llms[n], *g))
                    bar.update()
            rate = {n: summarize(this[n])["tokens_per_s"] for n in names}
            per_run["speedup"].append(rate["with_mtp"] / max(rate["without_mtp"], 1e-12))
            if fixed is not None:
                per_run["fixed_speedup"].append(rate["fixed_mtp"] / max(rate["without_mtp"], 1e-12))
                per_run["adaptive_vs_fixed"].append(rate["with_mtp"] / max(rate["fixed_mtp"], 1e-12))
            if log is not None:
                log(f"run {r + 1}/{runs}: " + ", ".join(f"{n.replace('_', ' ')} {rate[n]:.1f} tokens/s" for n in names)
                    + f", {per_run['speedup'][-1]:.2f}x")
            for n in names:
                done[n] += this[n]
    out = {n: summarize(done[n]) | (acceptance_stats([m for run in done[n] for m in run.metrics])
                                    if n != "without_mtp" else {}) | spec_dict(llms[n].speculative) for n in names}
    plain_rate = max(out["without_mtp"]["tokens_per_s"], 1e-12)
    result = {"speedup": out["with_mtp"]["tokens_per_s"] / plain_rate, "speedup_per_run": per_run["speedup"],
              "mean_accepted_length": out["with_mtp"]["mean_accepted_length"], **out}
    if fixed is not None:
        result |= {"fixed_speedup": out["fixed_mtp"]["tokens_per_s"] / plain_rate,
                   "fixed_speedup_per_run": per_run["fixed_speedup"],
                   "adaptive_vs_fixed": out["with_mtp"]["tokens_per_s"] / max(out["fixed_mtp"]["tokens_per_s"], 1e-12),
                   "adaptive_vs_fixed_per_run": per_run["adaptive_vs_fixed"]}
    return result


def acceptance_stats(metrics: list[Metrics]) -> dict:
    """Acceptance per draft depth over every verify step (the prefill verifies nothing and is left out).

    acceptance_rate_per_position[d]: share of verify steps whose depth-d draft was accepted (acceptance is a prefix,
    so the curve never rises); conditional_acceptance_rate_per_position[d]: the same given depth d-1 was accepted;
    draft_rate_per_position[d]: share of verify steps that drafted depth d (below 1 where adaptive speculation
    drafted less, or decoded plainly); accepted_length_histogram[L]: verify steps that emitted L tokens (L - 1
    accepted drafts plus the bonus); num_drafted: draft nodes verified."""
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
        "draft_rate_per_position": [sum(m.drafted_per_position[d] for m in metrics if d < len(m.drafted_per_position))
                                    / steps if steps else 0.0 for d in range(k)],
        "accepted_length_histogram": {str(a + 1): at_least[a] - (at_least[a + 1] if a < k else 0)
                                      for a in range(k + 1)},
        "num_verify_steps": steps, "num_drafted": drafted, "num_tokens": tokens, "num_requests": len(metrics),
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
