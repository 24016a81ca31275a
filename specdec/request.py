"""A request's state inside the engine: its tokens, where it stands (waiting, prefilling, running, finished), its
KV blocks, the drafter's carry, its metrics and text."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from .detokenizer import TextTracker
from .kv_pool import BlockTable
from .outputs import Metrics, StepOutput
from .params import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"  # queued: no blocks (new, or preempted and to be recomputed)
    PREFILL = "prefill"  # blocks held, prompt (or recomputed tokens) partly in the cache
    RUNNING = "running"  # decoding: one draft + verify + commit per engine step
    FINISHED = "finished"


@dataclass(eq=False)
class Request:
    """tokens = prompt + generated. Invariant once prefilled: the main cache holds rows 0..n_main-1 and
    n_main == len(tokens) - 1; tokens[-1] is the next step's root. MTP layer L holds rows 0..n_main-1-L."""

    id: int
    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    gen: torch.Generator
    tokens: list[int] = field(default_factory=list)
    generated: list[int] = field(default_factory=list)
    status: Status = Status.WAITING
    n_main: int = 0  # rows in the main cache
    n_prefill: int = 0  # rows the (re)prefill must write: the prompt, or every committed token but the last
    table: BlockTable = field(default_factory=BlockTable)
    carry: list[torch.Tensor | None] = field(default_factory=list)  # per MTP layer: its last output (drafter)
    g: torch.Tensor | None = None  # [D] MTP layer 0's output at the last committed row: seeds the next draft
    finish_reason: str | None = None  # "stop", "length" or "abort"
    stop_reason: int | str | None = None  # the stop token or stop string that ended it
    error: Exception | None = None  # why it ended with finish_reason "error" (raised to its caller)
    error_at: float = 0.0
    where: str = "request"  # how its caller named it ("prompt 3"), for errors
    metrics: Metrics = field(default_factory=Metrics)
    text: TextTracker | None = None  # with a tokenizer: the generated text, cut at a stop string
    arrival: float = field(default_factory=time.perf_counter)
    outbox: list[StepOutput] = field(default_factory=list)  # emitted, not yet taken by the caller
    logprobs: list[dict[int, float]] | None = None  # per generated token, when params.logprobs is set
    prompt_logprobs: list[dict[int, float] | None] | None = None  # per prompt token (None first), when asked

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def emit(self, new: list[int], logprobs: list[dict[int, float]] | None = None) -> None:
        """Append accepted tokens (and their logprobs, when asked for), stopping at a stop token, a stop string or
        max_tokens; what was emitted (tokens, the text they add, their logprobs) goes to the outbox."""
        out, piece = [], ""
        for t in new:
            out.append(t)
            self.generated.append(t)
            if self.text is not None:
                piece += self.text.push(t)
            if t in self.stop_ids:
                self.finish_reason, self.stop_reason = "stop", t
            elif self.text is not None and self.text.stopped is not None:
                self.finish_reason, self.stop_reason = "stop", self.text.stopped
            elif len(self.generated) >= self.params.max_tokens:
                self.finish_reason = "length"
            if self.finish_reason is not None:
                break
        if self.finish_reason is not None and self.text is not None:
            piece += self.text.finish()
        self.tokens.extend(out)
        lps = None
        if logprobs is not None:
            lps = logprobs[:len(out)]
            self.logprobs = (self.logprobs or []) + lps
        self.metrics.num_generated += len(out)
        if self.metrics.num_generated == len(out) and out:
            self.metrics.first_token_time = time.perf_counter() - self.arrival
        self.outbox.append(StepOutput(self, out, piece, lps))

    def take(self) -> list[StepOutput]:
        out, self.outbox = self.outbox, []
        return out
