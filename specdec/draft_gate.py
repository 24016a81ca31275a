"""Adaptive speculation's gates inside the drafter (drafter.py): which draft nodes a step verifies and whether
another draft step pays, from rank 0's shipped parameters (step_plan.Gate, each request's depth and floor) and the
draft distributions every rank computes alike, so every rank drafts the same ragged batch.

A node's estimated acceptance is its calibrated confidence (cost_model.py: the margin between its distribution's
rank-r and rank-r+1 log-probabilities, per sibling rank r, margin bin and greedy/sampled), its path's the product
along it. A chain's gate runs on the host, as small Python over one read a step of each request's two best scores
(a step's cost on a CPU is a handful of torch ops per node otherwise); a tree's, over frontiers and candidate sets,
on the device.
"""

from __future__ import annotations

import bisect
import math

import torch

from .cost_model import MARGIN_EDGES, MODES, NUM_BINS, RANKS, gate_code
from .sampling import SamplingBatch
from .step_plan import Gate


class ChainGate:
    """A gated chain batch on the host. Request b drafts until its chain holds depth[b] nodes or a node's path
    acceptance falls below floor[b] (None: no floor, it drafts its whole depth); lens[b] and codes[b] (each kept
    node's calibration cell) are what it kept. greedy[b]: the request's row is greedy."""

    def __init__(self, gate: Gate, depth: list[int], floor: list[float | None], greedy: list[bool]):
        self.table, self.acceptance, self.step_cost = gate.calibration, gate.acceptance, gate.step_cost
        self.depth, self.floor = depth, floor
        self.base = [(0 if g else 1) * RANKS * NUM_BINS for g in greedy]
        self.p = [1.0] * len(depth)
        self.live = [d > 0 for d in depth]
        self.lens = [0] * len(depth)
        self.codes: list[list[int]] = [[] for _ in depth]

    def add(self, top: list[list[float]]) -> None:
        """One draft step's scores, [best, next] log q per request: each live chain's new node is kept while its
        path acceptance reaches the floor, and the chain ends at its depth or at the first node that does not."""
        for b, (a, nxt) in enumerate(top):
            if not self.live[b]:
                continue
            code = gate_code(0, bisect.bisect_left(MARGIN_EDGES, a - nxt if nxt > -math.inf else math.inf))
            self.p[b] *= self.table[self.base[b] + code] if a > -math.inf else 0.0
            f = self.floor[b]
            if f is not None and self.p[b] < f:
                self.live[b] = False
                continue
            self.lens[b] += 1
            self.codes[b].append(code)
            self.live[b] = self.lens[b] < self.depth[b]

    def go(self) -> bool:
        """Whether another draft step pays: some chain without a floor goes on, or the gated ones that go on are
        expected to yield the step cost beyond their nodes' floors: each next node's path acceptance is its chain's
        times the mean acceptance, and it pays its own verification where it clears its floor."""
        total, gated = 0.0, False
        for b, on in enumerate(self.live):
            if on:
                f = self.floor[b]
                if f is None:
                    return True
                gated = True
                total += max(self.p[b] * self.acceptance - f, 0.0)
        return gated and total >= self.step_cost  # no chain left: nothing to extend


class TreeGate:
    """One step's gate for a tree, on the device: the calibration table [mode, cell], each row's mode, depth, the
    log of its floor (-inf where the request has none: every path passes) and whether it is fixed (no floor), and
    the step cost."""

    def __init__(self, gate: Gate, depth: list[int], floor: list[float | None], sb: SamplingBatch,
                 device: torch.device):
        self.table = torch.tensor(gate.calibration, dtype=torch.float64, device=device).view(len(MODES), -1)
        self.mode = (~sb.greedy).long()
        self.depth = torch.tensor(depth, device=device)
        self.fixed = torch.tensor([f is None for f in floor], device=device)
        floors = torch.tensor([-1.0 if f is None else f for f in floor], dtype=torch.float64, device=device)
        self.floor = torch.where(self.fixed, 0.0, floors)
        self.log_floor = torch.where(self.fixed, float("-inf"), floors.clamp(min=0).log())
        self.acceptance, self.step_cost = gate.acceptance, gate.step_cost
        self.edges = torch.tensor(MARGIN_EDGES, device=device)

    def cells(self, top: torch.Tensor, w: int) -> tuple[torch.Tensor, torch.Tensor]:
        """top [B, r, w+1]: each draft distribution's w+1 best log-probabilities (its rank scores) -> each of its
        w children's calibration cell and estimated acceptance ([B, r * w] each; 0 for a child it cannot draw)."""
        b = top.shape[0]
        margin = (top[..., :w] - top[..., 1:]).float().nan_to_num(nan=float("inf"))  # -inf - -inf: none drawable
        rank = torch.arange(w, device=top.device).clamp(max=RANKS - 1)
        codes = (rank * NUM_BINS + torch.bucketize(margin, self.edges)).reshape(b, -1)
        alpha = self.table[self.mode].gather(1, codes)
        return codes, torch.where(torch.isfinite(top[..., :w]).reshape(b, -1), alpha, 0.0)

    def score(self, lq: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """A tree node's own ranking score [B, n]: log of its estimated acceptance, or (a request without a floor)
        its draft log-probability, as an ungated tree ranks, so that its tree never depends on the calibration."""
        return torch.where(self.fixed[:, None], lq.double(), alpha.log())

    def go(self, can: torch.Tensor, p: torch.Tensor) -> bool:
        """Whether another draft step pays, given which chains (or frontier nodes) can go on (can [B] or [B, F])
        and their path acceptance p: some fixed request can, or the gated ones are expected to yield step_cost
        beyond their children's floors (ChainGate.go). One host read."""
        shape = (-1, *[1] * (can.dim() - 1))
        fixed, floor = self.fixed.view(shape), self.floor.view(shape)
        gated = can & ~fixed
        surplus = ((p * self.acceptance - floor).clamp(min=0) * gated).sum()
        return bool(((can & fixed).any() | (gated.any() & (surplus >= self.step_cost))).item())
