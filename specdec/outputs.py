"""What generation returns: RequestOutput (generate) and StepOutput (one engine step of a stream), with their
speculative-decoding metrics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class Metrics:
    """Per-request counters. A step is one main-model forward that emits tokens (the prefill counts as one)."""

    num_steps: int = 0
    num_drafted: int = 0  # draft nodes verified
    num_accepted: int = 0  # draft tokens accepted
    accepted_per_position: list[int] = field(default_factory=list)  # [k]: steps whose depth-d draft was accepted
    drafted_per_position: list[int] = field(default_factory=list)  # [k]: steps that verified a depth-d draft (a
    # tree drafted whole: each depth its budget reaches); adaptive speculation drafts fewer than k where unlikely
    num_generated: int = 0
    prefill_time: float = 0.0  # seconds in prefill forwards (its share of batched ones), MTP rows included
    draft_time: float = 0.0  # decode steps: seconds drafting (MTP forwards, trees) and extending the MTP cache
    verify_time: float = 0.0  # decode steps: seconds in main-model forwards, acceptance and commit
    other_time: float = 0.0  # the rest of its time in the engine (waiting, other requests' work)
    first_token_time: float = 0.0  # seconds from arrival to the first emitted token
    num_preemptions: int = 0  # times its KV blocks were taken back under memory pressure (then recomputed)
    num_cached_tokens: int = 0  # prompt tokens whose KV rows came from the prefix cache

    @property
    def mean_accepted_length(self) -> float:
        """Generated tokens per step (1.0 without speculation)."""
        return self.num_generated / self.num_steps if self.num_steps else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted / self.num_drafted if self.num_drafted else 0.0

    @property
    def num_decode_steps(self) -> int:
        """Verify steps (the prefill that emits the first token not counted)."""
        return max(self.num_steps - 1, 0)

    def as_dict(self) -> dict:
        return {
            "num_steps": self.num_steps, "num_drafted": self.num_drafted, "num_accepted": self.num_accepted,
            "accepted_per_position": list(self.accepted_per_position),
            "drafted_per_position": list(self.drafted_per_position), "num_generated": self.num_generated,
            "mean_accepted_length": self.mean_accepted_length, "acceptance_rate": self.acceptance_rate,
            "prefill_time": self.prefill_time, "draft_time": self.draft_time, "verify_time": self.verify_time,
            "other_time": self.other_time,
            "first_token_time": self.first_token_time, "num_preemptions": self.num_preemptions,
            "num_cached_tokens": self.num_cached_tokens,
        }


@dataclass
class RequestOutput:
    request_id: int
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated tokens only (a stop token that ended the request included)
    finish_reason: str  # "stop" (a stop token, EOS or a stop string) or "length" (max_tokens)
    metrics: Metrics
    text: str | None = None  # when the checkpoint ships a tokenizer (stop tokens not rendered, cut at stop strings)
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    logprobs: list[dict[int, float]] | None = None  # per token: {token: log-prob}, its own first (params.logprobs)
    prompt_logprobs: list[dict[int, float] | None] | None = None  # per prompt token, None for the first one


@dataclass(frozen=True)
class StepOutput:
    """What one engine step emitted for one request: its accepted tokens (several when drafts were accepted) and
    the text they add ("" without a tokenizer; held back across incomplete UTF-8 and possible stop strings)."""

    request: Any  # specdec.request_state.RequestState: finish_reason, metrics, generated so far
    token_ids: list[int]
    text: str
    logprobs: list[dict[int, float]] | None = None  # per token, when its params ask for logprobs

    @property
    def metrics(self) -> Metrics:
        return self.request.metrics

    @property
    def finished(self) -> bool:
        return self.request.finish_reason is not None
