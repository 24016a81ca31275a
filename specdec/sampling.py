"""Logit processing and sampling as small tensor functions (no host syncs)."""

from __future__ import annotations

import torch


def process_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                   top_p: torch.Tensor) -> torch.Tensor:
    """logits [N, V] float32; per-row temperature [N] (> 0), top_k [N] (0 = off), top_p [N] in (0, 1].

    Returns probabilities [N, V]: softmax(logits / T) restricted to the top_k tokens and to the smallest set whose
    mass reaches top_p (the token that crosses top_p is kept), renormalized. Rows with temperature 0 must be
    handled by the caller (greedy); they are treated as temperature 1 here.
    """
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    x = logits.float() / t[:, None]
    sorted_x, order = x.sort(dim=-1, descending=True)
    v = x.shape[-1]
    rank = torch.arange(v, device=x.device)[None, :]
    k = torch.where(top_k > 0, top_k.clamp(max=v), torch.full_like(top_k, v))
    drop = rank >= k[:, None]
    probs = sorted_x.masked_fill(drop, float("-inf")).softmax(-1)
    before = probs.cumsum(-1) - probs  # mass strictly before each token
    drop |= before >= top_p[:, None]
    drop[:, 0] = False
    sorted_x = sorted_x.masked_fill(drop, float("-inf"))
    return torch.empty_like(x).scatter_(-1, order, sorted_x.softmax(-1))


def sample_from(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: probs [N, V] (rows need not be normalized), u [N] uniform in [0, 1) -> ids [N]."""
    cdf = probs.cumsum(-1)
    target = (u * cdf[:, -1])[:, None]
    idx = torch.searchsorted(cdf, target, right=True).squeeze(-1)
    # never land on a zero-probability token at the top end (float round-off)
    return torch.minimum(idx, (probs > 0).long().cumsum(-1).argmax(-1))


def gumbel_topk(logq: torch.Tensor, u: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k draws without replacement from q (log-probs logq [N, V]) using uniforms u [N, V]: the top-k of
    logq + Gumbel noise, in draw order. Returns (ids [N, k], rank scores [N, k]).

    The rank score of the j-th draw is the j-th largest log q, not the drawn token's own log q: a tree built from
    these scores decides whether to keep a sibling without looking at its value, which keeps recursive rejection
    sampling over the kept siblings lossless (keeping a draw because its probability is high would bias it)."""
    g = -torch.log(-torch.log(u.clamp(1e-20, 1 - 1e-7)))
    ids = (logq + g).topk(k, dim=-1).indices
    return ids, logq.topk(k, dim=-1).values
