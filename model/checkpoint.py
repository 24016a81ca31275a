"""The released checkpoint layout: every tensor's name, shape and dtype from a config; writers for that layout."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from specdec.kernels.fp8 import weight_quant_ref
from specdec.kernels.triton_util import cdiv

from .config import ModelConfig


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: str  # safetensors dtype name: "F8_E4M3" | "BF16" | "F32" | ...


ST_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


def _linears(cfg: ModelConfig, layer: int) -> Iterator[tuple[str, int, int]]:
    """(name, out_features, in_features) of every quantizable linear of a layer, in checkpoint order."""
    p = f"model.layers.{layer}"
    d, h = cfg.hidden_size, cfg.num_attention_heads
    if cfg.is_moe_layer(layer):
        for e in range(cfg.n_routed_experts):
            yield f"{p}.mlp.experts.{e}.gate_proj", cfg.moe_intermediate_size, d
            yield f"{p}.mlp.experts.{e}.up_proj", cfg.moe_intermediate_size, d
            yield f"{p}.mlp.experts.{e}.down_proj", d, cfg.moe_intermediate_size
        if cfg.n_shared_experts:
            i = cfg.moe_intermediate_size * cfg.n_shared_experts
            yield f"{p}.mlp.shared_experts.gate_proj", i, d
            yield f"{p}.mlp.shared_experts.up_proj", i, d
            yield f"{p}.mlp.shared_experts.down_proj", d, i
    else:
        yield f"{p}.mlp.gate_proj", cfg.intermediate_size, d
        yield f"{p}.mlp.up_proj", cfg.intermediate_size, d
        yield f"{p}.mlp.down_proj", d, cfg.intermediate_size
    if cfg.q_lora_rank is None:
        yield f"{p}.self_attn.q_proj", h * cfg.qk_head_dim, d
    else:
        yield f"{p}.self_attn.q_a_proj", cfg.q_lora_rank, d
        yield f"{p}.self_attn.q_b_proj", h * cfg.qk_head_dim, cfg.q_lora_rank
    yield f"{p}.self_attn.kv_a_proj_with_mqa", cfg.kv_cache_dim, d
    yield f"{p}.self_attn.kv_b_proj", h * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank
    yield f"{p}.self_attn.o_proj", d, h * cfg.v_head_dim


def checkpoint_manifest(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """Every tensor of a checkpoint for `cfg` in the released layout (FP8 + scales when cfg.fp8 is set)."""
    d, v = cfg.hidden_size, cfg.vocab_size
    half = "BF16"
    lin = "F8_E4M3" if cfg.fp8 else half
    out: dict[str, TensorSpec] = {
        "lm_head.weight": TensorSpec((v, d), half),
        "model.embed_tokens.weight": TensorSpec((v, d), half),
        "model.norm.weight": TensorSpec((d,), half),
    }
    for layer in range(cfg.num_layers_with_mtp):
        p = f"model.layers.{layer}"
        for name, n, k in _linears(cfg, layer):
            out[f"{name}.weight"] = TensorSpec((n, k), lin)
            if cfg.fp8:
                out[f"{name}.weight_scale_inv"] = TensorSpec((cdiv(n, cfg.fp8.block_n), cdiv(k, cfg.fp8.block_k)),
                                                             "F32")
        out[f"{p}.input_layernorm.weight"] = TensorSpec((d,), half)
        out[f"{p}.post_attention_layernorm.weight"] = TensorSpec((d,), half)
        out[f"{p}.self_attn.kv_a_layernorm.weight"] = TensorSpec((cfg.kv_lora_rank,), half)
        if cfg.q_lora_rank is not None:
            out[f"{p}.self_attn.q_a_layernorm.weight"] = TensorSpec((cfg.q_lora_rank,), half)
        if cfg.is_moe_layer(layer):
            out[f"{p}.mlp.gate.weight"] = TensorSpec((cfg.n_routed_experts, d), half)
            out[f"{p}.mlp.gate.e_score_correction_bias"] = TensorSpec((cfg.n_routed_experts,), "F32")
        if layer >= cfg.num_hidden_layers:
            out[f"{p}.eh_proj.weight"] = TensorSpec((d, 2 * d), half)
            out[f"{p}.embed_tokens.weight"] = TensorSpec((v, d), half)
            out[f"{p}.enorm.weight"] = TensorSpec((d,), half)
            out[f"{p}.hnorm.weight"] = TensorSpec((d,), half)
            out[f"{p}.shared_head.head.weight"] = TensorSpec((v, d), half)
            out[f"{p}.shared_head.norm.weight"] = TensorSpec((d,), half)
    return out


def is_shared_copy(cfg: ModelConfig, name: str) -> bool:
    """The MTP layers' copies of embed_tokens / lm_head: validated but never loaded (the runtime shares one)."""
    if not name.startswith("model.layers."):
        return False
    layer = int(name.split(".")[2])
    return layer >= cfg.num_hidden_layers and name.endswith((".embed_tokens.weight", ".shared_head.head.weight"))


