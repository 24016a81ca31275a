"""Logprobs for the requests that ask (vLLM's SamplingParams.logprobs and prompt_logprobs): the chosen token's
log-probability and the n most likely tokens' under the main model's raw distribution, moved to the host after
the step's decisions."""

from __future__ import annotations

import torch

from .request import Request
from .sampling import logprob_dict, token_logprobs


def step_logprobs(reqs: list[Request], logits: torch.Tensor, chosen: torch.Tensor, per: int
                  ) -> list[list[dict[int, float]] | None] | None:
    """logits [len(reqs) * per, V] and the tokens chosen there -> per request its `per` rows' logprob dicts, None
    for a request that does not ask (and instead of the list when none does); rows past what a request emits are
    never read."""
    want = [r.params.logprobs for r in reqs]
    if all(w is None for w in want):
        return None
    ids, values = token_logprobs(logits, chosen, max(w or 0 for w in want))
    return [None if w is None else [logprob_dict(ids[i * per + j], values[i * per + j], w) for j in range(per)]
            for i, w in enumerate(want)]


def prompt_rows(r: Request, s: int, e: int) -> tuple[int, int] | None:
    """The rows [a, b) of r's prefill chunk (prompt rows s..e-1) whose logits score prompt tokens not scored yet
    (row i predicts token i+1; a recompute after preemption finds them done); None when there are none or r asks
    for no prompt logprobs."""
    if r.params.prompt_logprobs is None:
        return None
    start, end = len(r.prompt_logprobs or [None]), min(e + 1, len(r.prompt))  # the first prompt token has none
    return (start - 1 - s, end - 1 - s) if start < end else None


def add_prompt_logprobs(r: Request, s: int, rows: tuple[int, int], logits: torch.Tensor) -> None:
    """logits [b - a, V] of the chunk's rows [a, b) (`prompt_rows`; the chunk starts at row s) score prompt tokens
    s + a + 1 .. s + b: their logprobs, appended to r.prompt_logprobs."""
    lps = r.prompt_logprobs = r.prompt_logprobs or [None]
    a, b = rows
    chosen = torch.tensor(r.prompt[s + a + 1:s + b + 1], device=logits.device)
    ids, values = token_logprobs(logits, chosen, r.params.prompt_logprobs)
    lps.extend(logprob_dict(i, v, r.params.prompt_logprobs) for i, v in zip(ids, values))
