"""A request as its caller sees it (vLLM v1's RequestState in the front end's output processor): the token ids the
engine emitted, their text and logprobs, cut at a stop string.

The engine emits token ids (and logprobs) under its lock; `take` collects them under the lock and detokenizes
outside it, in the caller's thread. A stop string found there ends the request: its output ends with the token
that completed the stop string, and whatever the engine emitted after that (later tokens of the same step, or of
steps another thread ran meanwhile) is dropped. The engine still runs it until the caller aborts it there
(`needs_abort`), which frees its blocks.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from .detokenizer import TextTracker
from .outputs import Metrics, StepOutput
from .params import SamplingParams
from .request import Request


class RequestState:
    """finish_reason: "stop" (a stop token, EOS or a stop string), "length" (max_tokens), "abort" or "error";
    None while it runs. generated, logprobs and text end where the output ends."""

    def __init__(self, request: Request, tokenizer: Any | None, lock: threading.RLock):
        self.request, self._lock = request, lock
        p = request.params
        # stop tokens are not rendered (TextTracker hides them), so only a token the engine keeps ends a stop string
        self.text = TextTracker(tokenizer, request.stop_ids, p.stop or ()) if tokenizer is not None else None
        self.generated: list[int] = []
        self.logprobs: list[dict[int, float]] | None = None  # per generated token, when params.logprobs is set
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None  # the stop token id or stop string that ended it
        self._cut = False  # a stop string ended it here

    @property
    def prompt(self) -> list[int]:
        return self.request.prompt

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def prompt_logprobs(self) -> list[dict[int, float] | None] | None:
        return self.request.prompt_logprobs

    @property
    def error(self) -> Exception | None:
        """Why it ended with finish_reason "error" (its logits were not finite)."""
        return self.request.error

    @property
    def metrics(self) -> Metrics:
        """The engine's counters for it; after a stop string, num_generated counts the tokens kept."""
        m = self.request.metrics
        return dataclasses.replace(m, num_generated=len(self.generated)) if self._cut else m

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def needs_abort(self) -> bool:
        """It ended here (a stop string) while the engine still runs it: the caller must abort it there."""
        return self._cut and not self.request.finished

    def take(self) -> list[StepOutput]:
        """What the engine emitted for it since the last take, one StepOutput per step, with the text it adds
        (held back across incomplete UTF-8 and possible stop strings; detokenized here, outside the engine lock)."""
        with self._lock:
            emitted, done = self.request.take(), self.request.finished
        outs = []
        for i, e in enumerate(emitted):
            if self._cut:
                break
            kept, piece = [], ""
            for t in e.token_ids:
                kept.append(t)
                if self.text is not None:
                    piece += self.text.push(t)
                    if self.text.stopped is not None:  # before max_tokens, as vLLM: the stop string is the reason
                        self.finish_reason, self.stop_reason, self._cut = "stop", self.text.stopped, True
                        break
            if done and i == len(emitted) - 1 and not self._cut:
                self.finish_reason, self.stop_reason = self.request.finish_reason, self.request.stop_reason
            if self.finish_reason is not None and self.text is not None:
                piece += self.text.finish()
            self.generated += kept
            lps = None if e.logprobs is None else e.logprobs[:len(kept)]
            if lps is not None:
                self.logprobs = self.logprobs or []
                self.logprobs += lps
            outs.append(StepOutput(self, kept, piece, lps))
        if done and self.finish_reason is None:  # ended without emitting: aborted, or its logits were not finite
            self.finish_reason, self.stop_reason = self.request.finish_reason, self.request.stop_reason
        return outs
