"""Property tests of tree construction: topology, ancestor masks, depths (positions), children and paths."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from specdec.tree import Candidates, chain_tree, monotone_scores, select_tree


@st.composite
def candidate_sets(draw):
    """Random EAGLE-style expansions: each level expands up to w nodes of the previous level into w children."""
    w = draw(st.integers(1, 4))
    k = draw(st.integers(1, 5))
    b = draw(st.integers(1, 3))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    tokens, parent, score = [], [], []
    lq = -torch.rand(b, w, generator=g) * 3
    score.append(monotone_scores(lq, torch.zeros(b)))
    parent.append(torch.full((b, w), -1))
    tokens.append(torch.randint(0, 100, (b, w), generator=g))
    start, n_level = 0, w
    for _ in range(1, k):
        f = min(w, n_level)
        lvl = torch.cat(score, 1)[:, start:start + n_level]
        front = start + lvl.topk(f, dim=-1).indices.sort(-1).values
        ps = torch.cat(score, 1).gather(1, front)
        raw = ps[..., None] - torch.rand(b, f, w, generator=g) * 3
        start = sum(t.shape[1] for t in tokens)
        score.append(monotone_scores(raw, ps).reshape(b, f * w))
        parent.append(front.repeat_interleave(w, 1))
        tokens.append(torch.randint(0, 100, (b, f * w), generator=g))
        n_level = f * w
    c = sum(t.shape[1] for t in tokens)
    budget = draw(st.integers(1, c))
    cands = Candidates(torch.cat(tokens, 1), torch.cat(parent, 1), torch.cat(score, 1), torch.arange(c).expand(b, c))
    return cands, budget, k, w


@settings(max_examples=60, deadline=None)
@given(candidate_sets())
def test_tree_properties(args):
    cands, budget, k, w = args
    b = cands.tokens.shape[0]
    root = torch.randint(0, 100, (b,))
    t = select_tree(root, cands, budget, max_depth=k, width=w)
    n = budget + 1
    assert t.tokens.shape == (b, n) and t.mask.shape == (b, n, n)
    for r in range(b):
        chosen = cands.score[r].topk(budget).indices.sort().values.tolist()
        # the selection is the top-budget by score, ancestor-closed, in topological order
        assert t.tokens[r, 1:].tolist() == [cands.tokens[r, i].item() for i in chosen]
        assert t.tokens[r, 0] == root[r] and t.parents[r, 0] == -1 and t.depth[r, 0] == 0
        for j in range(1, n):
            p = t.parents[r, j].item()
            assert 0 <= p < j
            cp = cands.parent[r, chosen[j - 1]].item()
            assert (p == 0 and cp == -1) or chosen[p - 1] == cp
            assert t.depth[r, j] == t.depth[r, p] + 1
        for j in range(n):  # mask = self + ancestors by walking parents
            anc, x = {j}, j
            while t.parents[r, x] >= 0:
                x = t.parents[r, x].item()
                anc.add(x)
            assert set(torch.nonzero(t.mask[r, j]).flatten().tolist()) == anc
        for j in range(n):  # children in node (= draw) order, and every kept sibling set is a draw-order prefix
            kids = [c for c in t.children[r, j].tolist() if c >= 0]
            assert kids == [c for c in range(n) if t.parents[r, c] == j]
            all_kids = [i for i in range(cands.tokens.shape[1])
                        if cands.parent[r, i] == (chosen[j - 1] if j else -1)]
            assert [chosen[c - 1] for c in kids] == all_kids[:len(kids)]
        leaves = [j for j in range(n) if not (t.parents[r] == j).any()]
        paths = [p for p in t.paths[r].tolist() if p[0] != -1]
        assert len(paths) == len(leaves)
        for p in paths:
            p = [x for x in p if x >= 0]
            assert p[0] == 0 and p[-1] in leaves
            assert all(t.parents[r, p[i + 1]] == p[i] for i in range(len(p) - 1))


def test_chain_tree():
    t = chain_tree(torch.tensor([9, 8]), torch.tensor([[1, 2, 3], [4, 5, 6]]))
    assert t.tokens.tolist() == [[9, 1, 2, 3], [8, 4, 5, 6]]
    assert t.parents[0].tolist() == [-1, 0, 1, 2] and t.depth[1].tolist() == [0, 1, 2, 3]
    assert torch.equal(t.mask[0], torch.ones(4, 4, dtype=torch.bool).tril())
    assert t.paths[0, 0].tolist() == [0, 1, 2, 3] and (t.paths[0, 1:] == -1).all()


@given(st.lists(st.floats(-20, 0), min_size=1, max_size=6), st.floats(-5, 0))
def test_monotone_scores(raw, parent):
    s = monotone_scores(torch.tensor([raw], dtype=torch.float64), torch.tensor([parent], dtype=torch.float64))[0]
    assert (s < parent).all() and (s[1:] < s[:-1]).all()
    assert (s <= torch.tensor(raw, dtype=torch.float64)).all()


def test_chain_tree_equals_the_general_builder():
    b, k = 3, 4
    root, drafts = torch.randint(0, 50, (b,)), torch.randint(0, 50, (b, k))
    cands = Candidates(drafts, torch.arange(-1, k - 1).expand(b, k),
                       -torch.arange(1, k + 1, dtype=torch.float64).expand(b, k), torch.arange(1, k + 1).expand(b, k))
    general, direct = select_tree(root, cands, k, max_depth=k, width=1), chain_tree(root, drafts)
    for f in ("tokens", "parents", "depth", "mask", "paths", "children"):
        assert torch.equal(getattr(general, f), getattr(direct, f)), f
    assert torch.equal(direct.q_row[:, :k], torch.arange(k).expand(b, k))  # node i's child came from row i
