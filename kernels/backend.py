"""Backend choice: which implementation runs each kernel. Chosen once and passed down explicitly.

torch: plain torch; MLA and MoE take the batched paths of kernels/torch_backend.py (any device), which are tested
    against the references. On a CPU where our C++ kernels build (kernels/cpu_ops.py), FP8 checkpoint weights stay
    as released: FP8 linears and routed experts run cpu_ops' FP8 kernels, BF16 tensors (embedding, head,
    eh_proj) stay BF16 and the head runs its BF16 kernel, and a decoder layer's norms, RoPE, router, SiLU * up and
    latent attention run as single ops (kernels/cpu_fused.py) (`cpu_kernels`); `dequantize=True` (or no compiler)
    dequantizes FP8 weights at load and runs plain torch: the reference path.
triton: our Triton kernels; FP8 linears run W8A8 (act_quant + fp8_gemm), MoE and MLA fused. On CPU only under
    Triton's interpreter (TRITON_INTERPRET=1), which is how the tests run it. GPUs without FP8 (before sm_89, e.g.
    A100) get `fp8=False`: FP8 checkpoints load dequantized to BF16 (`keep_fp8`), linears run in torch, the MoE and
    MLA kernels on BF16 weights.
flashinfer: as triton, but MLA attention runs flashinfer's BatchMLAPagedAttentionWrapper (page size 1 over our slot
    pool) where it fits: causal masks (decode, chain verification), kv_lora_rank 512 + rope 64, 16-bit dtypes. Token
    trees need a custom mask that kernel does not take, so they (and anything else) fall back to the Triton kernel.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from . import cpu_ops, fp8, mla, moe, torch_backend
from .attn_meta import AttnMeta
from .triton_util import interpreting

BACKENDS = ("torch", "triton", "flashinfer")


def fp8_capable(device: torch.device) -> bool:
    """Whether the device runs FP8 (e4m3) math: CUDA sm_89 and later; the CPU interpreter emulates it."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9)


