"""Triton MLA over the latent cache (decode, chains, token trees, split-KV) against mla_attention_ref; a captured
step's metadata (host bounds only) through the Triton kernel and the fixed-shape torch path."""

from __future__ import annotations

import pytest
import torch
from _interp import DEVICE, poisoned, rel, wide_rows

from specdec.kernels.attn_meta import AttnMeta, causal_tree_mask
from specdec.kernels.mla import mla_attention, mla_attention_padded, mla_attention_ref

pytestmark = pytest.mark.interpreter


def _tree_mask(g: torch.Generator, n: int) -> torch.Tensor:
    """[n, n] ancestor mask of a random tree in topological order (node 0 the root, each node sees itself)."""
    m = torch.eye(n, dtype=torch.bool)
    for i in range(1, n):
        m[i] |= m[int(torch.randint(0, i, (1,), generator=g))]
    return m


def _case(g: torch.Generator, ctx: list[int], n_new: list[int], kind: str, h: int, c: int, r: int,
          dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, AttnMeta]:
    """Random queries, a random pool with each sequence's slots scattered over it, and the metadata."""
    total = sum(ctx) + sum(n_new)
    pool = torch.randperm(total + 17, generator=g)  # 17 slots nobody owns
    width = max(a + b for a, b in zip(ctx, n_new)) + 3
    bt = torch.full((len(ctx), width), -1, dtype=torch.long)
    o = 0
    for b, (a, n) in enumerate(zip(ctx, n_new)):
        bt[b, : a + n] = pool[o:o + a + n]
        o += a + n
    if kind == "tree":
        n_max = max(n_new)
        tm = torch.cat([torch.nn.functional.pad(_tree_mask(g, n), (0, n_max - n)) for n in n_new])
    else:
        tm = causal_tree_mask(n_new)
    t = sum(n_new)
    q = torch.randn(t, h, c, generator=g).to(DEVICE, dtype)
    q_pe = torch.randn(t, h, r, generator=g).to(DEVICE, dtype)
    kv = torch.randn(total + 17, c + r, generator=g).to(DEVICE, dtype)
    return q, q_pe, kv, AttnMeta.build(bt.to(DEVICE), ctx, n_new, tm.to(DEVICE))


CASES = {
    "decode": ([1, 37, 90], [1, 1, 1], "chain"),
    "chain": ([12, 0, 50], [3, 1, 4], "chain"),
    "tree": ([20, 65, 0, 9], [5, 8, 0, 2], "tree"),  # one sequence with no new tokens this step
}


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_mla_matches_reference(seed: int, case: str, splits: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ctx, n_new, kind = CASES[case]
    q, q_pe, kv, meta = _case(g, ctx, n_new, kind, h=4, c=32, r=8, dtype=torch.float32)
    scale = 0.1 + float(torch.rand(1, generator=g))
    with poisoned():
        out = mla_attention(q, q_pe, kv, meta, scale, num_splits=splits)
    assert out.dtype == torch.float32 and out.shape == q.shape
    assert rel(out, mla_attention_ref(q, q_pe, kv, meta, scale)) < 1e-5, f"seed {seed}"


def test_mla_bf16_and_odd_head_dims(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    q, q_pe, kv, meta = _case(g, [40, 3], [3, 2], "tree", h=3, c=24, r=6, dtype=torch.bfloat16)
    with poisoned():
        out = mla_attention(q, q_pe, kv, meta, 0.2, num_splits=2)
    assert rel(out, mla_attention_ref(q, q_pe, kv, meta, 0.2)) < 1e-2, f"seed {seed}"


def test_mla_64_node_trees_long_context(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    q, q_pe, kv, meta = _case(g, [200, 40], [64, 33], "tree", h=2, c=32, r=8, dtype=torch.float32)
    out = mla_attention(q, q_pe, kv, meta, 0.15, num_splits=4)
    assert rel(out, mla_attention_ref(q, q_pe, kv, meta, 0.15)) < 1e-5, f"seed {seed}"


def test_mla_slot_offsets_past_int32(seed: int) -> None:
    """The cache's slot 2 starts 2^31 + 128 elements in; slot * stride must stay 64-bit (slots come from the int64
    block table)."""
    g = torch.Generator().manual_seed(seed)
    kv = wide_rows(3, 40, torch.bfloat16)
    kv.copy_(torch.randn(3, 40, generator=g).bfloat16())
    q = torch.randn(1, 2, 32, generator=g).to(DEVICE, torch.bfloat16)
    q_pe = torch.randn(1, 2, 8, generator=g).to(DEVICE, torch.bfloat16)
    meta = AttnMeta.build(torch.tensor([[2, 0, 1]], device=DEVICE), [2], [1], causal_tree_mask([1], DEVICE))
    out = mla_attention(q, q_pe, kv, meta, 0.3)
    assert rel(out, mla_attention_ref(q, q_pe, kv.clone(), meta, 0.3)) < 1e-2, f"seed {seed}"


@pytest.mark.parametrize("kind", ["chain", "tree"])
def test_captured_metadata_matches_reference(seed: int, kind: str) -> None:
    """The block table at a fixed width far past the longest sequence, lengths on the device only: the Triton
    kernel cuts its splits from the bound (most of them empty here) and the torch path attends over the whole
    width; both give the reference's result on the same step's ordinary metadata."""
    g = torch.Generator().manual_seed(seed)
    q, q_pe, kv, meta = _case(g, [9, 70, 0], [3, 3, 3], kind, h=4, c=32, r=8, dtype=torch.float32)
    table = torch.zeros(3, 256, dtype=torch.long, device=DEVICE)  # slot 0 past each row's keys: never seen
    table[:, :meta.block_table.shape[1]] = meta.block_table.clamp(min=0)
    captured = AttnMeta.captured(table, meta.ctx_lens.clone(), meta.tree_mask.clone(),
                                 torch.empty(9, dtype=torch.long, device=DEVICE), 3)
    captured.fill_slots()
    assert torch.equal(captured.slots, meta.slots)
    want = mla_attention_ref(q, q_pe, kv, meta, 0.2)
    with poisoned():
        out = mla_attention(q, q_pe, kv, captured, 0.2, num_splits=4)
    assert rel(out, want) < 1e-5, f"seed {seed}"
    assert rel(mla_attention_padded(q, q_pe, kv, captured, 0.2), want) < 1e-5, f"seed {seed}"
