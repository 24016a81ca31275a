"""What a step decided for its batch: one typed result moved to the host once, and what rank 0 commits from it.

vLLM's rejection sampler returns the emitted tokens as a [B, k+1] tensor padded with -1 and parses it on the host;
StepResult does the same for every phase (a verify step, plain decoding, a prompt's first token) and carries the
finite flags and the accepted tree paths beside it. Its fields travel packed in one tensor (one device-to-host
copy) and are split apart by name. Only rank 0 decides: it computes the StepResult, emits the tokens on the host
(where stop tokens and max_tokens end requests), and under tensor parallelism ships a Commit, what the other ranks'
forwards need of it, over the group's channel.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F

from .step_plan import Channel
from .tree import TokenTree
from .verify import Acceptance


@dataclass(frozen=True)
class HostStep:
    """A StepResult on the host, padding dropped: per request its emitted tokens, whether its logits were finite,
    and (verify steps) its accepted path, root first."""

    tokens: list[list[int]]
    finite: list[bool]
    path: list[list[int]] | None


@dataclass(frozen=True)
class StepResult:
    """For B requests: tokens [B, n] int64, each request's emitted tokens (a verify step's accepted drafts, then
    the bonus token; one sampled token when n = 1) padded with -1; finite [B, 1] int64, 1 where every logit its
    tokens came from was finite; path [B, n] int64 (verify steps) the accepted tree nodes from the root, padded
    with -1."""

    tokens: torch.Tensor
    finite: torch.Tensor
    path: torch.Tensor | None = None

    @classmethod
    def sampled(cls, tokens: torch.Tensor, logits: torch.Tensor) -> StepResult:
        """One token per request (tokens [B]) sampled from logits [B, V]."""
        return cls(tokens[:, None], finite_flags(logits)[:, None])

    @classmethod
    def verified(cls, tree: TokenTree, acc: Acceptance, logits: torch.Tensor) -> StepResult:
        """A verify step: acc over tree ([B, N] nodes), logits [B, N, V] at every node."""
        a = acc.num_accepted[:, None]
        drafts = tree.tokens.gather(1, acc.path[:, 1:].clamp(min=0))  # [B, k] the tokens of path nodes 1..k
        idx = torch.arange(acc.path.shape[1], device=a.device)
        tokens = torch.where(idx < a, F.pad(drafts, (0, 1)), -1).scatter(1, a, acc.bonus[:, None])
        return cls(tokens, finite_flags(logits).all(-1, keepdim=True).long(), acc.path)

    def host(self) -> HostStep:
        """The decisions on the host: the step's one device-to-host transfer."""
        parts = [getattr(self, f.name) for f in fields(self) if getattr(self, f.name) is not None]
        widths = [p.shape[1] for p in parts]
        tokens, finite, *path = (p.tolist() for p in torch.cat(parts, 1).cpu().split(widths, 1))
        return HostStep(_unpad(tokens), [bool(f[0]) for f in finite], _unpad(path[0]) if path else None)


@dataclass(frozen=True)
class Commit:
    """What rank 0 committed for the B rows of a phase, as every rank's forwards go on from it: keep[b], whether
    row b's request goes on (its MTP rows are extended, it stays in this step's decode batch); tokens[b], its
    emitted tokens; path[b] (verify steps), its accepted tree nodes, root first."""

    keep: list[bool]
    tokens: list[list[int]]
    path: list[list[int]] | None = None

    @staticmethod
    def share(channel: Channel | None, commit: Commit | None) -> Commit:
        """Rank 0's commit (the other ranks pass None) on every rank, over the group's channel (None: one rank)."""
        if channel is None:
            return commit
        if commit is None:
            return channel.recv()
        channel.send(commit)
        return commit


def _unpad(rows: list[list[int]]) -> list[list[int]]:
    return [[x for x in row if x >= 0] for row in rows]


def finite_flags(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [...] int64: 1 where every logit is finite. A NaN or inf anywhere makes the row's float32 sum
    non-finite (finite logits of a real model are far below the 3e38 / V a sum could overflow at); one reduction
    costs a tenth of isfinite().all()."""
    return torch.isfinite(logits.float().sum(-1)).long()