@dataclass(frozen=True)
class Backend:
    name: str = "torch"
    fp8: bool = True  # the device runs FP8 kernels (False before sm_89: FP8 weights load dequantized)
    cpu_kernels: bool = False  # torch backend on a CPU with our C++ kernels (cpu_ops, cpu_fused)
    flashinfer_mla: Any = field(default=None, compare=False, repr=False)  # FlashinferMLA (plans per AttnMeta)

    @property
    def keep_fp8(self) -> bool:
        """Whether FP8 checkpoint weights stay FP8 at run time (the W8A8 kernels, or cpu_ops on a CPU) or are
        dequantized at load."""
        return (self.name != "torch" and self.fp8) or self.cpu_kernels

    @property
    def fp8_partial_blocks(self) -> bool:
        """Whether kept FP8 weights may be sliced inside a scale block (a tensor-parallel shard keeps its part of
        the block and a copy of its scale): cpu_ops' kernels take the offset, the GPU W8A8 kernels do not."""
        return self.name == "torch"

    @classmethod
    def resolve(cls, name: str, device: torch.device, dequantize: bool = False) -> Backend:
        """auto: triton on CUDA, torch elsewhere. dequantize: FP8 weights are dequantized at load even where kernels
        could read them as released (the reference path; on GPUs the Triton W8A8 kernels always keep them). Raises
        ValueError for a backend the device cannot run."""
        device = torch.device(device)
        if name == "auto":
            name = "triton" if device.type == "cuda" else "torch"
        if name not in BACKENDS:
            raise ValueError(f"backend={name!r}: choose one of auto, {', '.join(BACKENDS)}")
        if name == "flashinfer" and device.type != "cuda":
            raise ValueError("backend='flashinfer' needs a CUDA device (flashinfer has no CPU kernels)")
        if name == "triton" and device.type != "cuda" and not interpreting():
            raise ValueError(f"backend='triton' on {device.type} runs only in Triton's interpreter: set "
                             "TRITON_INTERPRET=1 before anything imports triton, or use backend='torch'")
        fp8 = fp8_capable(device)
        if not fp8 and name != "torch":
            cap = ".".join(map(str, torch.cuda.get_device_capability(device)))
            warnings.warn(f"backend={name!r}: {torch.cuda.get_device_name(device)} (sm {cap}) has no FP8; FP8 weights "
                          "load dequantized to BF16 (Triton MLA and BF16 MoE, torch linears)", stacklevel=2)
        if name == "flashinfer":
            from .flashinfer_mla import FlashinferMLA

            return cls(name, fp8, flashinfer_mla=FlashinferMLA(device))
        if name == "torch" and device.type == "cpu" and not dequantize:
            return cls(name, fp8, cpu_kernels=cpu_ops.available())
        return cls(name, fp8)

    def fp8_linear(self, x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, block: tuple[int, int],
                   offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
        """x [..., K] @ dequant(w [N, K], s).T -> [..., N] in x's dtype (W8A8 on the Triton backends, cpu_ops' FP8
        kernel on a CPU). offset: where w starts inside its first scale block (cpu_ops.fp8_linear)."""
        if self.cpu_kernels and x.device.type == "cpu":
            if x.dim() == 2:  # a step's [T, K] activations: no reshape ops around the kernel
                return cpu_ops.fp8_linear(x, w, s, block, offset)
            y = cpu_ops.fp8_linear(x.reshape(-1, x.shape[-1]), w, s, block, offset)
            return y.view(*x.shape[:-1], w.shape[0])
        if not self.keep_fp8 or self.name == "torch":
            return F.linear(x, cpu_ops.dequant_ref(w, s, block, offset).to(x.dtype))
        a, a_s = fp8.act_quant(x.reshape(-1, x.shape[-1]), block[1])
        return fp8.fp8_gemm(a, a_s, w, s, *block, out_dtype=x.dtype).view(*x.shape[:-1], w.shape[0])

    def bf16_linear(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """x [..., K] float32 @ w [N, K] bfloat16 .T -> [..., N] float32, the weight read as stored (exact bf16 ->
        float32, float32 sums): cpu_ops' kernel where it runs, else a float32 matmul of the converted weight."""
        if self.cpu_kernels and x.device.type == "cpu":
            if x.dim() == 2:
                return cpu_ops.bf16_linear(x, w)
            return cpu_ops.bf16_linear(x.reshape(-1, x.shape[-1]), w).view(*x.shape[:-1], w.shape[0])
        return F.linear(x, w.to(x.dtype))


    def mla_attention(self, q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, meta: AttnMeta,
                      scale: float) -> torch.Tensor:
        """q_lat [T, H, C], q_pe [T, H, R], kv_cache [slots, C+R] -> [T, H, C] float32 (see mla_attention_ref). A
        captured step's metadata (meta.static) takes the paths that read its lengths on the device."""
        if self.name == "torch":
            if meta.static:
                return mla.mla_attention_padded(q_lat, q_pe, kv_cache, meta, scale)
            return torch_backend.mla_attention_mqa(q_lat, q_pe, kv_cache, meta, scale)
        if self.flashinfer_mla is not None and not meta.static and self.flashinfer_mla.fits(q_lat, q_pe, kv_cache,
                                                                                             meta):
            return self.flashinfer_mla(q_lat, q_pe, kv_cache, meta, scale)
        return mla.mla_attention(q_lat, q_pe, kv_cache, meta, scale)

    def moe(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor, w13: torch.Tensor,
            w2: torch.Tensor, s13: torch.Tensor | None, s2: torch.Tensor | None,
            block: tuple[int, int], static: bool = False) -> torch.Tensor:
        """Routed experts (see moe_ref); FP8 weights run W8A8 on the Triton backends (see moe_w8a8_ref). static: a
        captured step's (fixed shapes, nothing read back: the torch backend gathers each pair's expert)."""
        if self.name == "torch":
            if static:
                if s13 is not None:
                    raise ValueError("moe: a captured step on the torch backend needs plain expert weights (FP8 "
                                     "experts stay FP8 on a CPU only, which never captures)")
                return moe.moe_gather(x, topk_ids, topk_w, w13, w2)
            if s13 is not None and self.cpu_kernels and x.device.type == "cpu":
                return cpu_ops.fp8_moe(x, topk_ids, topk_w, w13, w2, s13, s2, block)
            if s13 is not None:  # FP8 weights kept elsewhere on the torch backend: the reference, per expert
                return moe.moe_ref(x, topk_ids, topk_w, w13, w2, s13, s2, block)
            return torch_backend.moe_sparse(x, topk_ids, topk_w, w13, w2)
        if s13 is not None and not self.fp8:
            raise ValueError("moe: FP8 expert weights on a GPU without FP8: load them dequantized (Backend.keep_fp8)")
        return moe.moe(x, topk_ids, topk_w, w13, w2, s13, s2, block)
