"""Drive an LLM's engine as a server would: requests added a few at a time between steps."""

from __future__ import annotations

import random

from specdec import LLM, SamplingParams
from specdec.request import Request


def run_staggered(llm: LLM, reqs: list[tuple[list[int], SamplingParams]], seed: int,
                  max_per_step: int = 3) -> list[Request]:
    """Add 0..max_per_step of the requests before each engine step, then step until all finish."""
    rng = random.Random(seed + 1)
    e, pending, added = llm.engine, list(reqs), []
    while pending or e.has_unfinished:
        for _ in range(rng.randint(0, max_per_step)):
            if pending:
                added.append(e.add(*pending.pop(0)))
        e.step()
    return added
