"""The torch backend's batched paths equal the references on fresh random inputs."""

from __future__ import annotations

import pytest
import torch

from specdec.kernels.attn_meta import AttnMeta, causal_tree_mask
from specdec.kernels.mla import mla_attention_ref
from specdec.kernels.moe import moe_ref
from specdec.kernels.torch_backend import mla_attention_mqa, moe_runs, moe_sparse, mqa_attention


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_mla_mqa_matches_reference(dtype, tol):
    h, c, r = 4, 32, 8
    ctx, new = [0, 7, 30], [5, 1, 4]
    slots = 64
    perm = torch.randperm(3 * slots).view(3, slots)  # scattered slots
    cache = torch.randn(3 * slots, c + r).to(dtype)
    mask = causal_tree_mask(new)
    mask[-2:, 1] = False  # a tree: the last sequence's nodes 2, 3 branch off the root, not node 1
    meta = AttnMeta.build(perm, ctx, new, mask)
    t = sum(new)
    q_lat, q_pe = torch.randn(t, h, c).to(dtype), torch.randn(t, h, r).to(dtype)
    ref = mla_attention_ref(q_lat, q_pe, cache, meta, 0.3)
    assert rel(mla_attention_mqa(q_lat, q_pe, cache, meta, 0.3), ref) < tol


def test_contiguous_meta_equals_an_explicit_block_table():
    base, ctx, new = torch.tensor([0, 40, 100]), [3, 0, 7], [2, 5, 1]
    meta = AttnMeta.contiguous(base, ctx, new)
    explicit = AttnMeta.build(base[:, None] + torch.arange(10)[None], ctx, new, causal_tree_mask(new))
    assert torch.equal(meta.slots, explicit.slots) and torch.equal(meta.tree_mask, explicit.tree_mask)
    assert meta.slots.tolist() == [3, 4, 40, 41, 42, 43, 44, 107]
    for b in range(3):
        assert torch.equal(meta.seq_slots(b), explicit.seq_slots(b))


@pytest.mark.parametrize("t,k", [(1, 2), (1, 1), (4, 2), (9, 2), (40, 3)])
@pytest.mark.parametrize("layout", ["checkpoint", "cpu"])
def test_moe_sparse_matches_reference(t, k, layout, seed):
    """Decode (one token) and grouped paths, on the checkpoint's [E, 2I, D] storage and on the CPU layout's
    transposed storage; an expert on another rank (-1) is skipped."""
    from specdec.model.layers import transposed_storage

    g = torch.Generator().manual_seed(seed)
    e, d, i = 6, 16, 8
    x = torch.randn(t, d, generator=g)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    if k > 1:
        ids[0, 0] = -1
    w = torch.rand(t, k, generator=g)
    w13, w2 = torch.randn(e, 2 * i, d, generator=g), torch.randn(e, d, i, generator=g)
    ref = moe_ref(x, ids, w, w13, w2)
    if layout == "cpu":
        for p in (w13, w2):
            transposed_storage(p)
        assert w13[0].t().is_contiguous()
    err = rel(moe_sparse(x, ids, w, w13, w2), ref)
    assert err < 1e-5, f"seed={seed}: rel err {err:.2e}"


def test_mqa_attention_slices_consecutive_slots(seed):
    """A contiguous AttnMeta on the CPU reads rows as views (host_base) and gives what gathering gives."""
    g = torch.Generator().manual_seed(seed)
    h, c, r = 4, 16, 8
    cache = torch.randn(100, c + r, generator=g)
    meta = AttnMeta.contiguous(torch.tensor([3, 50]), [10, 4], [1, 3])
    assert meta.host_base == (3, 50)
    gathered = AttnMeta.build(meta.block_table, [10, 4], [1, 3], meta.tree_mask)
    assert gathered.host_base is None
    q = torch.randn(4, h, c + r, generator=g)
    assert torch.equal(mqa_attention(q, cache, meta, 0.2, c), mqa_attention(q, cache, gathered, 0.2, c))
    ref = mla_attention_ref(q[..., :c], q[..., c:], cache, meta, 0.2)
    assert rel(mqa_attention(q, cache, meta, 0.2, c), ref) < 1e-5, f"seed={seed}"


def test_mqa_decode_at_batch_one_matches_reference(seed):
    g = torch.Generator().manual_seed(seed)
    h, c, r = 4, 16, 8
    cache = torch.randn(64, c + r, generator=g)
    q = torch.randn(1, h, c + r, generator=g)
    for meta in (AttnMeta.contiguous(torch.tensor([5]), [20], [1]),  # sliced rows
                 AttnMeta.build(torch.randperm(64, generator=g)[None, :30], [29], [1], torch.ones(1, 1, dtype=bool))):
        ref = mla_attention_ref(q[..., :c], q[..., c:], cache, meta, 0.3)
        assert rel(mqa_attention(q, cache, meta, 0.3, c), ref) < 1e-5, f"seed={seed}"


@pytest.mark.parametrize("t,k", [(2, 2), (4, 2), (7, 3), (1, 2)])
def test_moe_runs_matches_reference(t, k, seed):
    """The verify path: runs of consecutive chosen experts as batched GEMMs over every token, on the CPU layout's
    transposed storage; an expert on another rank (-1) is skipped; unchosen experts are never read (NaN weights
    there would poison the result)."""
    from specdec.model.layers import transposed_storage

    g = torch.Generator().manual_seed(seed)
    e, d, i = 8, 16, 8
    x = torch.randn(t, d, generator=g)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    ids[0, 0] = -1
    w = torch.rand(t, k, generator=g)
    w13, w2 = torch.randn(e, 2 * i, d, generator=g), torch.randn(e, d, i, generator=g)
    ref = moe_ref(x, ids, w, w13, w2)
    unchosen = sorted(set(range(e)) - set(ids[ids >= 0].tolist()))
    w13[unchosen], w2[unchosen] = float("nan"), float("nan")
    for p in (w13, w2):
        transposed_storage(p)
    err = rel(moe_runs(x, ids, w, w13, w2), ref)
    assert err < 1e-5, f"seed={seed}: rel err {err:.2e}"


def test_is_causal_comes_from_the_builder() -> None:
    """No mask given is causal; a tree's mask is not (unless each sequence has one new token); either way a host
    field, never read back from the device: it works on the meta device, which has no data to read."""
    bt = torch.arange(40).view(2, 20)
    tree = causal_tree_mask([3, 2]).clone()
    tree[2, 1] = False  # node 2 is a sibling of node 1, not its child
    assert not AttnMeta.build(bt, [3, 4], [3, 2], tree).is_causal
    assert AttnMeta.build(bt, [3, 4], [1, 1], torch.ones(2, 1, dtype=torch.bool)).is_causal
    meta = AttnMeta.build(bt.to("meta"), [3, 4], [3, 2])
    assert meta.is_causal and not meta.from_scratch
    assert torch.equal(AttnMeta.build(bt, [3, 4], [3, 2]).tree_mask, causal_tree_mask([3, 2]))
    assert AttnMeta.build(bt.to("meta"), [0, 0], [3, 2]).from_scratch
