"""DeepSeek-V3: decoder blocks, the main model and its MTP layers.

The model is a function (tokens, positions, attention metadata, cache) -> hidden states; logits are a separate
step for the rows the caller asks for. It never samples or schedules.
"""

from __future__ import annotations

import torch
from torch import nn

from specdec.kernels import cpu_fused
from specdec.kernels.attn_meta import AttnMeta
from specdec.kernels.backend import Backend

from .cache import LatentCache
from .config import ModelConfig
from .layers import Build, Rope, VocabEmbedding, VocabHead, transposed_storage
from .mla import MLA
from .moe import DenseMLP, MoE
from .parallel import DistInfo


class Block(nn.Module):
    """Attention + MLP/MoE with residuals. Decode is bound by per-call overhead on a CPU, so a step calls its
    norms, attention and MLP through `.forward` (module hooks run on none of them; the router's do)."""

    def __init__(self, build: Build, layer: int):
        super().__init__()
        cfg = build.cfg
        self.input_layernorm = build.norm(cfg.hidden_size)
        self.self_attn = MLA(build)
        self.post_attention_layernorm = build.norm(cfg.hidden_size)
        self.routed = cfg.is_moe_layer(layer)
        self.mlp = MoE(build) if self.routed else DenseMLP(build, cfg.intermediate_size, "mlp")

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kv: torch.Tensor,
                meta: AttnMeta) -> torch.Tensor:
        h = self.self_attn.forward(self.input_layernorm.forward(x), rope, kv, meta)
        norm = self.post_attention_layernorm
        if norm.fused:  # the residual add and the norm in one C++ op
            n, x = cpu_fused.add_rms_norm(h, x, norm.weight, norm.eps)
            return x + self._mlp(n, meta)
        x = x + h
        return x + self._mlp(norm.forward(x), meta)

    def _mlp(self, x: torch.Tensor, meta: AttnMeta) -> torch.Tensor:
        """A captured step's MoE (meta.static) routes at fixed shapes; a dense MLP's shapes never depend on data."""
        return self.mlp.forward(x, static=True) if meta.static and self.routed else self.mlp.forward(x)


class SharedHead(nn.Module):
    """The MTP layer's own final norm; its `head` is the main model's lm_head (shared, not loaded twice)."""

    def __init__(self, build: Build):
        super().__init__()
        self.norm = build.norm(build.cfg.hidden_size)


class MTPLayer(Block):
    """h' = Block(eh_proj([enorm(embed(token i+1)); hnorm(h_i)])) then shared_head.norm (embedding first)."""

    def __init__(self, build: Build, layer: int):
        super().__init__(build, layer)
        d = build.cfg.hidden_size
        self.enorm = build.norm(d)
        self.hnorm = build.norm(d)
        self.eh_proj = build.linear(2 * d, d, quantized=False)  # ships in BF16 (never FP8), replicated
        self.shared_head = SharedHead(build)

    def forward_mtp(self, emb: torch.Tensor, hidden: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                    kv: torch.Tensor, meta: AttnMeta) -> torch.Tensor:
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(hidden)], dim=-1))
        return self.shared_head.norm(super().forward(x, rope, kv, meta))


class Body(nn.Module):
    def __init__(self, build: Build):
        super().__init__()
        cfg = build.cfg
        self.rope = Rope(cfg)
        self.embed_tokens = VocabEmbedding(build)
        layers = [(Block if i < cfg.num_hidden_layers else MTPLayer)(build, i) for i in range(cfg.num_layers_with_mtp)]
        self.layers = nn.ModuleList(layers)  # main layers, then the MTP layers (checkpoint indices)
        self.norm = build.norm(cfg.hidden_size)


class DeepseekV3(nn.Module):
    """Parameter names equal the released checkpoint's tensor names (MTP layers at model.layers.{61+d}).

    Stateless once finalized: forwards keep nothing on the modules, so one model serves several threads."""

    def __init__(self, cfg: ModelConfig, *, dtype: torch.dtype = torch.bfloat16, backend: Backend | None = None,
                 keep_fp8: bool = False, dist: DistInfo | None = None, mla_mode: str = "auto"):
        super().__init__()
        build = Build(cfg, dtype, backend or Backend(), keep_fp8, dist or DistInfo(), mla_mode)
        self.cfg, self.dtype, self.dist = cfg, dtype, build.dist
        self.model = Body(build)
        self.lm_head = VocabHead(build)

    @property
    def mtp_layers(self) -> list[MTPLayer]:
        return list(self.model.layers[self.cfg.num_hidden_layers:])

    def finalize(self) -> None:
        """After loading: stack expert weights for the grouped MoE kernels, lay out MLA's absorbed weights."""
        for m in self.modules():
            if isinstance(m, (MoE, MLA)):
                m.finalize()

    def lay_out_for_cpu(self) -> None:
        """After finalize, for the torch backend on a CPU: every dense weight stored the way small-M GEMMs read it
        fastest, projections of the same input fused, MLA's absorbed weights folded (model/mla.py). Values and
        parameter shapes stay as loaded."""
        for layer in self.model.layers:
            layer.self_attn.lay_out_for_cpu()
            layer.mlp.lay_out_for_cpu()
            if isinstance(layer, MTPLayer):
                layer.eh_proj.lay_out_for_cpu()
        if self.lm_head.weight.dtype == self.dtype:  # a BF16 head kept as released is read as stored
            transposed_storage(self.lm_head.weight)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor, meta: AttnMeta,
                cache: LatentCache) -> torch.Tensor:
        """tokens, positions [T] -> final hidden states [T, D] (after model.norm)."""
        x = self.model.embed_tokens(tokens)
        rope = self.model.rope.cos_sin(positions)
        for i in range(self.cfg.num_hidden_layers):
            x = self.model.layers[i].forward(x, rope, cache.layer(i), meta)
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
        rope = self.model.rope.cos_sin(positions)
        return layer.forward_mtp(self.model.embed_tokens(tokens), hidden, rope, cache.layer(depth), meta)
