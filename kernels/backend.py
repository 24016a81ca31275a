"""Backend choice: which implementation runs each kernel. Chosen once and passed down explicitly."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .fp8 import weight_dequant_ref
from .mla import AttnMeta, mla_attention_ref
from .moe import moe_ref

BACKENDS = ("torch", "triton", "flashinfer")


@dataclass(frozen=True)
class Backend:
    name: str = "torch"

    @classmethod
    def resolve(cls, name: str, device: torch.device) -> Backend:
        if name == "auto":
            name = "triton" if device.type == "cuda" else "torch"
        if name not in BACKENDS:
            raise ValueError(f"backend={name!r}: choose one of auto, {', '.join(BACKENDS)}")
        if name == "flashinfer" and device.type != "cuda":
            raise ValueError("backend='flashinfer' needs a CUDA device (flashinfer has no CPU kernels)")
        return cls(name)

    def fp8_linear(self, x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
        """x [..., K] @ dequant(w [N, K], s).T -> [..., N] in x's dtype."""
        return F.linear(x, weight_dequant_ref(w, s, *block, dtype=x.dtype))

    def mla_attention(self, q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, meta: AttnMeta,
                      scale: float) -> torch.Tensor:
        return mla_attention_ref(q_lat, q_pe, kv_cache, meta, scale)

    def moe(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor, w13: torch.Tensor,
            w2: torch.Tensor, s13: torch.Tensor | None, s2: torch.Tensor | None,
            block: tuple[int, int]) -> torch.Tensor:
        return moe_ref(x, topk_ids, topk_w, w13, w2, s13, s2, block)
