"""flashinfer's MLA paged attention over our latent slot pool (page size 1), for the flashinfer backend.

Imported only when backend='flashinfer' is chosen on a CUDA device. Covers what its BatchMLAPagedAttentionWrapper
takes: causal masks (decode, chain verification: query i of n new tokens sees keys < ctx + i + 1, the same as our
lower-triangular tree_mask), kv_lora_rank 512 with rope 64, bf16/fp16. `fits` says no for anything else (token trees,
float32, other head sizes) and the backend runs the Triton kernel instead. Not yet run on a GPU in this repository:
bench/kernels.py checks it against mla_attention_ref where flashinfer is installed.
"""

from __future__ import annotations

import weakref
from typing import Any

import torch

from .attn_meta import AttnMeta


class FlashinferMLA:
    """One planned wrapper, re-planned when a new AttnMeta (one per engine step) or head count/scale/dtype arrives."""

    def __init__(self, device: torch.device, workspace_mib: int = 128):
        try:
            import flashinfer
        except ImportError as e:
            raise ValueError("backend='flashinfer' needs the flashinfer package (pip install flashinfer-python)") from e
        self._workspace = torch.empty(workspace_mib << 20, dtype=torch.uint8, device=device)
        self._wrapper = flashinfer.mla.BatchMLAPagedAttentionWrapper(self._workspace)
        self._planned: tuple[Any, tuple] | None = None

    @staticmethod
    def fits(q_lat: torch.Tensor, q_pe: torch.Tensor, meta: AttnMeta) -> bool:
        return (q_lat.is_cuda and q_lat.dtype in (torch.bfloat16, torch.float16) and q_lat.shape[-1] == 512
                and q_pe.shape[-1] == 64 and meta.is_causal)

    def _plan(self, meta: AttnMeta, heads: int, c: int, r: int, scale: float, dtype: torch.dtype) -> None:
        key = (heads, c, r, scale, dtype)
        if self._planned is not None and self._planned[0]() is meta and self._planned[1] == key:
            return
        dev = meta.block_table.device
        lens = [ctx + e - s for ctx, s, e in zip(meta.host_ctx_lens, meta.host_cu_q, meta.host_cu_q[1:])]
        kv_indptr = torch.tensor([0] + lens, dtype=torch.int32, device=dev).cumsum(0, dtype=torch.int32)
        seq = torch.repeat_interleave(torch.arange(len(lens), device=dev), torch.tensor(lens, device=dev))
        pos = torch.arange(sum(lens), device=dev) - kv_indptr[seq]
        kv_indices = meta.block_table[seq, pos].to(torch.int32)  # page size 1: a page is a slot
        self._wrapper.plan(meta.cu_q.to(torch.int32), kv_indptr, kv_indices,
                           torch.tensor(lens, dtype=torch.int32, device=dev), heads, c, r, 1, True, scale, dtype,
                           dtype)
        self._planned = (weakref.ref(meta), key)

    def __call__(self, q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, meta: AttnMeta,
                 scale: float) -> torch.Tensor:
        """Same contract as mla_attention_ref; returns float32 [T, H, C]."""
        c, r = q_lat.shape[-1], q_pe.shape[-1]
        self._plan(meta, q_lat.shape[1], c, r, scale, q_lat.dtype)
        # [slots, 1, C] and [slots, 1, R] views of the pool: flashinfer reads page and row strides from them
        ckv, kpe = kv_cache[:, None, :c], kv_cache[:, None, c:]
        return self._wrapper.run(q_lat.contiguous(), q_pe.contiguous(), ckv, kpe).float()
