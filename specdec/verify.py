"""Acceptance: walk the token tree against the main model's distributions, keep the longest accepted path.

Greedy rows accept the child equal to the target argmax. Sampled rows use recursive rejection sampling over
siblings (SpecInfer/EAGLE): child x drawn from the draft distribution q is accepted with probability
min(1, p(x)/q(x)); on rejection p <- normalize(max(p - q, 0)) and x is removed from q (the next sibling was drawn
without replacement from that q). For a chain this is the standard speculative sampling rule. The emitted tokens
are distributed exactly as the main model's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .sampling import sample_from
from .tree import TokenTree


@dataclass(frozen=True)
class Relaxed:
    """TensorRT-LLM's relaxed acceptance (lossy, greedy rows only): accept a child among the target's top
    `topk` tokens whose log-probability is within `delta` of the top-1."""

    topk: int
    delta: float


@dataclass(frozen=True)
class Acceptance:
    path: torch.Tensor  # [B, D+1] accepted node indices from the root, padded with -1
    num_accepted: torch.Tensor  # [B] accepted draft tokens (the root not counted)
    bonus: torch.Tensor  # [B] token sampled from the last accepted node's (residual) distribution


def accept(tree: TokenTree, target_logits: torch.Tensor, p: torch.Tensor | None, q: torch.Tensor | None,
           greedy: torch.Tensor, u_accept: torch.Tensor, u_bonus: torch.Tensor, max_depth: int,
           relaxed: Relaxed | None = None) -> Acceptance:
    """target_logits [B, N, V] main-model logits at each node; p [B, N, V] processed target probabilities
    (None if every row is greedy); q [B, R, V] draft distributions indexed by tree.q_row (None if all greedy);
    greedy [B] bool; u_accept [B, D, W] and u_bonus [B] uniforms in [0, 1)."""
    if p is None and relaxed is None:
        return accept_greedy(tree, target_logits, max_depth)
    # a gated chain batch whose every draft fell below its floor is its roots alone: the walk takes it
    if relaxed is None and q is not None and tree.children.shape[-1] == 1 and tree.num_nodes == max_depth + 1 > 1:
        return accept_chain(tree, target_logits, p, q, greedy, u_accept[:, :, 0], u_bonus)
    return accept_walk(tree, target_logits, p, q, greedy, u_accept, u_bonus, max_depth, relaxed)


def accept_chain(tree: TokenTree, target_logits: torch.Tensor, p: torch.Tensor, q: torch.Tensor,
                 greedy: torch.Tensor, u_accept: torch.Tensor, u_bonus: torch.Tensor) -> Acceptance:
    """A chain of k drafts (node i's child is node i+1, drawn from q row i), every row at once: draft i+1 is
    accepted iff u_i * q_i(x) < p_i(x) (greedy rows: x is the target argmax), the first rejection ends the path
    and the bonus comes from normalize(max(p - q, 0)) there, or from p at the last node if all were accepted (a
    ragged chain's padding drafts nothing). The same decisions as accept_walk with one sibling, given the same
    uniforms (u_accept [B, k])."""
    b, n = tree.tokens.shape
    k = n - 1
    dev = tree.tokens.device
    x = tree.tokens[:, 1:]  # [B, k] the drafts
    live = tree.depth[:, 1:] >= 0
    top1 = target_logits.argmax(-1)  # [B, n]
    px = p[:, :k].gather(2, x[..., None])[..., 0]
    qx = q[:, :k].gather(2, x[..., None])[..., 0]
    ok = live & torch.where(greedy[:, None], x == top1[:, :k], (qx > 0) & (u_accept[:, :k] * qx < px))
    count = ok.long().cumprod(1).sum(1)  # [B] accepted drafts
    rows = torch.arange(b, device=dev)
    p_end = p[rows, count]  # [B, V] the target at the last accepted node
    resid = (p_end - q[rows, count.clamp(max=k - 1)]).clamp(min=0)
    resid = resid / resid.sum(-1, keepdim=True).clamp(min=1e-30)
    # a draft the draft distribution could not have drawn (q(x) = 0) is skipped, not rejected: p stays as it is
    rejected = (count < live.sum(1)) & (qx.gather(1, count.clamp(max=k - 1)[:, None])[:, 0] > 0)
    dist = torch.where(rejected[:, None], resid, p_end)
    bonus = torch.where(greedy, top1[rows, count], sample_from(dist, u_bonus))
    idx = torch.arange(k + 1, device=dev)
    path = torch.where(idx[None, :] <= count[:, None], idx[None, :], -1)
    return Acceptance(path, count, bonus)


def accept_greedy(tree: TokenTree, target_logits: torch.Tensor, max_depth: int) -> Acceptance:
    """All rows greedy, vectorized: a node is accepted iff it and each of its ancestors equals the target's
    argmax at its parent; the deepest accepted node ends the path (siblings differ, so it is unique)."""
    top1 = target_logits.argmax(-1)  # [B, N]
    match = tree.tokens == top1.gather(1, tree.parents.clamp(min=0))
    match[:, 0] = True
    ok = ~(tree.mask & ~match[:, None, :]).any(-1)  # [B, N] the whole root-to-node path matches
    best = torch.where(ok, tree.depth, -1).argmax(-1)  # [B]
    rows = torch.arange(best.shape[0], device=best.device)
    on_path = tree.mask[rows, best]  # [B, N]
    d = torch.arange(max_depth + 1, device=best.device)
    hit = on_path[:, None, :] & (tree.depth[:, None, :] == d[None, :, None])  # [B, D+1, N]
    path = torch.where(hit.any(-1), hit.float().argmax(-1), -1)
    return Acceptance(path, tree.depth[rows, best], top1[rows, best])


def accept_walk(tree: TokenTree, target_logits: torch.Tensor, p: torch.Tensor | None, q: torch.Tensor | None,
                greedy: torch.Tensor, u_accept: torch.Tensor, u_bonus: torch.Tensor, max_depth: int,
                relaxed: Relaxed | None = None) -> Acceptance:
    """The general walk, level by level and sibling by sibling (sampling, mixed and relaxed batches)."""
    b, n = tree.tokens.shape
    dev = tree.tokens.device
    rows = torch.arange(b, device=dev)
    width = tree.children.shape[-1]
    cur = torch.zeros(b, dtype=torch.long, device=dev)
    alive = torch.ones(b, dtype=torch.bool, device=dev)
    bonus = torch.zeros(b, dtype=torch.long, device=dev)
    path = torch.full((b, max_depth + 1), -1, dtype=torch.long, device=dev)
    path[:, 0] = 0
    count = torch.zeros(b, dtype=torch.long, device=dev)
    for d in range(max_depth):
        logit_cur = target_logits[rows, cur]  # [B, V]
        top1 = logit_cur.argmax(-1)
        p_cur = p[rows, cur] if p is not None else None
        q_cur = q[rows, tree.q_row[rows, cur].clamp(min=0)] if q is not None else None
        if relaxed is not None:
            near = logit_cur.log_softmax(-1).topk(relaxed.topk, dim=-1)
            ok_lp = torch.where(near.values >= near.values[:, :1] - relaxed.delta, near.values, float("-inf"))
            best_lp = torch.full((b,), float("-inf"), device=dev)
        chosen = torch.full((b,), -1, dtype=torch.long, device=dev)
        for s in range(width):
            child = tree.children[rows, cur, s]
            open_ = alive & (child >= 0) & (chosen < 0)
            x = tree.tokens[rows, child.clamp(min=0)]
            if relaxed is None:
                take = open_ & greedy & (x == top1)
            else:  # greedy rows: the acceptable sibling with the highest target log-prob
                lp = torch.where(near.indices == x[:, None], ok_lp, float("-inf")).max(-1).values
                better = alive & (child >= 0) & greedy & (lp > best_lp)
                best_lp = torch.where(better, lp, best_lp)
                chosen = torch.where(better, child, chosen)
                take = torch.zeros_like(open_)
            if p_cur is not None:
                px, qx = p_cur.gather(1, x[:, None])[:, 0], q_cur.gather(1, x[:, None])[:, 0]
                drawn = open_ & ~greedy & (qx > 0)  # a sibling the draft could not have drawn is skipped
                ok = u_accept[:, d, s] * qx < px
                take = take | (drawn & ok)
                reject = drawn & ~ok
                resid = (p_cur - q_cur).clamp(min=0)
                resid = resid / resid.sum(-1, keepdim=True).clamp(min=1e-30)
                p_cur = torch.where(reject[:, None], resid, p_cur)
                q_next = q_cur.scatter(1, x[:, None], 0.0)
                q_next = q_next / q_next.sum(-1, keepdim=True).clamp(min=1e-30)
                q_cur = torch.where(reject[:, None], q_next, q_cur)
            chosen = torch.where(take, child, chosen)
        stop = alive & (chosen < 0)
        bonus = torch.where(stop, _bonus(top1, p_cur, greedy, u_bonus), bonus)
        go = alive & (chosen >= 0)
        cur = torch.where(go, chosen, cur)
        path[:, d + 1] = torch.where(go, chosen, -1)
        count = count + go.long()
        alive = go
    # rows that accepted every level: the bonus comes from the last node's unmodified distribution
    last = _bonus(target_logits[rows, cur].argmax(-1), p[rows, cur] if p is not None else None, greedy, u_bonus)
    bonus = torch.where(alive, last, bonus)
    return Acceptance(path, count, bonus)


def _bonus(top1: torch.Tensor, p: torch.Tensor | None, greedy: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    if p is None:
        return top1
    return torch.where(greedy, top1, sample_from(p, u))
