"""What changes the main model's distribution per request (vLLM's and OpenAI's meaning), also inside a draft tree:
logit_bias, min_tokens, and presence, frequency and repetition penalties, applied in vLLM's order (bias and
min_tokens, then penalties).

The target distribution at a tree node depends on every token before it: the committed ones, and the drafted
tokens on the node's path (itself included, excluding the root, which is already committed). So the penalties of
node i count the committed generated tokens plus its ancestors' tokens, and min_tokens holds the stop tokens back
at node i while generated + depth(i) < min_tokens. Verification stays lossless: the drafter may propose from any
distribution, acceptance compares against the adjusted target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .tree import TokenTree


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, prompt_seen: torch.Tensor, presence: torch.Tensor,
                    frequency: torch.Tensor, repetition: torch.Tensor) -> torch.Tensor:
    """logits [B, N, V] float32; counts [B, N, V] how often each token was generated before each row's
    prediction; prompt_seen [B, V] bool; presence, frequency, repetition [B]. Repetition divides the positive
    logits (multiplies the negative ones) of every token seen in the prompt or the output; then frequency subtracts
    its count, presence its having appeared (vLLM's order)."""
    seen = (counts > 0) | prompt_seen[:, None, :]
    r = repetition[:, None, None]
    x = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
    return x - frequency[:, None, None] * counts - presence[:, None, None] * (counts > 0)


@dataclass(frozen=True)
class Penalties:
    """A batch's target adjustments for one step (penalties, logit bias, min_tokens): built only when some
    request asks for one."""

    counts: torch.Tensor  # [B, V] float32: generated tokens committed so far
    prompt_seen: torch.Tensor  # [B, V] bool
    presence: torch.Tensor  # [B]
    frequency: torch.Tensor  # [B]
    repetition: torch.Tensor  # [B]
    bias: torch.Tensor  # [B, V] float32 (logit_bias)
    min_left: torch.Tensor  # [B] int64: tokens still to generate before a stop token may end the request
    stop_mask: torch.Tensor  # [B, V] bool: the request's stop tokens (EOS unless ignored, stop_token_ids)

    @classmethod
    def build(cls, reqs: list[Any], vocab: int, device: torch.device) -> Penalties | None:
        """reqs: engine Requests (prompt, generated, stop_ids, params); None when no request's target changes."""
        ps = [r.params for r in reqs]
        if not any(p.adjusts_target for p in ps):
            return None

        def scatter(seqs: list[list[int]]) -> torch.Tensor:
            out = torch.zeros(len(seqs), vocab, device=device)
            rows = torch.tensor([i for i, s in enumerate(seqs) for _ in s], dtype=torch.long, device=device)
            ids = torch.tensor([t for s in seqs for t in s], dtype=torch.long, device=device)
            return out.index_put_((rows, ids), torch.ones_like(ids, dtype=out.dtype), accumulate=True)

        f = lambda name: torch.tensor([getattr(p, name) for p in ps], dtype=torch.float32, device=device)  # noqa: E731
        bias = torch.zeros(len(ps), vocab, device=device)
        for i, p in enumerate(ps):
            if p.logit_bias:
                bias[i, list(p.logit_bias)] = torch.tensor(list(p.logit_bias.values()), dtype=bias.dtype,
                                                           device=device)
        min_left = torch.tensor([p.min_tokens - len(r.generated) for p, r in zip(ps, reqs)], device=device)
        stops = scatter([sorted(r.stop_ids) if p.min_tokens else [] for p, r in zip(ps, reqs)]) > 0
        # only the requests whose penalties read them pay for scattering their tokens (a prompt can be long)
        counted = [r.generated if p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1 else []
                   for p, r in zip(ps, reqs)]
        prompts = [r.prompt if p.repetition_penalty != 1 else [] for p, r in zip(ps, reqs)]
        return cls(scatter(counted), scatter(prompts) > 0, f("presence_penalty"), f("frequency_penalty"),
                   f("repetition_penalty"), bias, min_left, stops)

    def apply(self, logits: torch.Tensor, tree: TokenTree | None = None) -> torch.Tensor:
        """logits [B * N, V] (N rows a request: its tree's nodes, or 1) -> the adjusted logits, same shape."""
        b, v = self.counts.shape
        x = logits.float().view(b, -1, v) + self.bias[:, None, :]
        depth = tree.depth if tree is not None else torch.zeros(b, x.shape[1], dtype=torch.long, device=x.device)
        held = (depth < self.min_left[:, None])[..., None] & self.stop_mask[:, None, :]  # [B, N, V]
        x = x.masked_fill(held, float("-inf"))
        counts = self.counts[:, None, :].expand(b, x.shape[1], v)
        if tree is not None:  # node i also counts the drafted tokens on its path: its ancestors and itself
            path = tree.mask.float()
            path[:, :, 0] = 0  # the root is committed (already counted)
            counts = counts + path @ F.one_hot(tree.tokens, v).float()
        return apply_penalties(x, counts, self.prompt_seen, self.presence, self.frequency,
                               self.repetition).view(logits.shape)
