"""DeepSeek-V3 configuration: one frozen dataclass read from HF `config.json`."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A `config.json` that is malformed or inconsistent."""


@dataclass(frozen=True)
class YarnScaling:
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 1.0
    mscale_all_dim: float = 0.0


@dataclass(frozen=True)
class Fp8Config:
    block_n: int = 128  # rows (output features) per scale block
    block_k: int = 128  # columns (input features) per scale block


# annotation (a string under `from __future__ import annotations`) -> accepted JSON value types
_JSON_TYPES: dict[str, tuple[type, ...]] = {"int": (int,), "int | None": (int, type(None)), "float": (int, float),
                                            "bool": (bool,)}
_POSITIVE = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "max_position_embeddings",
             "kv_lora_rank", "qk_rope_head_dim", "v_head_dim", "n_group", "topk_group", "moe_layer_freq")
_NON_NEGATIVE = ("intermediate_size", "qk_nope_head_dim", "n_routed_experts", "n_shared_experts",
                 "moe_intermediate_size", "first_k_dense_replace", "num_nextn_predict_layers")


def _yarn(rope: dict[str, Any], max_position_embeddings: Any, err: Callable[[str], ConfigError]) -> YarnScaling:
    """rope_scaling's yarn fields, each a finite JSON number (null or 0 takes HF's default for beta_*, mscale*)."""
    if "factor" not in rope:
        raise err("rope_scaling (yarn) is malformed: it has no 'factor'")
    vals = {"factor": rope["factor"],
            "original_max_position_embeddings": rope.get("original_max_position_embeddings", max_position_embeddings),
            "beta_fast": rope.get("beta_fast") or 32, "beta_slow": rope.get("beta_slow") or 1,
            "mscale": rope.get("mscale") or 0.0, "mscale_all_dim": rope.get("mscale_all_dim") or 0.0}
    for k, v in vals.items():
        if not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
            raise err(f"rope_scaling.{k} must be a finite number, got {v!r}")
    if not float(vals["original_max_position_embeddings"]).is_integer():
        raise err(f"rope_scaling.original_max_position_embeddings must be an integer, got "
                  f"{vals['original_max_position_embeddings']!r}")
    vals["original_max_position_embeddings"] = int(vals["original_max_position_embeddings"])
    return YarnScaling(**{k: v if k == "original_max_position_embeddings" else float(v) for k, v in vals.items()})


