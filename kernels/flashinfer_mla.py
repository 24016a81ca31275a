"""flashinfer's MLA paged attention over our latent slot pool (page size 1), for the flashinfer backend.

Imported only when backend='flashinfer' is chosen on a CUDA device. Covers what its BatchMLAPagedAttentionWrapper
takes: causal masks (decode, chain verification: query i of n new tokens sees keys < ctx + i + 1, the same as our
lower-triangular tree_mask), kv_lora_rank 512 with rope 64, bf16/fp16. `fits` says no for anything else (token trees,
float32, other head sizes, a cache of another dtype) and the backend runs the Triton kernel instead. Written for
flashinfer-python < 0.7 (keyword arguments throughout: its next API drops the positional forms); flashinfer builds
its kernels the first time they run. Not yet run on a GPU in this repository: bench/kernel_bench.py and
bench/gpu_check.py check it against mla_attention_ref where flashinfer is installed.
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
    def fits(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, meta: AttnMeta) -> bool:
        return (q_lat.is_cuda and q_lat.dtype in (torch.bfloat16, torch.float16) and kv_cache.dtype == q_lat.dtype
                and q_pe.dtype == q_lat.dtype and q_lat.shape[-1] == 512 and q_pe.shape[-1] == 64
                and kv_cache.shape[-1] == 576 and meta.is_causal)

    def _plan(self, meta: AttnMeta, heads: int, c: int, r: int, scale: float, dtype: torch.dtype) -> None:
        key = (heads, c, r, scale, dtype)
        if self._planned is not None and self._planned[0]() is meta and self._planned[1] == key:
            return
        dev = meta.block_table.device
        b = meta.num_seqs
        lens = [ctx + e - s for ctx, s, e in zip(meta.host_ctx_lens, meta.host_cu_q, meta.host_cu_q[1:])]
        kv_indptr = [0]
        for n in lens:
            kv_indptr.append(kv_indptr[-1] + n)
        # host metadata in one pinned buffer: plan() reads the indptrs on the host (a device tensor there would be
        # copied back: a sync) and copies them to the device without blocking
        host = torch.tensor([*meta.host_cu_q, *kv_indptr, *lens], dtype=torch.int32).pin_memory()
        qo_h, kv_indptr_h, lens_h = host.split([b + 1, b + 1, b])
        kv_indices = kv_pages(meta.block_table, lens_h.to(dev, non_blocking=True),
                              kv_indptr_h.to(dev, non_blocking=True), kv_indptr[-1])
        self._wrapper.plan(qo_indptr=qo_h, kv_indptr=kv_indptr_h, kv_indices=kv_indices, kv_len_arr=lens_h,
                           num_heads=heads, head_dim_ckv=c, head_dim_kpe=r, page_size=1, causal=True, sm_scale=scale,
                           q_data_type=dtype, kv_data_type=dtype)
        self._planned = (weakref.ref(meta), key)

    def __call__(self, q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, meta: AttnMeta,
                 scale: float) -> torch.Tensor:
        """Same contract as mla_attention_ref; returns float32 [T, H, C]."""
        c, r = q_lat.shape[-1], q_pe.shape[-1]
        self._plan(meta, q_lat.shape[1], c, r, scale, q_lat.dtype)
        # [slots, 1, C] and [slots, 1, R] views of the pool: flashinfer reads page and row strides from them
        ckv, kpe = kv_cache[:, None, :c], kv_cache[:, None, c:]
        return self._wrapper.run(q_nope=q_lat.contiguous(), q_pe=q_pe.contiguous(), ckv_cache=ckv,
                                 kpe_cache=kpe).float()


def kv_pages(block_table: torch.Tensor, kv_lens: torch.Tensor, kv_indptr: torch.Tensor, total: int) -> torch.Tensor:
    """flashinfer's kv_indices with page size 1 (a page is a slot): [total] int32, sequence b's keys block_table[b,
    :kv_lens[b]] after sequence b-1's. kv_lens [B] and kv_indptr [B+1] sit on block_table's device and `total`
    (= kv_indptr[-1]) comes from the host, so nothing is read back (repeat_interleave with output_size)."""
    seq = torch.repeat_interleave(torch.arange(kv_lens.numel(), device=block_table.device), kv_lens,
                                  output_size=total)
    pos = torch.arange(total, device=block_table.device) - kv_indptr[seq]
    return block_table[seq, pos].to(torch.int32)
