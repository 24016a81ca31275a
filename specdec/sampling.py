"""Logit processing and sampling as small tensor functions (no host syncs)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

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


@dataclass
class SamplingBatch:
    """The active requests' sampling settings as tensors, and this step's uniforms: each sampled request draws
    one buffer from its own generator per step (so a seeded request's draws never depend on its batch), which
    `uniform` hands out slice by slice. All-greedy batches build nothing but the flags."""

    greedy: torch.Tensor  # [B] bool
    any_sampled: bool
    temperature: torch.Tensor | None = None  # [B] float32 (1.0 on greedy rows, which never sample)
    top_k: torch.Tensor | None = None  # [B] int64
    top_p: torch.Tensor | None = None  # [B] float32
    any_filtered: bool = False  # some request uses top_k or top_p (else no sort over the vocabulary is needed)
    buffer: torch.Tensor | None = None  # [B, n] this step's uniforms
    used: int = 0

    @classmethod
    def build(cls, params: list[Any], gens: list[torch.Generator], draws: int, device: torch.device
              ) -> SamplingBatch:
        """params: each request's SamplingParams; draws: uniforms per request this step."""
        greedy = [p.greedy for p in params]
        g = torch.tensor(greedy, device=device)
        if all(greedy):
            return cls(g, False)
        buffer = torch.stack([torch.rand(draws, generator=gen, device=device) for gen in gens])
        return cls(g, True,
                   temperature=torch.tensor([1.0 if p.greedy else p.temperature for p in params], device=device),
                   top_k=torch.tensor([p.top_k for p in params], device=device),
                   top_p=torch.tensor([p.top_p for p in params], device=device),
                   any_filtered=any(p.top_k > 0 or p.top_p < 1 for p in params), buffer=buffer)

    def uniform(self, shape: tuple[int, ...]) -> torch.Tensor:
        """The next [B, *shape] uniforms of this step's buffer."""
        n = math.prod(shape)
        if self.buffer is None or self.used + n > self.buffer.shape[1]:
            raise RuntimeError(f"sampling buffer exhausted: {self.used} + {n} > its draws")
        out = self.buffer[:, self.used:self.used + n].reshape(-1, *shape)
        self.used += n
        return out

    def probs(self, logits: torch.Tensor, rows_per_request: int = 1) -> torch.Tensor:
        """logits [B * r, V] -> processed probabilities (row i belongs to request i // r)."""
        rep = (lambda t: t) if rows_per_request == 1 else (lambda t: t.repeat_interleave(rows_per_request))
        if not self.any_filtered:
            return (logits.float() / rep(self.temperature)[:, None]).softmax(-1)
        return process_logits(logits, rep(self.temperature), rep(self.top_k), rep(self.top_p))


def token_logprobs(logits: torch.Tensor, chosen: torch.Tensor, n: int) -> tuple[list[list[int]], list[list[float]]]:
    """logits [M, V], chosen [M] -> per row the ids and log-probabilities (log_softmax of the raw logits) of the
    chosen token, then of the n most likely ones, on the host. Called after the step's sync, only when a request
    of the batch asked for logprobs."""
    lp = logits.float().log_softmax(-1)
    top_v, top_i = lp.topk(n, dim=-1)
    ids = torch.cat([chosen[:, None], top_i], 1)
    return ids.tolist(), torch.cat([lp.gather(-1, chosen[:, None]), top_v], 1).tolist()


def logprob_dict(ids: list[int], values: list[float], n: int) -> dict[int, float]:
    """One row of token_logprobs as {token: log-prob}: the chosen token first, then the n most likely."""
    return {ids[0]: values[0]} | dict(zip(ids[1:1 + n], values[1:1 + n]))
