"""FP8 (e4m3) block quantization: activation quant (1 x block), weight dequant (block x block), W8A8 GEMM.

Plain-torch references; Triton kernels of the same functions live beside them.
"""

from __future__ import annotations

import torch

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def weight_dequant_ref(w: torch.Tensor, s: torch.Tensor, block_n: int = 128, block_k: int = 128,
                       dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """w [N, K] fp8, s [ceil(N/bn), ceil(K/bk)] f32 -> w * s per block, [N, K] in `dtype` (edge blocks partial)."""
    n, k = w.shape
    if s.shape != (_cdiv(n, block_n), _cdiv(k, block_k)):
        raise ValueError(f"weight scale shape {tuple(s.shape)} does not match weight {tuple(w.shape)} "
                         f"with {block_n}x{block_k} blocks")
    full = s.float().repeat_interleave(block_n, 0)[:n].repeat_interleave(block_k, 1)[:, :k]
    return (w.float() * full).to(dtype)


def weight_quant_ref(w: torch.Tensor, block_n: int = 128, block_k: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """Inverse of weight_dequant: w [N, K] float -> (fp8 [N, K], scale_inv f32 [ceil(N/bn), ceil(K/bk)])."""
    n, k = w.shape
    nb, kb = _cdiv(n, block_n), _cdiv(k, block_k)
    pad = torch.zeros(nb * block_n, kb * block_k, dtype=torch.float32, device=w.device)
    pad[:n, :k] = w.float()
    blocks = pad.view(nb, block_n, kb, block_k)
    amax = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12)  # [nb, kb]
    s = amax / FP8_MAX
    q = (blocks / s[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).view(nb * block_n, kb * block_k)[:n, :k]
    return q.to(FP8), s.float()


def act_quant_ref(x: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (fp8 [M, K], scale f32 [M, ceil(K/block)]) with one scale per 1 x block group."""
    m, k = x.shape
    kb = _cdiv(k, block)
    pad = torch.zeros(m, kb * block, dtype=torch.float32, device=x.device)
    pad[:, :k] = x.float()
    g = pad.view(m, kb, block)
    s = g.abs().amax(dim=-1).clamp_min(1e-12) / FP8_MAX  # [M, kb]
    q = (g / s[..., None]).clamp(-FP8_MAX, FP8_MAX).view(m, kb * block)[:, :k]
    return q.to(FP8), s


def fp8_gemm_ref(a: torch.Tensor, a_s: torch.Tensor, b: torch.Tensor, b_s: torch.Tensor,
                 block_n: int = 128, block_k: int = 128, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W8A8 block-scaled GEMM: a [M, K] fp8 with a_s [M, ceil(K/bk)], b [N, K] fp8 with b_s -> a @ b.T [M, N]."""
    m, k = a.shape
    a_full = a.float() * a_s.float().repeat_interleave(block_k, 1)[:, :k]
    return (a_full @ weight_dequant_ref(b, b_s, block_n, block_k).T).to(out_dtype)
