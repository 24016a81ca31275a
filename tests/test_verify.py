"""Acceptance on synthetic distributions: the first emitted token is distributed exactly as the target's p at the
root (lossless), for chains and for trees whose siblings are drawn without replacement; greedy takes the argmax
path; relaxed acceptance is lossy and opt-in."""

from __future__ import annotations

import pytest
import torch
from stats import assert_matches

from specdec.sampling import gumbel_topk
from specdec.tree import Candidates, monotone_scores, select_tree
from specdec.verify import Relaxed, accept

V = 6


def _random_dists(b: int, n: int, g: torch.Generator, sharp: float = 1.5) -> torch.Tensor:
    return (torch.randn(n, V, generator=g) * sharp).softmax(-1).expand(b, n, V).contiguous()


def _tree_from_q(q_root: torch.Tensor, q_child: torch.Tensor, w: int, budget: int, g: torch.Generator):
    """Depth-2 tree: root's w children drawn without replacement from q_root; the best child expanded into w
    children drawn from q_child. Returns (tree, q [B, 2, V])."""
    b = q_root.shape[0]
    c1, lq1 = gumbel_topk(q_root.log(), torch.rand(b, V, generator=g), w)
    s1 = monotone_scores(lq1, torch.zeros(b))
    c2, lq2 = gumbel_topk(q_child.log(), torch.rand(b, V, generator=g), w)
    s2 = monotone_scores(s1[:, :1] + lq2, s1[:, 0])
    parent = torch.cat([torch.full((b, w), -1), torch.zeros(b, w, dtype=torch.long)], 1)
    exp_row = torch.cat([torch.ones(b, 1, dtype=torch.long), torch.full((b, 2 * w - 1), -1)], 1)
    cands = Candidates(torch.cat([c1, c2], 1), parent, torch.cat([s1, s2], 1), exp_row)
    tree = select_tree(torch.zeros(b, dtype=torch.long), cands, budget, max_depth=2, width=w)
    return tree, torch.stack([q_root, q_child], 1)


@pytest.mark.parametrize("w,budget", [(1, 2), (2, 4), (3, 4), (3, 6), (4, 2)])
def test_first_token_is_distributed_as_target(w, budget, seed):
    b = 40_000
    g = torch.Generator().manual_seed(seed)
    p = _random_dists(b, budget + 1, g)  # target distribution at each node
    q = _random_dists(b, 2, g)
    tree, qd = _tree_from_q(q[:, 0], q[:, 1], w, budget, g)
    # the target depends on the node: p at node i (any node order works for the test)
    logits = p.log()
    acc = accept(tree, logits, p, qd, torch.zeros(b, dtype=torch.bool), torch.rand(b, 2, w, generator=g),
                 torch.rand(b, generator=g), max_depth=2)
    first = torch.where(acc.num_accepted > 0, tree.tokens.gather(1, acc.path[:, 1:2].clamp(min=0))[:, 0], acc.bonus)
    assert_matches(torch.bincount(first, minlength=V), p[0, 0], what=f"seed={seed} first token")
    assert 0 < acc.num_accepted.float().mean() < 2, f"seed={seed}"  # both accepting and rejecting exercised
    # the second emitted token, given the first was an accepted draft x, follows p at x's node
    one = acc.num_accepted >= 1
    node = acc.path[:, 1]
    second = torch.where(acc.num_accepted >= 2, tree.tokens.gather(1, acc.path[:, 2:3].clamp(min=0))[:, 0],
                         acc.bonus)
    checked = 0
    for nd in range(1, tree.num_nodes):
        sel = one & (node == nd)
        if sel.sum() > 2000 and (tree.depth[sel, nd] == 1).all():
            assert_matches(torch.bincount(second[sel], minlength=V), p[0, nd], what=f"seed={seed} node {nd}")
            checked += 1
    assert checked > 0 or budget <= w  # with budget <= w every node is a root child


def test_greedy_takes_the_argmax_path():
    # chain of 3: drafts [a, b, c]; target argmax at root = a, at a = b, at b = something else
    tokens = torch.tensor([[0, 2, 4, 1]])
    from specdec.tree import chain_tree

    tree = chain_tree(tokens[:, 0], tokens[:, 1:])
    logits = torch.full((1, 4, V), -5.0)
    logits[0, 0, 2] = 5
    logits[0, 1, 4] = 5
    logits[0, 2, 3] = 5  # rejects draft 1, bonus 3
    logits[0, 3, 0] = 5
    acc = accept(tree, logits, None, None, torch.ones(1, dtype=torch.bool), torch.zeros(1, 3, 1), torch.zeros(1), 3)
    assert acc.num_accepted.tolist() == [2] and acc.bonus.tolist() == [3] and acc.path.tolist() == [[0, 1, 2, -1]]
    logits[0, 2, 1] = 10  # now everything accepted: bonus from the last node
    acc = accept(tree, logits, None, None, torch.ones(1, dtype=torch.bool), torch.zeros(1, 3, 1), torch.zeros(1), 3)
    assert acc.num_accepted.tolist() == [3] and acc.bonus.tolist() == [0]


