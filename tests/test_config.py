"""ModelConfig: the released config.json parses to the published architecture; broken configs raise ConfigError."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
from reference import V3_CONFIG

from specdec.model.checkpoint import tiny_config
from specdec.model.config import ConfigError, ModelConfig

RELEASED = V3_CONFIG


def test_released_config() -> None:
    c = ModelConfig.from_file(RELEASED)
    assert (c.hidden_size, c.num_hidden_layers, c.num_attention_heads, c.vocab_size) == (7168, 61, 128, 129280)
    assert (c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim) == (
        1536, 512, 128, 64, 128)
    assert (c.n_routed_experts, c.num_experts_per_tok, c.n_group, c.topk_group) == (256, 8, 8, 4)
    assert (c.fp8.block_n, c.fp8.block_k) == (128, 128)
    assert c.yarn.factor == 40 and c.yarn.original_max_position_embeddings == 4096
    assert c.kv_cache_dim == 576 and c.qk_head_dim == 192 and c.num_layers_with_mtp == 62
    assert [c.is_moe_layer(i) for i in (0, 2, 3, 60, 61)] == [False, False, True, True, True]
    m = 0.1 * 1.0 * math.log(40) + 1.0  # yarn mscale with mscale_all_dim = 1
    assert c.softmax_scale == pytest.approx(192**-0.5 * m * m)
    assert c.rope_attention_factor == pytest.approx(1.0)  # mscale == mscale_all_dim
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.hidden_size = 1  # type: ignore[misc]


def test_rope_parameters_spelling_equals_rope_scaling() -> None:
    yarn = {"factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 8, "beta_slow": 2, "mscale": 0.9,
            "mscale_all_dim": 0.7}
    old = tiny_config(rope_theta=5000, rope_scaling={"type": "yarn", **yarn})
    new = tiny_config(rope_parameters={"rope_type": "yarn", "rope_theta": 5000, **yarn})
    del new["rope_scaling"], new["rope_theta"]
    a, b = ModelConfig.from_dict(old), ModelConfig.from_dict(new)
    assert a == b and a.rope_theta == 5000 and a.yarn.mscale_all_dim == 0.7
    plain = tiny_config(rope_parameters={"rope_type": "default", "rope_theta": 123.0})
    del plain["rope_scaling"], plain["rope_theta"]
    assert ModelConfig.from_dict(plain).rope_theta == 123.0 and ModelConfig.from_dict(plain).yarn is None


def test_all_experts_moe_needs_no_dense_width() -> None:
    c = ModelConfig.from_dict(tiny_config(intermediate_size=0, first_k_dense_replace=0))
    assert all(c.is_moe_layer(i) for i in range(c.num_hidden_layers))


def test_nulls_and_lists() -> None:
    c = ModelConfig.from_dict(tiny_config(n_group=None, topk_group=None, first_k_dense_replace=None,
                                          eos_token_id=[1, 7], q_lora_rank=None))
    assert (c.n_group, c.topk_group, c.first_k_dense_replace, c.eos_token_ids, c.q_lora_rank) == (1, 1, 0, (1, 7),
                                                                                                  None)


def _without(key: str) -> dict[str, Any]:
    d = tiny_config()
    del d[key]
    return d


BROKEN: dict[str, tuple[dict[str, Any], str]] = {
    "missing key": (_without("num_attention_heads"), "missing required key 'num_attention_heads'"),
    "experts vs groups": (tiny_config(n_routed_experts=6, n_group=4), "n_group"),
    "topk_group > n_group": (tiny_config(topk_group=3), "topk_group"),
    "too many experts per token": (tiny_config(num_experts_per_tok=5), "num_experts_per_tok"),
    "odd rope dim": (tiny_config(qk_rope_head_dim=7), "qk_rope_head_dim"),
    "negative size": (tiny_config(vocab_size=-3), "vocab_size"),
    "other model": (tiny_config(model_type="llama"), "model_type"),
    "gqa": (tiny_config(num_key_value_heads=2), "num_key_value_heads"),
    "softmax router": (tiny_config(scoring_func="softmax"), "scoring_func"),
    "rope type": (tiny_config(rope_scaling={"type": "linear", "factor": 2.0}), "linear"),
    "yarn without factor": (tiny_config(rope_scaling={"type": "yarn"}), "rope_scaling"),
    "block size": (tiny_config(quantization_config={"quant_method": "fp8", "weight_block_size": [128]}),
                   "weight_block_size"),
    "int8": (tiny_config(quantization_config={"quant_method": "int8"}), "quantization_config"),
    "rope_scaling not an object": (tiny_config(rope_scaling=[1, 2]), "rope_scaling"),
    "quantization_config not an object": (tiny_config(quantization_config="fp8"), "quantization_config"),
    "string for int": (tiny_config(n_group="2"), "n_group must be int"),
    "null for int": (tiny_config(num_experts_per_tok=None), "num_experts_per_tok must be int"),
    "string for float": (tiny_config(rms_norm_eps="tiny"), "rms_norm_eps must be float"),
    "string for int | None": (tiny_config(q_lora_rank="48"), "q_lora_rank"),
    "bad eos": (tiny_config(eos_token_id=["</s>"]), "eos_token_id"),
    # issue 17: values of the right type but out of range or not finite, each named (none reaches arithmetic)
    "no expert groups": (tiny_config(n_group=0), "n_group must be a positive integer, got 0"),
    "negative context": (tiny_config(max_position_embeddings=-5), "max_position_embeddings must be a positive"),
    "empty context": (tiny_config(max_position_embeddings=0), "max_position_embeddings must be a positive"),
    "eos -1": (tiny_config(eos_token_id=-1), "eos_token_id -1 is outside the vocabulary [0, 256)"),
    "eos past the vocabulary": (tiny_config(eos_token_id=[1, 256]), "eos_token_id 256 is outside the vocabulary"),
    "bos past the vocabulary": (tiny_config(bos_token_id=300), "bos_token_id 300 is outside the vocabulary"),
    "zero eps": (tiny_config(rms_norm_eps=0), "rms_norm_eps must be > 0"),
    "negative rope_theta": (tiny_config(rope_theta=-1), "rope_theta must be > 0"),
    "NaN scaling factor": (tiny_config(routed_scaling_factor=float("nan")), "routed_scaling_factor must be a finite"),
    "infinite eps": (tiny_config(rms_norm_eps=float("inf")), "rms_norm_eps must be a finite"),
    "negative shared experts": (tiny_config(n_shared_experts=-1), "n_shared_experts must be >= 0"),
    "negative dense layers": (tiny_config(first_k_dense_replace=-2), "first_k_dense_replace must be >= 0"),
    "no dense width": (tiny_config(intermediate_size=0), "intermediate_size must be positive"),
    "no dense width, every other layer dense": (tiny_config(intermediate_size=0, first_k_dense_replace=0,
                                                            moe_layer_freq=2), "intermediate_size"),
    "yarn factor NaN": (tiny_config(rope_scaling={"type": "yarn", "factor": float("nan")}), "rope_scaling.factor"),
    "yarn factor 0": (tiny_config(rope_scaling={"type": "yarn", "factor": 0}), "rope_scaling.factor"),
    "yarn beta as text": (tiny_config(rope_scaling={"type": "yarn", "factor": 4, "beta_fast": "32"}),
                          "rope_scaling.beta_fast must be a finite number"),
    "yarn context 2.5": (tiny_config(rope_scaling={"type": "yarn", "factor": 4,
                                                   "original_max_position_embeddings": 2.5}),
                         "rope_scaling.original_max_position_embeddings must be an integer"),
    "yarn with rope_theta 1": (tiny_config(rope_theta=1, rope_scaling={"type": "yarn", "factor": 4}), "rope_theta"),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_config_raises_config_error(case: str, tmp_path: Path) -> None:
    d, culprit = BROKEN[case]
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_file(tmp_path)
    msg = str(e.value)
    assert culprit in msg and "config.json" in msg and "\n" not in msg, msg
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("text", ["{ not json", "[1, 2]", ""])
def test_unparsable_config_raises_config_error(text: str, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(ConfigError, match="config.json"):
        ModelConfig.from_file(tmp_path / "config.json")


def test_missing_config_raises_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_file(tmp_path)
