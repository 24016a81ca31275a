"""Multi-head Latent Attention over a latent cache: naive (materialized K/V) and absorbed paths."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from specdec.kernels.attn_meta import AttnMeta
from specdec.kernels.backend import Backend
from specdec.kernels.fp8 import weight_dequant_ref
from torch import nn

from .config import ModelConfig
from .layers import RMSNorm, Rope, make_linear
from .parallel import DistInfo

MLA_MODES = ("auto", "naive", "absorbed")


class MLA(nn.Module):
    """Heads are split across ranks (q_b/kv_b column-parallel, o row-parallel); latent projections are replicated,
    so every rank caches the same [kv_lora_rank + qk_rope_head_dim] latent row per token."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, backend: Backend, keep_fp8: bool, dist: DistInfo,
                 rope: Rope, mode: str = "auto"):
        super().__init__()
        if mode not in MLA_MODES:
            raise ValueError(f"mla_mode={mode!r}: choose one of {MLA_MODES}")
        self.cfg, self.backend, self.rope, self.mode, self.dist = cfg, backend, rope, mode, dist
        h0, h1 = dist.shard(cfg.num_attention_heads, "num_attention_heads")
        self.n_heads = h1 - h0
        lin = dict(dtype=dtype, backend=backend, keep_fp8=keep_fp8, dist=dist)
        qk = cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = make_linear(cfg, cfg.hidden_size, cfg.num_attention_heads * qk, shard_dim=0,
                                      what="q_proj", **lin)
        else:
            self.q_a_proj = make_linear(cfg, cfg.hidden_size, cfg.q_lora_rank, **lin)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, dtype)
            self.q_b_proj = make_linear(cfg, cfg.q_lora_rank, cfg.num_attention_heads * qk, shard_dim=0,
                                        what="q_b_proj", **lin)
        self.kv_a_proj_with_mqa = make_linear(cfg, cfg.hidden_size, cfg.kv_cache_dim, **lin)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, cfg.rms_norm_eps, dtype)
        self.kv_b_proj = make_linear(cfg, cfg.kv_lora_rank,
                                     cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim),
                                     shard_dim=0, what="kv_b_proj", **lin)
        self.o_proj = make_linear(cfg, cfg.num_attention_heads * cfg.v_head_dim, cfg.hidden_size, shard_dim=1,
                                  what="o_proj", **lin)
        self._w_kvb: torch.Tensor | None = None  # dequantized kv_b for the absorbed path

    def _kv_b_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """kv_b as [H, dn + dv, C] in `dtype` (dequantized once when the checkpoint weight stays FP8)."""
        lin = self.kv_b_proj
        if lin.weight_scale_inv is None:
            w = lin.weight
        else:
            if self._w_kvb is None or self._w_kvb.dtype != dtype:
                self._w_kvb = weight_dequant_ref(lin.weight, lin.weight_scale_inv, *lin.fp8_block, dtype=dtype)
            w = self._w_kvb
        return w.view(self.n_heads, -1, self.cfg.kv_lora_rank)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttnMeta) -> torch.Tensor:
        """x [T, D] -> [T, D]. Writes this step's latent rows to kv_cache[meta.slots] first, then attends."""
        cfg, t = self.cfg, x.shape[0]
        dn, c = cfg.qk_nope_head_dim, cfg.kv_lora_rank
        if cfg.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(t, self.n_heads, cfg.qk_head_dim)
        q_nope, q_pe = q[..., :dn], self.rope(q[..., dn:], positions)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([c, cfg.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        k_pe = self.rope(k_pe[:, None, :], positions)[:, 0]
        kv_cache[meta.slots] = torch.cat([latent, k_pe], dim=-1).to(kv_cache.dtype)

        fresh = not any(meta.host_ctx_lens)
        if fresh and self.mode != "absorbed" and meta.is_causal:  # prompts from scratch (prefill, training)
            rows = torch.cat([latent, k_pe], dim=-1).to(kv_cache.dtype).to(x.dtype)  # = what the cache holds
            o = self._causal(q_nope, q_pe, rows, meta)
        elif self.mode == "naive" or (self.mode == "auto" and fresh):
            o = self._naive(q_nope, q_pe, kv_cache, meta)
        else:
            o = self._absorbed(q_nope, q_pe, kv_cache, meta)
        return self.dist.all_reduce(self.o_proj(o.reshape(t, -1).to(x.dtype)))

    def _causal(self, q_nope: torch.Tensor, q_pe: torch.Tensor, rows: torch.Tensor, meta: AttnMeta) -> torch.Tensor:
        """Sequences with no cached prefix and causal masks: K/V from this step's own latent rows [T, C+R], one
        fused causal attention per sequence (one for the whole batch when every sequence has the same length).
        Same math as _naive; differentiable, so training runs it too."""
        cfg = self.cfg
        c, dn, dv = cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.v_head_dim
        t, h = q_nope.shape[0], self.n_heads
        kv = self.kv_b_proj(rows[:, :c]).view(t, h, dn + dv)
        k = torch.cat([kv[..., :dn], rows[:, None, c:].expand(t, h, cfg.qk_rope_head_dim)], dim=-1)  # [T, H, dk]
        q = torch.cat([q_nope, q_pe], dim=-1)
        v = kv[..., dn:]
        lens = [e - s for s, e in zip(meta.host_cu_q, meta.host_cu_q[1:])]
        attend = lambda q, k, v: F.scaled_dot_product_attention(  # [B, H, n, d] each
            q, k, v, is_causal=True, scale=cfg.softmax_scale)
        if len(set(lens)) == 1:
            b, n = len(lens), lens[0]
            heads_first = lambda x: x.view(b, n, h, -1).transpose(1, 2)
            return attend(heads_first(q), heads_first(k), heads_first(v)).transpose(1, 2).reshape(t, h, dv)
        outs = [attend(*(x[s:e].transpose(0, 1)[None] for x in (q, k, v)))[0].transpose(0, 1)
                for s, e in zip(meta.host_cu_q, meta.host_cu_q[1:]) if e > s]
        return torch.cat(outs)

    def _naive(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
               meta: AttnMeta) -> torch.Tensor:
        """Expands every visible latent row to per-head K/V (cheap when queries ~ keys: prefill)."""
        cfg = self.cfg
        c, dn, dv = cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.v_head_dim
        out = q_nope.new_empty(q_nope.shape[0], self.n_heads, dv)
        for b in range(meta.num_seqs):
            s, e = meta.host_cu_q[b], meta.host_cu_q[b + 1]
            if s == e:
                continue
            rows = kv_cache[meta.seq_slots(b)].to(q_nope.dtype)  # [S, C+R]
            kv = self.kv_b_proj(rows[:, :c]).view(-1, self.n_heads, dn + dv)  # [S, H, dn+dv]
            k_nope, v = kv[..., :dn], kv[..., dn:]
            scores = torch.einsum("thd,shd->hts", q_nope[s:e], k_nope)
            scores = scores + torch.einsum("thr,sr->hts", q_pe[s:e], rows[:, c:])
            scores = (scores.float() * cfg.softmax_scale).masked_fill(~meta.seq_mask(b)[None], float("-inf"))
            out[s:e] = torch.einsum("hts,shv->thv", scores.softmax(-1).to(v.dtype), v)
        return out

    def _absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
                  meta: AttnMeta) -> torch.Tensor:
        """W_UK folded into the query, attention in the latent space, W_UV applied after."""
        dn = self.cfg.qk_nope_head_dim
        w = self._kv_b_weight(q_nope.dtype)  # [H, dn+dv, C]
        q_lat = torch.einsum("thd,hdc->thc", q_nope, w[:, :dn])
        o_lat = self.backend.mla_attention(q_lat, q_pe, kv_cache, meta, self.cfg.softmax_scale)  # [T, H, C]
        return torch.einsum("thc,hvc->thv", o_lat.to(w.dtype), w[:, dn:])