def tiny_config(**overrides: Any) -> dict[str, Any]:
    """A small DeepSeek-V3 `config.json` dict in the released format (rope_scaling, quantization_config)."""
    cfg: dict[str, Any] = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3", "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 0, "eos_token_id": 1, "hidden_act": "silu",
        "vocab_size": 256, "hidden_size": 64, "intermediate_size": 96, "moe_intermediate_size": 32,
        "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 4,
        "q_lora_rank": 48, "kv_lora_rank": 32, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
        "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 2, "topk_group": 1,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "norm_topk_prob": True, "routed_scaling_factor": 2.5,
        "scoring_func": "sigmoid", "topk_method": "noaux_tc", "num_nextn_predict_layers": 1,
        "max_position_embeddings": 512, "rms_norm_eps": 1e-6, "rope_theta": 10000, "rope_scaling": None,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16", "initializer_range": 0.02, "use_cache": True,
        "ep_size": 1,
    }
    cfg.update(overrides)
    return cfg


def random_tensors(cfg: ModelConfig, seed: int = 0, std: float = 0.05) -> dict[str, torch.Tensor]:
    """Random float32 weights for every manifest tensor (scales excluded; MTP copies equal the shared tensors)."""
    g = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for name, spec in checkpoint_manifest(cfg).items():
        if name.endswith("weight_scale_inv") or is_shared_copy(cfg, name):
            continue
        if "norm" in name:
            t = 1.0 + 0.1 * torch.randn(spec.shape, generator=g)
        elif name.endswith("e_score_correction_bias"):
            t = 0.05 * torch.randn(spec.shape, generator=g)
        elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
            t = torch.randn(spec.shape, generator=g)
        else:
            t = std * torch.randn(spec.shape, generator=g)
        out[name] = t
    return out


def save_checkpoint(path: str | Path, config: dict[str, Any], tensors: dict[str, torch.Tensor],
                    num_shards: int = 1) -> Path:
    """Write `tensors` (float, names as in the manifest) in the released layout: FP8 + scales for quantized
    linears when config has a quantization_config, BF16 elsewhere; MTP copies of embed/head filled in; sharded
    with a model.safetensors.index.json when num_shards > 1."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    cfg = ModelConfig.from_dict(config)
    manifest = checkpoint_manifest(cfg)
    out: dict[str, torch.Tensor] = {}
    for name, spec in manifest.items():
        if name.endswith("weight_scale_inv"):
            continue
        if is_shared_copy(cfg, name):
            src = "model.embed_tokens.weight" if name.endswith("embed_tokens.weight") else "lm_head.weight"
            t = tensors[src]
        else:
            t = tensors[name]
        if tuple(t.shape) != spec.shape:
            raise ValueError(f"{name}: shape {tuple(t.shape)} != expected {spec.shape}")
        if spec.dtype == "F8_E4M3":
            q, s = weight_quant_ref(t.float(), cfg.fp8.block_n, cfg.fp8.block_k)
            out[name], out[name + "_scale_inv"] = q, s
        else:
            out[name] = t.detach().to(ST_DTYPES[spec.dtype]).contiguous()
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    names = list(out)
    if num_shards <= 1:
        save_file(out, str(path / "model.safetensors"), metadata={"format": "pt"})
        return path
    per = cdiv(len(names), num_shards)
    weight_map = {}
    for i in range(num_shards):
        fname = f"model-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        chunk = {n: out[n] for n in names[i * per:(i + 1) * per]}
        save_file(chunk, str(path / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in chunk})
    total = sum(t.numel() * t.element_size() for t in out.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return path


def write_random_checkpoint(path: str | Path, config: dict[str, Any] | None = None, *, seed: int = 0,
                            num_shards: int = 3) -> Path:
    """A random checkpoint in exactly the released layout (tests, examples)."""
    config = config or tiny_config()
    return save_checkpoint(path, config, random_tensors(ModelConfig.from_dict(config), seed), num_shards)
