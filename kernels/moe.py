"""Routed-expert MoE compute: tokens x chosen experts -> weighted sum of SiLU-gated expert MLPs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .fp8 import weight_dequant_ref


def moe_ref(x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
            s13: torch.Tensor | None = None, s2: torch.Tensor | None = None,
            block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """x [T, D]; topk_ids [T, K] local expert ids, -1 = not on this rank; topk_w [T, K] float32;
    w13 [E, 2I, D] (gate rows then up rows), w2 [E, D, I], FP8 with block scales or plain. FP8 scales:
    s13 [E, 2 * ceil(I/bn), ceil(D/bk)] holds the gate grid then the up grid (each half blocked on its own, so a
    partial last block of I stays inside its half); s2 [E, ceil(D/bn), ceil(I/bk)].
    Returns sum_k topk_w[t, k] * expert_k(x[t]) as [T, D] in x's dtype. Experts with no tokens cost nothing."""
    t, k = topk_ids.shape
    e_count = w13.shape[0]
    flat = topk_ids.reshape(-1)
    valid = flat >= 0
    order = torch.argsort(torch.where(valid, flat, e_count), stable=True)
    counts = torch.bincount(flat[valid], minlength=e_count).tolist()  # the one host sync
    out = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        idx = order[start:start + n]
        start += n
        a = w13[e] if s13 is None else dequant_w13(w13[e], s13[e], block, x.dtype)
        b = w2[e] if s2 is None else weight_dequant_ref(w2[e], s2[e], *block, dtype=x.dtype)
        tok = idx // k
        xe = x[tok]
        gate, up = F.linear(xe, a).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, b)
        out.index_add_(0, tok, y.float() * topk_w.reshape(-1)[idx, None])
    return out.to(x.dtype)


def dequant_w13(w13: torch.Tensor, s13: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """One expert's fused gate+up weight [2I, D] from FP8 with per-half block scales (see moe_ref)."""
    i, g = w13.shape[0] // 2, s13.shape[0] // 2
    return torch.cat([weight_dequant_ref(w13[:i], s13[:g], *block, dtype=dtype),
                      weight_dequant_ref(w13[i:], s13[g:], *block, dtype=dtype)])
