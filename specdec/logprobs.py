"""Logprobs for the requests that ask (vLLM's SamplingParams.logprobs and prompt_logprobs): the chosen token's
log-probability and the n most likely tokens' under the main model's raw distribution, moved to the host after
the step's decisions."""

from __future__ import annotations

from collections.abc import Callable

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


def add_prompt_logprobs(r: Request, s: int, e: int, hidden: torch.Tensor,
                        logits: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """Prompt rows s..e-1 (hidden [e-s, D]; `logits` the model's head) predict prompt tokens s+1..: their
    logprobs, appended to r.prompt_logprobs once (a recompute after preemption finds them done)."""
    lps = r.prompt_logprobs = r.prompt_logprobs or [None]  # the first prompt token has no prediction
    start, end = len(lps), min(e + 1, len(r.prompt))  # the next prompt token to score, one past the last
    if start >= end:
        return
    rows = hidden[start - 1 - s:end - 1 - s]
    chosen = torch.tensor(r.prompt[start:end], device=rows.device)
    ids, values = token_logprobs(logits(rows), chosen, r.params.prompt_logprobs)
    lps.extend(logprob_dict(i, v, r.params.prompt_logprobs) for i, v in zip(ids, values))
