"""Presence, frequency and repetition penalties token by token, as vLLM and OpenAI define them: the slow reference
of specdec/penalties.py."""

from __future__ import annotations

import torch


def penalized_reference(logits: torch.Tensor, prompt: list[int], generated: list[int], presence: float,
                        frequency: float, repetition: float) -> torch.Tensor:
    """logits [V] for the position after prompt + generated -> the penalized logits."""
    x = logits.clone()
    for t in range(x.shape[-1]):
        n = generated.count(t)
        if n or t in prompt:
            x[t] = x[t] / repetition if x[t] > 0 else x[t] * repetition
        x[t] -= frequency * n + presence * (n > 0)
    return x
