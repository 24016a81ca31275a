"""Token trees as tensors (the EAGLE representation), built from ranked draft candidates.

Node 0 is the root (the last committed token, not yet in the main cache); nodes are in topological order. A batch
whose requests draft different numbers of nodes (adaptive speculation) is ragged: request b's n_b nodes come first,
then padding nodes up to the batch's widest, with depth -1, no parent, no children, in no path and in no mask row or
column (so no node attends to one and acceptance never reaches one).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Candidates:
    """Every drafted token of a step, for B requests with the same count C each, in generation order
    (a parent always precedes its children; siblings are consecutive, in draw order)."""

    tokens: torch.Tensor  # [B, C] int64
    parent: torch.Tensor  # [B, C] int64 candidate index of the parent, -1 = the root
    score: torch.Tensor  # [B, C] float64 ranking score: below its parent's and its earlier siblings'
    exp_row: torch.Tensor  # [B, C] int64 row of the draft distribution of its children, -1 = not expanded


@dataclass(frozen=True)
class TokenTree:
    tokens: torch.Tensor  # [B, N] int64, node 0 = root
    parents: torch.Tensor  # [B, N] int64, -1 for the root
    depth: torch.Tensor  # [B, N] int64, root 0: position = committed length + depth; -1: padding
    mask: torch.Tensor  # [B, N, N] bool, mask[b, i, j]: j is i or an ancestor of i (padding: none)
    paths: torch.Tensor  # [B, N, D+1] int64 root-to-leaf node indices, one row per leaf, padded with -1
    children: torch.Tensor  # [B, N, W] int64 child nodes in draw order, padded with -1
    q_row: torch.Tensor  # [B, N] int64 draft distribution row of each node's children, -1 = none

    @property
    def num_nodes(self) -> int:
        return self.tokens.shape[1]


def monotone_scores(raw: torch.Tensor, parent_score: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """raw [..., W] cumulative log-probs of W siblings in draw order; parent_score [...].

    Returns float64 scores strictly below the parent's and each earlier sibling's, so that any top-n selection
    keeps every selected node's parent and earlier siblings (a tree, whose sibling sets are draw-order prefixes).
    Impossible drafts (log q = -inf) get a finite floor so that the order stays strict."""
    raw = raw.double().clamp(min=-1e6)
    out = torch.minimum(raw, parent_score.double()[..., None] - eps)
    return torch.cummin(out, dim=-1).values - eps * torch.arange(raw.shape[-1], device=raw.device)


def chain_tree(root: torch.Tensor, drafts: torch.Tensor, lengths: torch.Tensor | None = None) -> TokenTree:
    """A chain root -> d1 -> ... -> dk (root [B], drafts [B, K]): only the tokens vary, the rest is a cached
    skeleton expanded over the batch. Node i's child was drawn from draft distribution row i. lengths [B] (None:
    K each): request b keeps drafts[b, :lengths[b]], the rest are padding."""
    b, k = drafts.shape
    n = k + 1
    tokens = torch.cat([root[:, None], drafts], 1)
    parents, depth, mask, paths, children, q_row = _chain_skeleton(n, drafts.device)
    if lengths is None:
        return TokenTree(tokens=tokens, parents=parents.expand(b, n), depth=depth.expand(b, n),
                         mask=mask.expand(b, n, n), paths=paths.expand(b, n, n), children=children.expand(b, n, 1),
                         q_row=q_row.expand(b, n))
    live = depth[None, :] <= lengths[:, None]  # [B, N]
    has_child = torch.cat([live[:, 1:], torch.zeros_like(live[:, :1])], 1)
    return TokenTree(tokens=tokens, parents=torch.where(live, parents, -1), depth=torch.where(live, depth, -1),
                     mask=mask & live[:, :, None] & live[:, None, :], paths=torch.where(live[:, None, :], paths, -1),
                     children=torch.where(has_child, children[:, 0], -1)[..., None],
                     q_row=torch.where(has_child, q_row, -1))


@functools.lru_cache(maxsize=64)
def _chain_skeleton(n: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    idx = torch.arange(n, device=device)
    return (idx - 1, idx, torch.ones(n, n, dtype=torch.bool, device=device).tril(),
            torch.where(idx[:, None] == 0, idx[None, :], -1), torch.where(idx < n - 1, idx + 1, -1)[:, None],
            torch.where(idx < n - 1, idx, -1))


def select_tree(root: torch.Tensor, cands: Candidates, budget: int, max_depth: int, width: int,
                keep: torch.Tensor | None = None) -> TokenTree:
    """Keep the `budget` best-scored candidates (EAGLE-2's reranking) and lay them out as a TokenTree.

    root [B] root tokens; max_depth bounds the candidates' depth, width their number of siblings. keep [B, C] bool
    (None: all): the candidates a request may keep, a set closed under parents and earlier siblings (as a score
    threshold is, scores being monotone); request b keeps its min(budget, keep[b].sum()) best, the rest of the
    batch's widest tree is padding."""
    return tree_of(root, cands, rank_candidates(cands, budget, keep), max_depth, width)


def rank_candidates(cands: Candidates, budget: int, keep: torch.Tensor | None = None) -> torch.Tensor:
    """[B, n] the candidate index of each draft node, in topological order, -1 for padding (after every real node):
    each request's best min(budget, kept) candidates by score."""
    b, c = cands.tokens.shape
    score = cands.score if keep is None else torch.where(keep, cands.score, float("-inf"))
    best = score.topk(min(budget, c), dim=-1)
    if keep is None:
        return best.indices.sort(dim=-1).values
    real = best.values > float("-inf")
    return torch.where(real, best.indices, c).sort(dim=-1).values.masked_fill(~real.sort(-1, descending=True)[0], -1)


def tree_of(root: torch.Tensor, cands: Candidates, idx: torch.Tensor, max_depth: int, width: int) -> TokenTree:
    """The TokenTree of root [B] and the candidates idx [B, n] (rank_candidates: topological, -1 padding last)."""
    b, c = cands.tokens.shape
    dev = root.device
    n = idx.shape[1] + 1
    real = idx >= 0
    at = idx.clamp(min=0)
    node_of = torch.full((b, c + 1), -1, dtype=torch.long, device=dev)  # column c: padding's candidate
    node_of.scatter_(1, torch.where(real, idx, c), torch.arange(1, n, device=dev).expand(b, n - 1).contiguous())
    node_of = node_of[:, :c]
    pc = cands.parent.gather(1, at)
    pnode = torch.where(pc < 0, 0, node_of.gather(1, pc.clamp(min=0)))
    parents = torch.cat([torch.full((b, 1), -1, device=dev, dtype=torch.long), torch.where(real, pnode, -1)], dim=1)
    tokens = torch.cat([root[:, None], torch.where(real, cands.tokens.gather(1, at), 0)], dim=1)
    q_row = torch.cat([torch.zeros(b, 1, dtype=torch.long, device=dev),
                       torch.where(real, cands.exp_row.gather(1, at), -1)], dim=1)
    live = torch.cat([torch.ones(b, 1, dtype=torch.bool, device=dev), real], 1)

    # ancestor-or-self mask by repeated parent hops
    hop = torch.zeros(b, n, n, device=dev)
    hop[:, 1:].scatter_(2, parents[:, 1:, None].clamp(min=0), real[..., None].float())  # hop[b, i, parent(i)] = 1
    mask = torch.diag_embed(live.float())
    reach = mask.clone()
    for _ in range(max_depth):
        reach = torch.bmm(reach, hop)
        mask = mask + reach
    mask = mask > 0
    depth = mask.sum(-1) - 1

    is_child = hop.transpose(1, 2) > 0  # [B, parent, child]
    rank = is_child.long().cumsum(-1) - 1  # child's rank among its siblings, in node (= draw) order
    children = torch.full((b, n, width + 1), -1, dtype=torch.long, device=dev)
    slot = torch.where(is_child, rank, width)  # non-children go to a spill column
    children.scatter_(2, slot, torch.arange(n, device=dev).expand(b, n, n).contiguous())
    children = children[..., :width]

    leaf = ~is_child.any(-1) & live  # [B, N]
    d = torch.arange(max_depth + 1, device=dev)
    on_path = mask[:, :, None, :] & (depth[:, None, None, :] == d[None, None, :, None])  # [B, leaf, D+1, node]
    paths = torch.where(on_path.any(-1), on_path.float().argmax(-1), -1)
    order = torch.argsort((~leaf).long(), dim=1, stable=True)  # leaves first
    paths = torch.where(leaf[..., None], paths, -1).gather(1, order[..., None].expand_as(paths))
    return TokenTree(tokens, parents, depth, mask, paths, children, q_row)