def test_relaxed_acceptance_is_opt_in_and_lossy():
    from specdec.tree import chain_tree

    tree = chain_tree(torch.tensor([0]), torch.tensor([[3]]))
    logits = torch.full((1, 2, V), -5.0)
    logits[0, 0, 2] = 2.0
    logits[0, 0, 3] = 1.8  # second best, within delta
    args = (None, None, torch.ones(1, dtype=torch.bool), torch.zeros(1, 1, 1), torch.zeros(1), 1)
    assert accept(tree, logits, *args).num_accepted.item() == 0
    assert accept(tree, logits, *args, relaxed=Relaxed(topk=2, delta=0.5)).num_accepted.item() == 1
    assert accept(tree, logits, *args, relaxed=Relaxed(topk=2, delta=0.1)).num_accepted.item() == 0
    assert accept(tree, logits, *args, relaxed=Relaxed(topk=1, delta=5.0)).num_accepted.item() == 0


def test_vectorized_greedy_equals_the_walk(seed):
    from specdec.verify import accept_greedy, accept_walk

    g = torch.Generator().manual_seed(seed)
    for w, budget in [(1, 2), (2, 3), (3, 5), (4, 6)]:
        b = 64
        q = _random_dists(b, 2, g, sharp=3.0)
        tree, _ = _tree_from_q(q[:, 0], q[:, 1], w, budget, g)
        # targets that often agree with the drafts: sharpen towards the drafted tokens
        n = tree.num_nodes
        logits = torch.randn(b, n, V, generator=g)
        logits.scatter_add_(2, tree.tokens[:, None, :].expand(b, n, n), 2 * torch.rand(b, n, n, generator=g))
        fast = accept_greedy(tree, logits, 2)
        slow = accept_walk(tree, logits, None, None, torch.ones(b, dtype=torch.bool), torch.zeros(b, 2, w),
                           torch.zeros(b), 2)
        assert torch.equal(fast.path, slow.path) and torch.equal(fast.bonus, slow.bonus), f"seed={seed} w={w}"
        assert torch.equal(fast.num_accepted, slow.num_accepted), f"seed={seed} w={w}"
        assert 0 < fast.num_accepted.sum() < 2 * b, f"seed={seed} w={w}"


@pytest.mark.parametrize("ragged", [False, True], ids=["full", "ragged"])
def test_vectorized_chain_acceptance_equals_the_walk(seed, ragged):
    """Sampled, greedy and mixed chains: the same uniforms give the same path and bonus as the walk, including
    drafts the draft distribution gives no mass (skipped, not rejected). Ragged (adaptive speculation): request b
    keeps lengths[b] of the k drafts, the rest padding that no node sees and acceptance never reaches (a request
    that kept none takes its bonus at the root)."""
    from specdec.tree import chain_tree
    from specdec.verify import accept_chain, accept_walk

    g = torch.Generator().manual_seed(seed)
    b, k = 256, 3
    q = (3 * torch.rand(b, k, V, generator=g)).softmax(-1)
    drafts = torch.multinomial(q.view(-1, V), 1, generator=g).view(b, k)
    q[torch.arange(b)[:8], 0, drafts[:8, 0]] = 0  # q(x) = 0 for a few rows
    q = q / q.sum(-1, keepdim=True)
    logits = torch.randn(b, k + 1, V, generator=g)
    logits.scatter_add_(2, drafts[:, None, :].expand(b, k + 1, k), 2 * torch.rand(b, k + 1, k, generator=g))
    p = logits.softmax(-1)
    lengths = torch.randint(0, k + 1, (b,), generator=g) if ragged else torch.full((b,), k)
    tree = chain_tree(torch.zeros(b, dtype=torch.long), drafts, lengths if ragged else None)
    assert torch.equal((tree.depth >= 0).sum(1), lengths + 1)
    assert not tree.mask[tree.depth < 0].any() and not tree.mask.transpose(1, 2)[tree.depth < 0].any()
    greedy = torch.rand(b, generator=g) < 0.3
    u, ub = torch.rand(b, k, 1, generator=g), torch.rand(b, generator=g)
    fast = accept_chain(tree, logits, p, q, greedy, u[:, :, 0], ub)
    slow = accept_walk(tree, logits, p, q, greedy, u, ub, k)
    assert torch.equal(fast.num_accepted, slow.num_accepted), f"seed={seed}"
    assert torch.equal(fast.path, slow.path) and torch.equal(fast.bonus, slow.bonus), f"seed={seed}"
    assert 0 < fast.num_accepted.sum() < k * b and (fast.num_accepted <= lengths).all(), f"seed={seed}"