def _mscale(scale: float, m: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    bos_token_id: int | None = 0
    eos_token_ids: tuple[int, ...] = (1,)
    # mla
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    # moe
    n_routed_experts: int = 0
    n_shared_experts: int = 0
    num_experts_per_tok: int = 1
    moe_intermediate_size: int = 0
    n_group: int = 1
    topk_group: int = 1
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    # mtp
    num_nextn_predict_layers: int = 0
    # rope / yarn
    rope_theta: float = 10000.0
    yarn: YarnScaling | None = None
    # fp8
    fp8: Fp8Config | None = None

    # derived ------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def kv_cache_dim(self) -> int:
        """Values stored per token per layer in the latent cache: latent + rotated k_pe."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        scale = self.qk_head_dim**-0.5
        if self.yarn is not None and self.yarn.mscale_all_dim:
            m = _mscale(self.yarn.factor, self.yarn.mscale_all_dim)
            scale *= m * m
        return scale

    @property
    def rope_attention_factor(self) -> float:
        """Multiplier YaRN applies to cos/sin (1.0 for the released config)."""
        if self.yarn is None:
            return 1.0
        y = self.yarn
        if y.mscale and y.mscale_all_dim:
            return _mscale(y.factor, y.mscale) / _mscale(y.factor, y.mscale_all_dim)
        return _mscale(y.factor)

    def is_moe_layer(self, layer: int) -> bool:
        """MTP layers (index >= num_hidden_layers) are always MoE when experts exist."""
        if self.n_routed_experts == 0:
            return False
        if layer >= self.num_hidden_layers:
            return True
        return layer >= self.first_k_dense_replace and layer % self.moe_layer_freq == 0

    @property
    def num_layers_with_mtp(self) -> int:
        return self.num_hidden_layers + self.num_nextn_predict_layers

    # construction -------------------------------------------------------------
    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str = "config.json") -> ModelConfig:
        def err(msg: str) -> ConfigError:
            return ConfigError(f"{source}: {msg}")

        if not isinstance(d, dict):
            raise err("top level must be a JSON object")
        for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"):
            if k not in d:
                raise err(f"missing required key {k!r}")
        mt = d.get("model_type", "deepseek_v3")
        if mt not in ("deepseek_v3", "deepseek_v2"):
            raise err(f"model_type {mt!r} is not deepseek_v3")
        if d.get("attention_bias"):
            raise err("attention_bias=true is not part of DeepSeek-V3")
        if d.get("tie_word_embeddings"):
            raise err("tie_word_embeddings=true is not part of DeepSeek-V3 (its lm_head is a tensor of its own)")
        if d.get("hidden_act", "silu") != "silu":
            raise err(f"hidden_act {d['hidden_act']!r} unsupported (silu only)")
        if d.get("scoring_func", "sigmoid") != "sigmoid":
            raise err(f"scoring_func {d['scoring_func']!r} unsupported (DeepSeek-V3 uses sigmoid)")
        if d.get("topk_method", "noaux_tc") != "noaux_tc":
            raise err(f"topk_method {d['topk_method']!r} unsupported (DeepSeek-V3 uses noaux_tc)")
        nkv = d.get("num_key_value_heads")
        if nkv is not None and nkv != d.get("num_attention_heads"):
            raise err("num_key_value_heads must equal num_attention_heads for MLA")

        names = {f.name for f in fields(cls)}
        kw: dict[str, Any] = {k: d[k] for k in names if k in d and k not in ("yarn", "fp8", "eos_token_ids")}
        if kw.get("n_group") is None:
            kw["n_group"] = 1
        if kw.get("topk_group") is None:
            kw["topk_group"] = 1
        if "first_k_dense_replace" in kw and kw["first_k_dense_replace"] is None:
            kw["first_k_dense_replace"] = 0
        kw["num_nextn_predict_layers"] = d.get("num_nextn_predict_layers", d.get("num_mtp_layers", 0)) or 0
        eos = d.get("eos_token_id", 1)
        eos_list = eos if isinstance(eos, list) else ([] if eos is None else [eos])
        if not all(isinstance(e, int) and not isinstance(e, bool) for e in eos_list):
            raise err(f"eos_token_id {eos!r} must be an integer, a list of integers or null")
        kw["eos_token_ids"] = tuple(eos_list)

        rope = d.get("rope_scaling") or d.get("rope_parameters")
        if rope is not None and not isinstance(rope, dict):
            raise err("rope_scaling must be an object or null")
        if rope:
            kind = rope.get("type", rope.get("rope_type", "default"))
            if "rope_theta" in rope:
                kw["rope_theta"] = rope["rope_theta"]
            if kind == "yarn":
                kw["yarn"] = _yarn(rope, d.get("max_position_embeddings", 4096), err)
            elif kind != "default":
                raise err(f"rope type {kind!r} unsupported (yarn or default)")

        q = d.get("quantization_config")
        if q is not None and not isinstance(q, dict):
            raise err("quantization_config must be an object or null")
        if q:
            if q.get("quant_method") != "fp8" or q.get("fmt", "e4m3") != "e4m3":
                raise err(f"quantization_config {q} unsupported (fp8 e4m3 block quantization only)")
            if q.get("activation_scheme", "dynamic") != "dynamic":
                raise err("quantization_config.activation_scheme must be 'dynamic'")
            bs = q.get("weight_block_size", [128, 128])
            if not (isinstance(bs, list) and len(bs) == 2 and all(isinstance(b, int) and b > 0 for b in bs)):
                raise err(f"quantization_config.weight_block_size {bs!r} must be two positive integers")
            kw["fp8"] = Fp8Config(block_n=bs[0], block_k=bs[1])

        try:
            cfg = cls(**kw)
        except TypeError as e:
            raise err(str(e)) from None
        cfg.validate(source)
        return cfg

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        p = Path(path)
        if p.is_dir():
            p = p / "config.json"
        if not p.is_file():
            raise ConfigError(f"{p}: config.json not found")
        try:
            d = json.loads(p.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{p}: malformed JSON ({e})") from None
        return cls.from_dict(d, str(p))

    def validate(self, source: str = "config") -> None:
        """Raise ConfigError naming the field for a value of the wrong type, out of range, or not finite."""
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(f"{source}: {msg}")

        for f in fields(self):  # JSON can hold any type (and NaN, Infinity): check before any arithmetic on the values
            ok = _JSON_TYPES.get(f.type)
            v = getattr(self, f.name)
            need(ok is None or (isinstance(v, ok) and (bool in ok or not isinstance(v, bool))),
                 f"{f.name} must be {f.type}, got {v!r}")
            need(not isinstance(v, float) or math.isfinite(v), f"{f.name} must be a finite number, got {v!r}")
        for f in _POSITIVE:
            v = getattr(self, f)
            need(v > 0, f"{f} must be a positive integer, got {v!r}")
        for f in _NON_NEGATIVE:
            v = getattr(self, f)
            need(v >= 0, f"{f} must be >= 0, got {v!r}")
        for f in ("rms_norm_eps", "rope_theta", "routed_scaling_factor"):
            v = getattr(self, f)
            need(v > 0, f"{f} must be > 0, got {v!r}")
        vocab = self.vocab_size
        for e in self.eos_token_ids:  # an id past the vocabulary never comes out of the model: EOS would never stop
            need(0 <= e < vocab, f"eos_token_id {e} is outside the vocabulary [0, {vocab})")
        need(self.bos_token_id is None or 0 <= self.bos_token_id < vocab,
             f"bos_token_id {self.bos_token_id} is outside the vocabulary [0, {vocab})")
        need(self.qk_rope_head_dim % 2 == 0, f"qk_rope_head_dim {self.qk_rope_head_dim} must be even")
        need(self.q_lora_rank is None or self.q_lora_rank > 0, "q_lora_rank must be positive or null")
        if self.n_routed_experts:
            need(self.moe_intermediate_size > 0, "moe_intermediate_size must be positive when n_routed_experts > 0")
            need(self.n_routed_experts % self.n_group == 0,
                 f"n_routed_experts {self.n_routed_experts} not divisible by n_group {self.n_group}")
            need(self.topk_group <= self.n_group, f"topk_group {self.topk_group} must be in [1, n_group]")
            per_group = self.n_routed_experts // self.n_group
            need(self.n_group == 1 or per_group >= 2, "each expert group needs >= 2 experts (group score = top-2 sum)")
            need(1 <= self.num_experts_per_tok <= self.topk_group * per_group,
                 f"num_experts_per_tok {self.num_experts_per_tok} exceeds the experts in topk_group groups")
        dense = self.n_routed_experts == 0 or self.first_k_dense_replace > 0 or (
            self.moe_layer_freq > 1 and self.num_hidden_layers > 1)  # layer 0, or layer 1 (1 % freq != 0), is dense
        need(self.intermediate_size > 0 or not dense,
             f"intermediate_size must be positive (the config has dense MLP layers), got {self.intermediate_size}")
        if self.yarn is not None:
            y = self.yarn
            need(y.factor > 0, f"rope_scaling.factor must be positive, got {y.factor!r}")
            need(y.original_max_position_embeddings > 0, "rope_scaling.original_max_position_embeddings must be "
                 f"positive, got {y.original_max_position_embeddings!r}")
            need(y.beta_fast > 0 and y.beta_slow > 0,
                 f"rope_scaling.beta_fast / beta_slow must be positive, got {y.beta_fast!r} / {y.beta_slow!r}")
            need(self.rope_theta != 1, "rope_theta must not be 1 with yarn scaling (its ramp divides by log(theta))")
