"""Fused Triton MoE (align, gate+up with SiLU*up, down, weighted combine) against moe_ref / moe_w8a8_ref; the
fixed-shape torch MoE (moe_gather) against moe_ref; what a captured step runs reads nothing back."""

from __future__ import annotations

import pytest
import torch
from _interp import DEVICE, poisoned, rel, wide_rows

from specdec.host_reads import HostReadError, no_host_reads
from specdec.kernels.fp8 import weight_quant_ref
from specdec.kernels.moe import moe, moe_align, moe_gather, moe_ref, moe_w8a8_ref

pytestmark = pytest.mark.interpreter


def _routing(g: torch.Generator, t: int, k: int, e: int, empty: tuple[int, ...] = ()) -> torch.Tensor:
    """[T, K] distinct experts per token avoiding `empty`, about a quarter of entries -1 (expert on another rank)."""
    allowed = torch.tensor([i for i in range(e) if i not in empty])
    ids = torch.stack([allowed[torch.randperm(len(allowed), generator=g)[:k]] for _ in range(t)])
    ids[torch.rand(t, k, generator=g) < 0.25] = -1
    return ids.to(DEVICE)


def _weights(g: torch.Generator, e: int, d: int, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    w13, w2 = 0.1 * torch.randn(e, 2 * i, d, generator=g), 0.1 * torch.randn(e, d, i, generator=g)
    return w13.to(DEVICE), w2.to(DEVICE)


def _quantize(w13: torch.Tensor, w2: torch.Tensor, bn: int, bk: int):
    """Per-expert FP8 with moe_ref's layout: s13 = gate grid then up grid (each half blocked on its own)."""
    i = w13.shape[1] // 2
    q13, s13, q2, s2 = [], [], [], []
    for e in range(w13.shape[0]):
        (gq, gs), (uq, us) = weight_quant_ref(w13[e, :i], bn, bk), weight_quant_ref(w13[e, i:], bn, bk)
        q13.append(torch.cat([gq, uq]))
        s13.append(torch.cat([gs, us]))
        dq, ds = weight_quant_ref(w2[e], bn, bk)
        q2.append(dq)
        s2.append(ds)
    return torch.stack(q13), torch.stack(q2), torch.stack(s13), torch.stack(s2)


def test_moe_align_groups_rows_by_expert(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    t, k, e, bm = 9, 3, 7, 4
    ids = _routing(g, t, k, e, empty=(2, 5))
    rows, bexp = moe_align(ids, e, bm)
    flat = ids.reshape(-1).cpu()
    n = flat.numel()
    used = bexp[bexp >= 0].cpu()
    assert rows.numel() % bm == 0 and bexp.numel() == rows.numel() // bm
    assert (bexp[: used.numel()] >= 0).all() and (bexp[used.numel():] == -1).all(), "used blocks come first"
    assert 2 not in used.tolist() and 5 not in used.tolist(), "experts without rows get no block"
    assert (used[1:] >= used[:-1]).all(), "one run of blocks per expert, in expert order"
    seen = []
    for blk, ex in enumerate(used.tolist()):
        r = rows[blk * bm:(blk + 1) * bm].cpu()
        real = r[r < n]
        assert (flat[real.long()] == ex).all(), f"seed {seed}"
        assert (r[len(real):] == n).all(), "padding only at the end of a run"
        seen += real.tolist()
    assert sorted(seen) == (flat >= 0).nonzero()[:, 0].tolist(), f"seed {seed}: every routed row exactly once"


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_moe_plain_weights(seed: int, dtype: torch.dtype, tol: float) -> None:
    g = torch.Generator().manual_seed(seed)
    t, k, e, d, i = 11, 3, 6, 80, 40
    ids = _routing(g, t, k, e, empty=(3,))
    w = torch.rand(t, k, generator=g).to(DEVICE)
    x = torch.randn(t, d, generator=g).to(DEVICE, dtype)
    w13, w2 = (a.to(dtype) for a in _weights(g, e, d, i))
    with poisoned():
        y = moe(x, ids, w, w13, w2)
    assert y.dtype == dtype and y.shape == (t, d)
    assert rel(y, moe_ref(x, ids, w, w13, w2)) < tol, f"seed {seed}"


def test_moe_gather_matches_reference(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    t, k, e, d, i = 7, 3, 4, 48, 24  # 21 routed pairs over 4 experts: experts repeat, some pairs are -1
    ids = _routing(g, t, k, e)
    w = torch.rand(t, k, generator=g).to(DEVICE)
    x = torch.randn(t, d, generator=g).to(DEVICE)
    w13, w2 = _weights(g, e, d, i)
    assert rel(moe_gather(x, ids, w, w13, w2), moe_ref(x, ids, w, w13, w2)) < 1e-5, f"seed {seed}"


def test_moe_in_a_captured_step_reads_nothing_back(seed: int) -> None:
    """The Triton MoE (moe_align groups rows on the device, into a number of blocks fixed by the shapes) and
    moe_gather run under the host-read guard; the reference, which selects and counts each expert's rows on the
    host, does not."""
    g = torch.Generator().manual_seed(seed)
    ids = _routing(g, 5, 2, 4)
    w, x = torch.rand(5, 2, generator=g).to(DEVICE), torch.randn(5, 32, generator=g).to(DEVICE)
    w13, w2 = _weights(g, 4, 32, 16)
    with no_host_reads():
        moe(x, ids, w, w13, w2)
        moe_gather(x, ids, w, w13, w2)
    with pytest.raises(HostReadError, match="inside a no-host-reads region"), no_host_reads():
        moe_ref(x, ids, w, w13, w2)


# rows routed elsewhere (-1) leave their row of the SiLU*up scratch unwritten; act_quant still reads it (NaN when
# poisoned) but nothing downstream uses those rows
@pytest.mark.filterwarnings("ignore:All-NaN slice")
@pytest.mark.parametrize("t", [1, 13])
def test_moe_fp8_w8a8(seed: int, t: int) -> None:
    g = torch.Generator().manual_seed(seed)
    k, e, d, i, bn, bk = 2, 5, 80, 48, 32, 32  # partial blocks: d = 2.5 blocks, each half of 2I = 1.5 blocks
    ids = _routing(g, t, k, e, empty=(1,))
    ids[0, 0] = 0  # at least one routed row
    w = torch.rand(t, k, generator=g).to(DEVICE)
    x = torch.randn(t, d, generator=g).to(DEVICE)
    w13, w2 = _weights(g, e, d, i)
    q13, q2, s13, s2 = _quantize(w13, w2, bn, bk)
    with poisoned():
        y = moe(x, ids, w, q13, q2, s13, s2, (bn, bk))
    ref = moe_w8a8_ref(x, ids, w, q13, q2, s13, s2, (bn, bk))
    # The SiLU*up activation is re-quantized to FP8 inside; when kernel and reference land a hair apart on either
    # side of an FP8 rounding boundary, one code flips (one e4m3 step, ~3% of that token's row). Every other row
    # must agree to fp32 accuracy, and at most one row in eight may carry such a flip.
    row_err = (y - ref).norm(dim=-1) / ref.norm(dim=-1).clamp_min(1e-12)
    assert int((row_err > 1e-5).sum()) <= max(1, t // 8), f"seed {seed}: rows {row_err.tolist()}"
    assert row_err.max() < 0.1, f"seed {seed}"
    # activation quantization on top of the weights' own: within block-quantization error of the float model
    assert rel(y, moe_ref(x, ids, w, w13, w2)) < 0.1, f"seed {seed}"


def test_moe_row_offsets_past_int32(seed: int) -> None:
    """x's row 2 starts 2^31 + 128 elements in (the gate/up kernel reads x by token * stride)."""
    g = torch.Generator().manual_seed(seed)
    e, d, i = 4, 32, 16
    x = wide_rows(3, d, torch.bfloat16)
    x.copy_(torch.randn(3, d, generator=g).bfloat16())
    ids = torch.tensor([[0, 1], [2, 3], [1, 2]], device=DEVICE)
    w = torch.rand(3, 2, generator=g).to(DEVICE)
    w13, w2 = (a.bfloat16() for a in _weights(g, e, d, i))
    y = moe(x, ids, w, w13, w2)
    assert rel(y, moe_ref(x.clone(), ids, w, w13, w2)) < 2e-2, f"seed {seed}"


def test_moe_align_needs_no_data(seed: int) -> None:
    """Every shape in moe_align follows from the input shapes (no bincount, nothing read back): it runs on the
    meta device, which has no data, so it cannot sync with the host either."""
    rows, bexp = moe_align(torch.empty(9, 3, dtype=torch.long, device="meta"), 7, 4)
    assert rows.device.type == "meta" and rows.shape[0] == bexp.shape[0] * 4, f"seed {seed}"


def test_moe_no_expert_on_this_rank() -> None:
    x = torch.randn(4, 32, device=DEVICE)
    ids = torch.full((4, 2), -1, device=DEVICE)
    w13, w2 = _weights(torch.Generator().manual_seed(0), 3, 32, 16)
    with poisoned():
        y = moe(x, ids, torch.ones(4, 2, device=DEVICE), w13, w2)
    assert torch.equal(y, torch.zeros_like(x))


def test_moe_checks_shapes() -> None:
    w13, w2 = _weights(torch.Generator().manual_seed(0), 3, 32, 16)
    with pytest.raises(ValueError, match="do not fit"):
        moe(torch.randn(4, 31, device=DEVICE), torch.zeros(4, 2, dtype=torch.long, device=DEVICE),
            torch.ones(4, 2, device=DEVICE), w13, w2)
    with pytest.raises(ValueError, match="scales"):
        moe(torch.randn(4, 32, device=DEVICE).bfloat16(), torch.zeros(4, 2, dtype=torch.long, device=DEVICE),
            torch.ones(4, 2, device=DEVICE), w13, w2)
