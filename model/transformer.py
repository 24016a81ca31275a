"""DeepSeek-V3: decoder blocks, the main model and its MTP layers.

The model is a function (tokens, positions, attention metadata, cache) -> hidden states; logits are a separate
step for the rows the caller asks for. It never samples or schedules.
"""

from __future__ import annotations

import torch
from specdec.kernels.attn_meta import AttnMeta
from specdec.kernels.backend import Backend
from torch import nn

from .cache import LatentCache
from .config import ModelConfig
from .layers import RMSNorm, Rope, VocabEmbedding, VocabHead, make_linear
from .mla import MLA
from .moe import DenseMLP, MoE
from .parallel import DistInfo


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype: torch.dtype, backend: Backend, keep_fp8: bool,
                 dist: DistInfo, rope: Rope, mla_mode: str):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = MLA(cfg, dtype, backend, keep_fp8, dist, rope, mla_mode)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        if cfg.is_moe_layer(layer):
            self.mlp = MoE(cfg, dtype, backend, keep_fp8, dist)
        else:
            self.mlp = DenseMLP(cfg, cfg.hidden_size, cfg.intermediate_size, dtype, backend, keep_fp8, dist, "mlp")

    def forward(self, x: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor, meta: AttnMeta) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, kv, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class SharedHead(nn.Module):
    """The MTP layer's own final norm; its `head` is the main model's lm_head (shared, not loaded twice)."""

    def __init__(self, cfg: ModelConfig, dtype: torch.dtype):
        super().__init__()
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


class MTPLayer(Block):
    """h' = Block(eh_proj([enorm(embed(token i+1)); hnorm(h_i)])) then shared_head.norm (embedding first)."""

    def __init__(self, cfg: ModelConfig, layer: int, dtype: torch.dtype, backend: Backend, keep_fp8: bool,
                 dist: DistInfo, rope: Rope, mla_mode: str):
        super().__init__(cfg, layer, dtype, backend, keep_fp8, dist, rope, mla_mode)
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        # eh_proj ships in BF16 (never FP8), replicated on every rank
        self.eh_proj = make_linear(cfg, 2 * cfg.hidden_size, cfg.hidden_size, dtype=dtype, backend=backend,
                                   keep_fp8=False, quantized=False)
        self.shared_head = SharedHead(cfg, dtype)

    def forward_mtp(self, emb: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor,
                    meta: AttnMeta) -> torch.Tensor:
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(hidden)], dim=-1))
        return self.shared_head.norm(super().forward(x, positions, kv, meta))


class Body(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype, backend: Backend, keep_fp8: bool, dist: DistInfo,
                 mla_mode: str):
        super().__init__()
        self.rope = Rope(cfg)
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, dtype, dist)
        layers: list[nn.Module] = []
        for i in range(cfg.num_layers_with_mtp):
            kind = Block if i < cfg.num_hidden_layers else MTPLayer
            layers.append(kind(cfg, i, dtype, backend, keep_fp8, dist, self.rope, mla_mode))
        self.layers = nn.ModuleList(layers)  # main layers, then the MTP layers (checkpoint indices)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)


class DeepseekV3(nn.Module):
    """Parameter names equal the released checkpoint's tensor names (MTP layers at model.layers.{61+d})."""

    def __init__(self, cfg: ModelConfig, *, dtype: torch.dtype = torch.bfloat16, backend: Backend | None = None,
                 keep_fp8: bool = False, dist: DistInfo | None = None, mla_mode: str = "auto"):
        super().__init__()
        dist = dist or DistInfo()
        self.cfg, self.dtype, self.dist = cfg, dtype, dist
        self.model = Body(cfg, dtype, backend or Backend(), keep_fp8, dist, mla_mode)
        self.lm_head = VocabHead(cfg.vocab_size, cfg.hidden_size, dtype, dist)

    @property
    def mtp_layers(self) -> list[MTPLayer]:
        return list(self.model.layers[self.cfg.num_hidden_layers:])

    def finalize(self) -> None:
        """After loading: stack expert weights for the grouped MoE kernels."""
        for m in self.modules():
            if isinstance(m, MoE) and hasattr(m, "experts"):
                m.finalize()

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, meta: AttnMeta,
                cache: LatentCache) -> torch.Tensor:
        """tokens, positions [T] -> final hidden states [T, D] (after model.norm)."""
        x = self.model.embed_tokens(tokens)
        for i in range(self.cfg.num_hidden_layers):
            x = self.model.layers[i](x, positions, cache.layer(i), meta)
        return self.model.norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [N, D] -> float32 logits [N, vocab]."""
        return self.lm_head(hidden)

    def mtp_forward(self, depth: int, tokens: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                    meta: AttnMeta, cache: LatentCache) -> torch.Tensor:
        """MTP layer `depth`: row t pairs token tokens[t] (= token i+1) with hidden [t] (from position i).

        `positions` are those of tokens[t]; cache holds the MTP layers' own latent rows (layer index = depth).
        Returns [T, D] after shared_head.norm: feed it to `logits`, or to the next draft step as `hidden`.
        """
        layer = self.mtp_layers[depth]
        return layer.forward_mtp(self.model.embed_tokens(tokens), hidden, positions, cache.layer(depth), meta)
