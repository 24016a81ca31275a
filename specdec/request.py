"""A request inside the engine, as its scheduler sees it (rank 0's): its token ids, where it stands (waiting,
prefilling, running, finished), its KV blocks, its sampling stream, its metrics, and what it emitted that its caller
has not taken yet. Its text (detokenization, stop strings) is the caller's: request_state.py; the drafter's state
is each rank's runner's (runner.py)."""

from __future__ import annotations

import enum
import random
import time
from dataclasses import dataclass, field

from .kv_pool import BlockTable
from .outputs import Metrics
from .params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # queued: no blocks (new, or preempted and to be recomputed)
    PREFILL = "prefill"  # blocks held, prompt (or recomputed tokens) partly in the cache
    RUNNING = "running"  # decoding: one draft + verify + commit per engine step
    FINISHED = "finished"


@dataclass(frozen=True)
class Emitted:
    """What one engine step emitted for a request: its new tokens and, when its params ask, their logprobs."""

    token_ids: list[int]
    logprobs: list[dict[int, float]] | None = None


@dataclass(eq=False)
class Request:
    """tokens = prompt + generated. Invariant once prefilled: the main cache holds rows 0..n_main-1 and
    n_main == len(tokens) - 1; tokens[-1] is the next step's root. MTP layer L holds rows 0..n_main-1-L."""

    id: int
    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    gen: random.Random  # its sampling stream: one seed for each step it samples in (step_plan.Sampling)
    tokens: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    n_main: int = 0  # rows in the main cache
    n_prefill: int = 0  # rows the (re)prefill must write: the prompt, or every committed token but the last
    table: BlockTable = field(default_factory=BlockTable)
    finish_reason: str | None = None  # "stop", "length", "abort" or "error"
    stop_reason: int | None = None  # the stop token that ended it
    error: Exception | None = None  # why it ended with finish_reason "error" (raised to its caller)
    error_at: float = 0.0
    where: str = "request"  # how its caller named it ("prompt 3"), for errors
    metrics: Metrics = field(default_factory=Metrics)
    arrival: float = field(default_factory=time.perf_counter)
    outbox: list[Emitted] = field(default_factory=list)  # emitted, not yet taken by the caller
    prompt_logprobs: list[dict[int, float] | None] | None = None  # per prompt token (None first), when asked

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def emit(self, new: list[int], logprobs: list[dict[int, float]] | None = None) -> None:
        """Append accepted tokens (and their logprobs, when asked for), stopping at a stop token or max_tokens
        (stop strings are the caller's: request_state.py); what was emitted goes to the outbox."""
        out = []
        for t in new:
            out.append(t)
            if t in self.stop_ids:
                self.finish_reason, self.stop_reason = "stop", t
                break
            if len(self.generated) + len(out) >= self.params.max_tokens:
                self.finish_reason = "length"
                break
        if out and not self.generated:
            self.metrics.first_token_time = time.perf_counter() - self.arrival
        self.generated += out
        self.tokens += out
        self.metrics.num_generated += len(out)
        self.outbox.append(Emitted(out, None if logprobs is None else logprobs[:len(out)]))

    def take(self) -> list[Emitted]:
        out, self.outbox = self.outbox, []
        return out
