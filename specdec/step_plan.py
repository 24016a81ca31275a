"""The step plan: what rank 0 decided for one engine step, as every rank's forward passes need it (vLLM's
SchedulerOutput; nano-vllm schedules on rank 0 alone too).

Only rank 0 schedules. Each engine step it ships one StepPlan to the other ranks over a Channel (pipes to the workers
it spawned on this node, else one broadcast on the control group: launcher.py), and every rank, rank 0 included,
runs the plan's forwards (runner.py). Within the step,
each phase that decides tokens (a prompt's first token, a verify step's acceptance) has rank 0 decide and ship a
Commit (step_result.py). A rank keeps, per request, only what its forwards need between steps: the block table the
plans built, and the drafter's last outputs. Nothing a rank measures for itself (free memory, timings) decides
anything.

`Score` runs one sequence outside the engine (LLM.logits, LLM.mtp_logits); None, shipped in place of a plan, tells
the other ranks that rank 0 closed its LLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from .params import SpecConfig


class Channel(Protocol):
    """How rank 0's decisions reach the other ranks: rank 0 sends each message, every other rank receives them in
    order."""

    def send(self, obj: Any) -> None: ...

    def recv(self) -> Any: ...


@dataclass(frozen=True)
class Gate:
    """Adaptive speculation's parameters for one step, decided on rank 0 from its measured costs and acceptance
    (draft_policy.py) and shipped, so that every rank drafts alike. calibration: the estimated acceptance of a
    draft node given its parent was accepted, flattened [mode (greedy, sampled), sibling rank, margin bin]
    (cost_model.Calibration); acceptance: the mean of that estimate (what a node not yet drafted is expected to
    be accepted with); step_cost: the tokens a draft step must be expected to yield beyond what verifying its nodes
    costs (each node's share is its request's floor), or it is not run."""

    calibration: tuple[float, ...]
    acceptance: float
    step_cost: float


@dataclass(frozen=True)
class DraftShape:
    """What the drafter builds for the decode batch: at most k draft steps, topk children per expanded node, at
    most `budget` draft nodes verified per request. These are the engine's configured shape: they fix the rows a
    step writes and the uniforms a sampled row draws, whatever a step drafts. gate (adaptive speculation): this
    step's parameters, with each request's depth and acceptance floor beside Decode.reqs; None: every request
    drafts the whole shape."""

    k: int
    topk: int
    budget: int
    gate: Gate | None = None

    @classmethod
    def of(cls, spec: SpecConfig) -> DraftShape:
        return cls(spec.num_speculative_tokens, spec.topk, spec.budget)

    @property
    def rows(self) -> int:
        """Rows a decode step writes past a request's committed ones: the tree's nodes in the main cache, the
        expansions in the MTP cache."""
        return 1 + max(self.budget, (self.k - 1) * self.topk)

    def draft_draws(self, vocab_size: int) -> int:
        """Uniforms a sampled request's drafting takes per step (its acceptance uniforms start after them)."""
        return (1 + (self.k - 1) * self.topk) * vocab_size

    def draws(self, vocab_size: int) -> int:
        """Uniforms a sampled request draws per decode step: draft rows over the vocabulary, acceptance, bonus."""
        return self.draft_draws(vocab_size) + self.k * self.topk + 1


@dataclass(frozen=True)
class Sampling:
    """How each row of a batch samples this step: temperature (below GREEDY_EPS: greedy), top_k, top_p, and the
    seed of its uniforms, drawn on rank 0 from the request's own stream (None for greedy rows). Every rank draws
    the same uniforms from it without keeping a generator, and a request's draws never depend on its batch."""

    temperature: list[float]
    top_k: list[int]
    top_p: list[float]
    seeds: list[int | None]

    def take(self, rows: list[int]) -> Sampling:
        """These rows only, in this order."""
        return Sampling(*([v[i] for i in rows] for v in (self.temperature, self.top_k, self.top_p, self.seeds)))


@dataclass(frozen=True)
class Chunk:
    """Request `req` prefills rows start.. from `tokens`. next: the token after the chunk (the chunk's last MTP row
    pairs with it), or None when this step samples it (the chunk ends a new prompt: its first token). scored: the
    chunk's rows [a, b) whose logits score the prompt (prompt_logprobs), or None."""

    req: int
    start: int
    tokens: list[int]
    next: int | None
    scored: tuple[int, int] | None = None

    @property
    def end(self) -> int:
        return self.start + len(self.tokens)


@dataclass(frozen=True)
class Decode:
    """The requests that decode this step, in batch order: their committed rows (the root is token n_main) and
    roots. A root of None is the first token this step's prefill samples; a request that token ends leaves the
    batch. sampling: None when every row is greedy; draft: None for plain decoding (a step of an engine with a
    drafter may decode plainly too: adaptive speculation found drafting would not pay). With draft.gate, per
    request: depth, the most draft steps it may take (0: none), and floor, the estimated path acceptance a draft
    node must reach to be verified (None: no floor, it drafts its whole depth)."""

    reqs: list[int]
    n_main: list[int]
    roots: list[int | None]
    sampling: Sampling | None
    draft: DraftShape | None
    depth: list[int] | None = None
    floor: list[float | None] | None = None


@dataclass(frozen=True)
class StepPlan:
    """One engine step. freed: requests whose rows are gone since the last plan (finished, aborted or preempted:
    every rank drops their tables and drafter state); blocks: the blocks each request's table gained, in order;
    held: how many requests hold rows once both apply (every rank checks it holds as many); then the prefill
    chunks (one causal forward) and the decode batch."""

    freed: list[int]
    blocks: dict[int, list[int]]
    held: int
    prefill: list[Chunk]
    decode: Decode | None


@dataclass(frozen=True)
class Score:
    """Logits of one sequence through a throwaway cache: the main model's at every position, or (mtp_depth set)
    MTP layer mtp_depth's, teacher-forced."""

    ids: list[int]
    mtp_depth: int | None = None
