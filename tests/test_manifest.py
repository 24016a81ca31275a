"""checkpoint_manifest: the released checkpoint's 91,991 tensors exactly; written checkpoints follow it."""

from __future__ import annotations

import json
import math
from pathlib import Path

from reference import DATA

from specdec.model.checkpoint import TensorSpec, checkpoint_manifest, tiny_config
from specdec.model.config import ModelConfig
from specdec.model.loader import Checkpoint

DTYPE_BYTES = {"F8_E4M3": 1, "BF16": 2, "F32": 4}


def expand_reference(path: Path) -> dict[str, TensorSpec]:
    """The reference listing with its inclusive {L}/{E} ranges expanded to one entry per tensor."""
    out: dict[str, TensorSpec] = {}
    for t in json.loads(path.read_text())["tensors"]:
        l0, l1 = t.get("layers", [None, None])
        e0, e1 = t.get("experts", [None, None])
        for layer in range(l0, l1 + 1) if l0 is not None else [None]:
            for e in range(e0, e1 + 1) if e0 is not None else [None]:
                name = t["name"].replace("{L}", str(layer)).replace("{E}", str(e))
                assert name not in out, f"reference lists {name} twice"
                out[name] = TensorSpec(tuple(t["shape"]), t["dtype"])
    return out


def test_released_manifest_equals_reference_listing() -> None:
    ref_doc = json.loads((DATA / "deepseek-v3-tensors.json").read_text())
    ref = expand_reference(DATA / "deepseek-v3-tensors.json")
    ours = checkpoint_manifest(ModelConfig.from_file(DATA / "deepseek-v3-config.json"))
    assert len(ref) == ref_doc["tensor_count"] == 91_991
    assert sorted(set(ref) - set(ours))[:5] == [] and sorted(set(ours) - set(ref))[:5] == []
    wrong = [(n, ours[n], ref[n]) for n in ref if ours[n] != ref[n]]
    assert wrong[:5] == [], f"{len(wrong)} tensors differ in shape or dtype"
    assert sum(math.prod(s.shape) for s in ours.values()) == ref_doc["element_count"] == 684_531_386_000
    assert sum(math.prod(s.shape) * DTYPE_BYTES[s.dtype] for s in ours.values()) == ref_doc["bytes"]


def test_fp8_manifest_scales_cover_partial_blocks() -> None:
    q = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [32, 32]}
    m = checkpoint_manifest(ModelConfig.from_dict(tiny_config(quantization_config=q)))
    # kv_a: [kv_lora_rank + rope = 40, hidden 64] -> 2 x 2 blocks of 32, the second row block partial
    assert m["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"] == TensorSpec((40, 64), "F8_E4M3")
    assert m["model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"] == TensorSpec((2, 2), "F32")
    assert m["model.layers.3.eh_proj.weight"] == TensorSpec((64, 128), "BF16")  # never quantized
    assert "model.layers.3.eh_proj.weight_scale_inv" not in m
    assert m["model.layers.1.mlp.gate.weight"].dtype == "BF16"
    assert m["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == "F32"


def test_written_checkpoint_holds_exactly_the_manifest(make_checkpoint) -> None:
    q = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [32, 32]}
    for cfg in (tiny_config(), tiny_config(quantization_config=q, q_lora_rank=None)):
        ck = Checkpoint(make_checkpoint(cfg, num_shards=3))
        assert {n: e.spec for n, e in ck.entries.items()} == checkpoint_manifest(ck.config)
        assert len({e.file for e in ck.entries.values()}) == 3
