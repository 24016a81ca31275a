"""What SamplingParams do to the main model's logits, token by token, as vLLM and OpenAI define them: the slow
reference of specdec/penalties.py (logit_bias and min_tokens first, then the penalties)."""

from __future__ import annotations

import torch

from specdec import SamplingParams


def adjusted_reference(logits: torch.Tensor, prompt: list[int], generated: list[int], p: SamplingParams,
                       stop_ids: frozenset[int] = frozenset()) -> torch.Tensor:
    """logits [V] for the position after prompt + generated -> the adjusted logits."""
    x = logits.clone()
    for t, b in (p.logit_bias or {}).items():
        x[t] += b
    if len(generated) < p.min_tokens:
        for t in stop_ids:
            x[t] = float("-inf")
    for t in range(x.shape[-1]):
        n = generated.count(t)
        if n or t in prompt:
            x[t] = x[t] / p.repetition_penalty if x[t] > 0 else x[t] * p.repetition_penalty
        x[t] -= p.frequency_penalty * n + p.presence_penalty * (n > 0)
    return x
