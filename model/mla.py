"""Multi-head Latent Attention over a latent cache: naive (materialized K/V) and absorbed paths."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from specdec.kernels import cpu_fused
from specdec.kernels.attn_meta import AttnMeta
from specdec.kernels.torch_backend import mqa_attention

from .layers import Build, apply_rope, fuse_columns, fuse_fp8_rows

MLA_MODES = ("auto", "naive", "absorbed")


class MLA(nn.Module):
    """Heads are split across ranks (q_b/kv_b column-parallel, o row-parallel); latent projections are replicated,
    so every rank caches the same [kv_lora_rank + qk_rope_head_dim] latent row per token.

    Which implementation a step runs is fixed when the layer is built (by mla_mode) and laid out
    (lay_out_for_cpu); the step only says, through host fields of its AttnMeta, whether it prefills prompts from
    scratch (`fresh_path`) or attends over cached rows (`cached_path`). The paths: "causal" (fused causal attention
    over the step's own rows), "naive" (K/V expanded from the cache), "absorbed" (attention in the latent space),
    "cpu" (absorbed, on lay_out_for_cpu's weights), "cpu_fused" (the same on the backend's C++ CPU kernels, one op
    per step of the layer, FP8 weights read as released)."""

    def __init__(self, build: Build):
        super().__init__()
        if build.mla_mode not in MLA_MODES:
            raise ValueError(f"mla_mode={build.mla_mode!r}: choose one of {MLA_MODES}")
        cfg, dist = build.cfg, build.dist
        self.cfg, self.backend, self.mode, self.dist, self.dtype = cfg, build.backend, build.mla_mode, dist, build.dtype
        h0, h1 = dist.shard(cfg.num_attention_heads, "num_attention_heads")
        self.n_heads = h1 - h0
        h, qk = cfg.num_attention_heads, cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = build.linear(cfg.hidden_size, h * qk, shard_dim=0, what="q_proj")
        else:
            self.q_a_proj = build.linear(cfg.hidden_size, cfg.q_lora_rank)
            self.q_a_layernorm = build.norm(cfg.q_lora_rank)
            self.q_b_proj = build.linear(cfg.q_lora_rank, h * qk, shard_dim=0, what="q_b_proj")
        self.kv_a_proj_with_mqa = build.linear(cfg.hidden_size, cfg.kv_cache_dim)
        self.kv_a_layernorm = build.norm(cfg.kv_lora_rank)
        self.kv_b_proj = build.linear(cfg.kv_lora_rank, h * (cfg.qk_nope_head_dim + cfg.v_head_dim), shard_dim=0,
                                      what="kv_b_proj")
        self.o_proj = build.linear(h * cfg.v_head_dim, cfg.hidden_size, shard_dim=1, what="o_proj")
        self.w_kvb: torch.Tensor | None = None  # [H, dn + dv, C] for the absorbed path, set by finalize()
        # the CPU decode path's weights, set by lay_out_for_cpu(): x -> [q_a | latent | k_pe] in one GEMM; the
        # query input -> [absorbed q_lat | q_pe] per head; the latent attention output -> o_proj's output
        self.w_a = self.w_q_abs = self.w_o_abs = None
        self.w_a8: tuple[torch.Tensor, torch.Tensor] | None = None  # FP8 kept: q_a | kv_a stacked (weight, scales)
        self.fresh_path = "absorbed" if self.mode == "absorbed" else "causal"
        self.cached_path = "naive" if self.mode == "naive" else "absorbed"

    def finalize(self) -> None:
        """After loading: kv_b as [H, dn + dv, C] in the compute dtype (dequantized once when it stays FP8)."""
        self.w_kvb = self.kv_b_proj.dense_weight(self.dtype).view(self.n_heads, -1, self.cfg.kv_lora_rank)

    @torch.no_grad()
    def lay_out_for_cpu(self) -> None:
        """Weights for the CPU decode path (dense weights only): q_a and kv_a fused into one GEMM; W_UK folded into
        q_b (w_q_abs [q_in, H*(C+R)] yields the absorbed query and q_pe at once) and W_UV into o_proj
        (w_o_abs [H*C, D]), the products taken in float64. Prefill keeps the checkpoint's projections, laid out
        for small-M GEMMs too."""
        fused = "cpu_fused" if self.backend.cpu_kernels else "cpu"
        if self.kv_b_proj.weight_scale_inv is not None:  # FP8 kept: read as released by the C++ kernels (or as is)
            if self.backend.cpu_kernels:
                if self.cfg.q_lora_rank is not None:
                    self.w_a8 = fuse_fp8_rows(self.q_a_proj, self.kv_a_proj_with_mqa)
                if self.mode != "naive":
                    self.cached_path = fused
                if self.fresh_path != "absorbed":  # no path left reads kv_b's dense copy: keep the FP8 one only
                    self.w_kvb = None
            return
        cfg, h = self.cfg, self.n_heads
        dn, dv, c, r = cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank, cfg.qk_rope_head_dim
        if cfg.q_lora_rank is None:
            q_lin = self.q_proj
            self.kv_a_proj_with_mqa.lay_out_for_cpu()
            self.w_a = self.kv_a_proj_with_mqa.weight.t()
        else:
            q_lin = self.q_b_proj
            self.w_a = fuse_columns(self.q_a_proj, self.kv_a_proj_with_mqa)
        wq = q_lin.weight.double().view(h, dn + r, -1)  # [H, dn+R, q_in]
        w_kvb = self.w_kvb.double()
        q_abs = torch.cat([torch.einsum("hdc,hdq->hcq", w_kvb[:, :dn], wq[:, :dn]), wq[:, dn:]], 1)
        self.w_q_abs = q_abs.reshape(h * (c + r), -1).t().to(self.dtype).contiguous()
        w_o = self.o_proj.weight.double().view(cfg.hidden_size, h, dv)
        o_abs = torch.einsum("dhv,hvc->dhc", w_o, w_kvb[:, dn:])
        self.w_o_abs = o_abs.reshape(cfg.hidden_size, h * c).t().to(self.dtype).contiguous()
        for lin in (q_lin, self.kv_b_proj, self.o_proj):
            lin.lay_out_for_cpu()
        if self.mode != "naive":
            self.cached_path = fused

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kv_cache: torch.Tensor,
                meta: AttnMeta) -> torch.Tensor:
        """x [T, D], rope = cos/sin [T, R/2] of the tokens' positions -> [T, D]. Writes this step's latent rows to
        kv_cache[meta.slots] first, then attends."""
        path = self.fresh_path if meta.from_scratch else self.cached_path
        if path == "cpu_fused":
            return self._fused_cpu(x, rope, kv_cache, meta)
        if path == "cpu":
            return self._absorbed_cpu(x, rope, kv_cache, meta)
        cfg, t = self.cfg, x.shape[0]
        dn, c = cfg.qk_nope_head_dim, cfg.kv_lora_rank
        if cfg.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(t, self.n_heads, cfg.qk_head_dim)
        q_nope, q_pe = q[..., :dn], apply_rope(q[..., dn:], rope)
        latent, k_pe = self.kv_a_proj_with_mqa(x).split([c, cfg.qk_rope_head_dim], dim=-1)
        latent = self.kv_a_layernorm(latent)
        k_pe = apply_rope(k_pe[:, None, :], rope)[:, 0]
        meta.write(kv_cache, torch.cat([latent, k_pe], dim=-1).to(kv_cache.dtype))

        if path == "causal":  # prompts from scratch (prefill, training)
            rows = torch.cat([latent, k_pe], dim=-1).to(kv_cache.dtype).to(x.dtype)  # = what the cache holds
            o = self._causal(q_nope, q_pe, rows, meta)
        elif path == "naive":
            o = self._naive(q_nope, q_pe, kv_cache, meta)
        else:
            o = self._absorbed(q_nope, q_pe, kv_cache, meta)
        return self.dist.all_reduce(self.o_proj(o.reshape(t, -1).to(x.dtype)))

    def _absorbed_cpu(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kv_cache: torch.Tensor,
                      meta: AttnMeta) -> torch.Tensor:
        """The absorbed path on lay_out_for_cpu's weights: five GEMMs, q_pe and k_pe rotated together, MQA over
        the latent rows. Same math as forward -> _absorbed (tested against it)."""
        cfg, t, h = self.cfg, x.shape[0], self.n_heads
        c = cfg.kv_lora_rank
        a = x @ self.w_a  # [T, (q_lora) + C + R]
        if cfg.q_lora_rank is None:
            q_in = x
        else:
            q_in, a = self.q_a_layernorm.forward(a[:, :cfg.q_lora_rank]), a[:, cfg.q_lora_rank:]
        q = (q_in @ self.w_q_abs).view(t, h, -1)  # [T, H, C+R]
        pe = apply_rope(torch.cat([q[..., c:], a[:, None, c:]], 1), rope)  # [T, H+1, R]: q_pe heads, then k_pe
        meta.write(kv_cache, torch.cat([self.kv_a_layernorm.forward(a[:, :c]), pe[:, h]], -1).to(kv_cache.dtype))
        o = mqa_attention(torch.cat([q[..., :c], pe[:, :h]], -1), kv_cache, meta, cfg.softmax_scale, c)
        return self.dist.all_reduce(o.view(t, h * c).to(x.dtype) @ self.w_o_abs)

    def _fused_cpu(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kv_cache: torch.Tensor,
                   meta: AttnMeta) -> torch.Tensor:
        """The absorbed path on the backend's C++ CPU kernels (kernels/cpu_ops.py, cpu_fused.py): dense weights as
        lay_out_for_cpu folds them, or FP8 as released (kv_b's two per-head products around the attention, q_a and
        kv_a in one GEMM where their blocks allow). Same math as _absorbed_cpu; about twenty ops."""
        cfg, t, h = self.cfg, x.shape[0], self.n_heads
        c, r, ql = cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.q_lora_rank or 0
        dn, dv = cfg.qk_nope_head_dim, cfg.v_head_dim
        cos, sin = rope
        kvb = self.kv_b_proj
        released = kvb.weight_scale_inv is not None
        if not released:
            a = x @ self.w_a  # [T, (q_lora) + C + R]
        elif self.w_a8 is not None:
            a = self.backend.fp8_linear(x, *self.w_a8, kvb.fp8_block)
        else:
            kv = self.kv_a_proj_with_mqa.forward(x)
            a = torch.cat([self.q_a_proj.forward(x), kv], -1) if ql else kv
        q_in = self.q_a_layernorm.forward(a[:, :ql]) if ql else x
        if not released:  # W_UK folded into q_b: the absorbed query and q_pe in one GEMM
            q = (q_in @ self.w_q_abs).view(t, h, c + r)
            cpu_fused.rope(q[..., c:], cos, sin, out=q[..., c:])
        else:
            qb = (self.q_b_proj if ql else self.q_proj).forward(q_in).view(t, h, dn + r)
            q = qb.new_empty(t, h, c + r)
            cpu_fused.fp8_absorb_q(qb[..., :dn], kvb.weight, kvb.weight_scale_inv, kvb.fp8_block, kvb.fp8_offset,
                                   dn, dv, out=q[..., :c])
            cpu_fused.rope(qb[..., dn:], cos, sin, out=q[..., c:])
        row = torch.cat([self.kv_a_layernorm.forward(a[:, ql:ql + c]), cpu_fused.rope(a[:, ql + c:], cos, sin)], -1)
        meta.write(kv_cache, row if row.dtype == kv_cache.dtype else row.to(kv_cache.dtype))
        o = cpu_fused.mla_attention(q if q.dtype == kv_cache.dtype else q.to(kv_cache.dtype), kv_cache,
                                    meta.block_table, meta.ctx_lens, meta.cu_q, meta.tree_mask, cfg.softmax_scale, c)
        o = o if o.dtype == x.dtype else o.to(x.dtype)  # [T, H, C]
        if not released:
            return self.dist.all_reduce(o.view(t, h * c) @ self.w_o_abs)
        o = cpu_fused.fp8_absorb_o(o, kvb.weight, kvb.weight_scale_inv, kvb.fp8_block, kvb.fp8_offset, dn, dv)
        return self.dist.all_reduce(self.o_proj.forward(o.view(t, h * dv)))

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
                for _, s, e in meta.sequences()]
        return torch.cat(outs)

    def _naive(self, q_nope: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor,
               meta: AttnMeta) -> torch.Tensor:
        """Expands every visible latent row to per-head K/V (cheap when queries ~ keys: prefill)."""
        cfg = self.cfg
        c, dn, dv = cfg.kv_lora_rank, cfg.qk_nope_head_dim, cfg.v_head_dim
        out = q_nope.new_empty(q_nope.shape[0], self.n_heads, dv)
        for b, s, e in meta.sequences():
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
        w = self.w_kvb  # [H, dn+dv, C]
        q_lat = torch.einsum("thd,hdc->thc", q_nope, w[:, :dn])
        o_lat = self.backend.mla_attention(q_lat, q_pe, kv_cache, meta, self.cfg.softmax_scale)  # [T, H, C]
        return torch.einsum("thc,hvc->thv", o_lat.to(w.dtype), w[:, dn:])
