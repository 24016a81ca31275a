"""The flashinfer backend's plan metadata, checked without flashinfer or a GPU."""

from __future__ import annotations

import torch

from specdec.kernels.attn_meta import AttnMeta, causal_tree_mask
from specdec.kernels.flashinfer_mla import FlashinferMLA, kv_pages


def test_kv_pages_lists_every_sequences_keys(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ctx, n_new = [5, 0, 9], [1, 3, 2]
    bt = torch.randperm(60, generator=g).view(3, 20)
    meta = AttnMeta.build(bt, ctx, n_new, causal_tree_mask(n_new))
    lens = [c + n for c, n in zip(ctx, n_new)]
    indptr = torch.tensor([0, *lens]).cumsum(0)
    got = kv_pages(bt, torch.tensor(lens), indptr, sum(lens))
    want = torch.cat([meta.seq_slots(b) for b in range(3)])
    assert got.dtype == torch.int32 and torch.equal(got.long(), want), f"seed {seed}"


def test_fits_only_what_the_wrapper_takes() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    meta = AttnMeta.build(torch.arange(8)[None], [3], [2])  # causal: a chain
    with FakeTensorMode():  # CUDA tensors without a GPU
        q, q_pe, kv = (torch.empty(*s, device="cuda", dtype=torch.bfloat16) for s in [(2, 4, 512), (2, 4, 64),
                                                                                         (8, 576)])
        kv32, q32 = kv.float(), q.float()
    assert FlashinferMLA.fits(q, q_pe, kv, meta)
    assert not FlashinferMLA.fits(q, q_pe, kv32, meta), "a float32 cache under bf16 queries"
    assert not FlashinferMLA.fits(q32, q_pe, kv32, meta), "float32"
    assert not FlashinferMLA.fits(q.cpu(), q_pe, kv, meta), "CPU tensors"
    tree = AttnMeta.build(torch.arange(8)[None], [3], [2], torch.ones(2, 2, dtype=torch.bool))
    assert not FlashinferMLA.fits(q, q_pe, kv, tree), "not causal"
