"""Adaptive speculation (issue 18): rank 0's draft decisions for each decode step, from the engine's own measured
costs and acceptance (cost_model.py), shipped in the step plan (DraftShape.gate, Decode.depth and Decode.floor).

For a batch of B requests, with its bucket's estimates (verify seconds per token c_v, seconds per draft step c_d
after the first head, the tokens per second R of recent drafting steps, the mean acceptance a, the seconds c_u a
plain step's MTP row costs the catch-up):
  - plain decoding when a step of one token per request is estimated to yield more tokens per second than drafting
    steps did, P = B / (plain_step + B c_u) > R: verifying more tokens no longer pays (a large batch,
    compute-bound). The MTP rows a plain step leaves count in its cost (the drafting step after it extends them),
    and the choice has a margin: a bucket that drafts turns plain only when P > R (1 + MARGIN), one that decodes
    plainly drafts again only when R > P (1 + MARGIN), so timing noise between two near rates cannot flip it step
    by step (each return from plain steps pays a catch-up); it also leaves room for steps' untimed share
    (scheduling, emitting), which a drafting step spreads over more tokens;
  - else each request may draft the configured depth, gated: a node is verified when its estimated path
    acceptance reaches the floor R' c_v (the tokens its verification costs at the best rate known,
    R' = max(R, P)), and a draft step runs while the nodes it would add are expected to pay for it beyond their
    own verification: the sum over the chains it extends of p a - floor, where positive (p: the chain's path
    acceptance, so p a its next node's), reaches R' c_d. Adding whatever yields more than the current rate is
    Dinkelbach's rule for maximizing a ratio, so the rate climbs to the best these estimates allow;
  - a request drafts at most max_tokens - 1 more than it has; a seeded sampled request drafts the whole shape
    without a floor at every step, as a fixed shape does, so that its output depends on its seed alone, not on
    load, timings or how near its end it is.
The first bucket to decode sweeps the depths 1..k ungated until WARMUP of its drafting steps were timed (the fits
need the tokens verified and the draft steps to vary); a bucket with fewer decides as the nearest bucket with that
many would, at that bucket's mean batch (a batch that wanders between sizes does not warm up each), while its own
steps fill its fits. A bucket that decodes plainly drafts every EXPLORE-th step as it would if drafting paid (gated),
so that the drafting rate it weighs is what gated drafting reaches now (an ungated step at full depth, the worst
shape under load, kept a batch of 16 plain once it had turned plain). A calibration cell whose nodes the floors keep
from being verified drifts back to its mode's mean as its counts decay, and is verified again once that clears the
floor, so the gated steps need no ungated ones to stay calibrated.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from .cost_model import BUCKETS, MARGIN_EDGES, MODES, NUM_BINS, RANKS, Calibration, CostModel, Estimates, bucket
from .request import Request
from .step_clock import StepClock
from .step_plan import DraftShape, Gate

WARMUP = 8
EXPLORE = 32
MARGIN = 0.1


@dataclass(frozen=True)
class BucketStats:
    """One batch-size bucket as /metrics shows it: decode steps and request-steps an MTP engine ran there, draft
    nodes verified and accepted, the last step's choice (depth 0: plain decoding; floor None: ungated), and the
    cost model's estimates (None before the bucket's first drafting step)."""

    batch: str
    steps: int
    request_steps: int
    drafted: int
    accepted: int
    depth: int
    floor: float | None
    estimates: Estimates | None


@dataclass(frozen=True)
class DraftingStats:
    """An MTP engine's drafting: whether adaptive, its buckets with steps, the calibration table
    (Gate.calibration's layout) and the mean acceptance of verified draft nodes."""

    adaptive: bool
    buckets: tuple[BucketStats, ...]
    calibration: tuple[float, ...]
    acceptance: float


@dataclass
class _Bucket:
    steps: int = 0
    request_steps: int = 0
    drafted: int = 0
    accepted: int = 0
    depth: int = 0
    floor: float | None = None
    plain: bool = False  # its last decision from the estimates was plain decoding


class DraftPolicy:
    """Rank 0's drafting decisions for an engine whose configured shape is `shape` (the cap); with adaptive=False
    every step drafts it whole. Either way it measures (costs, acceptance, per-bucket counts) for /metrics."""

    def __init__(self, shape: DraftShape, adaptive: bool):
        self.shape, self.adaptive = shape, adaptive
        self.costs = CostModel()
        self.calibration = Calibration()
        self._buckets = [_Bucket() for _ in BUCKETS]

    def plan(self, reqs: list[Request], first: Sequence[bool]
             ) -> tuple[DraftShape | None, list[int] | None, list[float | None] | None]:
        """This step's draft shape for the decode batch reqs (first[b]: b samples its first token this step, so
        it has emitted one more than it shows) and, adaptive, each request's depth and floor; (None, None, None):
        decode plainly."""
        b = len(reqs)
        k = self.shape.k
        stats = self._buckets[bucket(b)]
        stats.steps += 1
        stats.request_steps += b
        stats.depth, stats.floor = k, None
        if not self.adaptive:
            return self.shape, None, None
        depth, floor, step_cost = self._choose(b, stats.steps - 1)
        stats.depth, stats.floor = depth, floor
        depths, floors = [], []
        for r, f in zip(reqs, first):
            fixed = not r.params.greedy and r.params.seed is not None
            left = r.params.max_tokens - len(r.generated) - f  # tokens it may still emit; a step emits depth + 1
            depths.append(k if fixed else max(min(depth, left - 1), 0))
            floors.append(None if fixed else floor)
        if not any(depths):
            return None, None, None
        gate = Gate(self.calibration.table(), self.calibration.mean(), step_cost)
        return replace(self.shape, gate=gate), depths, floors

    def _choose(self, b: int, step: int) -> tuple[int, float | None, float]:
        """(depth, floor, step cost) for the step-th step of a batch of b (module docstring)."""
        k = self.shape.k
        src = self._source(bucket(b))
        if src is None:
            return 1 + step % k, None, 0.0
        s = self._buckets[src]
        batch = b if src == bucket(b) else round(s.request_steps / s.steps)
        e = self.costs.estimates(batch)
        cost = e.plain_step + batch * e.catch_up
        plain = batch / cost if cost > 0 else 0.0
        stats = self._buckets[bucket(b)]
        stats.plain = plain > e.throughput * (1 + MARGIN) if not stats.plain else plain * (1 + MARGIN) >= e.throughput
        if stats.plain and step % EXPLORE:
            return 0, None, 0.0
        rate = max(plain, e.throughput)
        return k, rate * e.per_token, rate * e.draft_step

    def _source(self, i: int) -> int | None:
        """The bucket whose estimates decide for bucket i: i once WARMUP of its drafting steps were timed, else the
        nearest that has (the larger of two as near); None before any has."""
        warm = [j for j, f in enumerate(self.costs.draft) if f.n >= WARMUP]
        return i if i in warm else min(warm, key=lambda j: (abs(j - i), -j), default=None)

    def timed(self, clock: StepClock, batch: int, marks: tuple[Any, ...], tokens: int, steps: int,
              emitted: int, caught_up: int) -> None:
        """A decode step's phase marks (runner.StepTimes.decode: start and end of a plain step; start, after the
        catch-up, after the first head's draft, after propose, after commit, after the MTP extend of a drafting one)
        into the cost model, once their durations are known (StepClock: no sync). tokens: verified over the batch;
        steps: MTP forwards after the first head; emitted: tokens committed; caught_up: MTP rows the catch-up
        extended (those of earlier plain steps). The catch-up has a fit of its own: it follows how many plain steps
        came before, not this step's drafting, and in the draft fit it would make drafting look dearer the longer a
        bucket decodes plainly; it counts in the cost of plain steps instead."""
        if len(marks) == 2:
            clock.then(lambda d: self.costs.add_plain(batch, d[0]), marks)
            return
        if caught_up:
            clock.then(lambda d: self.costs.add_catch_up(caught_up, d[0]), marks[:2])
        clock.then(lambda d: self.costs.add_drafting(batch, tokens, steps, emitted, *d[1:], head_s=d[0]), marks[1:])

    def verified(self, greedy: Sequence[bool], sizes: Sequence[int], codes: Sequence[Sequence[int]] | None,
                 parents: Sequence[Sequence[int]] | None, paths: Sequence[Sequence[int]]) -> None:
        """A verify step's outcome for its batch: each request's nodes (root included), and (gated drafts) each
        draft node's calibration cell and parent, and its accepted path (root first). Every node whose parent was
        accepted is one calibration outcome: accepted or not."""
        stats = self._buckets[bucket(len(sizes))]
        stats.drafted += sum(sizes) - len(sizes)
        stats.accepted += sum(len(p) - 1 for p in paths)
        if codes is None:
            return
        outcomes = []
        for g, cs, ps, path in zip(greedy, codes, parents, paths):
            on = set(path)
            outcomes += [(0 if g else 1, c, i + 1 in on) for i, (c, p) in enumerate(zip(cs, ps)) if p in on]
        self.calibration.add(outcomes)

    def stats(self) -> DraftingStats:
        acceptance = self.calibration.mean()
        rows = tuple(BucketStats(BUCKETS[i], s.steps, s.request_steps, s.drafted, s.accepted, s.depth, s.floor,
                                 self.costs.estimates(round(s.request_steps / s.steps))
                                 if self.costs.draft[i].seen else None)  # at the bucket's mean batch
                     for i, s in enumerate(self._buckets) if s.steps)
        return DraftingStats(self.adaptive, rows, self.calibration.table(), acceptance)


def calibration_cells(topk: int) -> list[tuple[str, int, str, int]]:
    """(mode, sibling rank, margin bin label, index into Gate.calibration) of the cells a topk shape uses."""
    labels = [f"<={e:g}" for e in MARGIN_EDGES] + [f">{MARGIN_EDGES[-1]:g}"]
    return [(mode, r, labels[b], (m * RANKS + r) * NUM_BINS + b) for m, mode in enumerate(MODES)
            for r in range(min(topk, RANKS)) for b in range(NUM_BINS)]
