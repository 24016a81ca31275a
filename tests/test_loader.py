"""The loader: safetensors only, and every kind of broken checkpoint raises a one-line CheckpointError naming
the culprit tensor and/or file."""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from specdec.model.checkpoint import tiny_config
from specdec.model.loader import CheckpointError, load_model

FP8_32 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [32, 32]}
INDEX = "model.safetensors.index.json"


def weight_map(ck: Path) -> dict[str, str]:
    return json.loads((ck / INDEX).read_text())["weight_map"]


def edit_json(path: Path, fn: Callable[[dict], None]) -> None:
    d = json.loads(path.read_text())
    fn(d)
    path.write_text(json.dumps(d))


def edit_shard(ck: Path, name: str, fn: Callable[[dict[str, torch.Tensor]], None]) -> str:
    """Rewrite the shard holding `name` after fn edits its tensors; returns the shard's file name."""
    fname = weight_map(ck)[name]
    tensors = load_file(ck / fname)
    fn(tensors)
    save_file(tensors, str(ck / fname), metadata={"format": "pt"})
    return fname


def drop(ck: Path, name: str, keep_in_index: bool = False) -> str:
    fname = edit_shard(ck, name, lambda t: t.pop(name))
    if not keep_in_index:
        edit_json(ck / INDEX, lambda d: d["weight_map"].pop(name))
    return fname


def replace(ck: Path, name: str, new: torch.Tensor) -> str:
    return edit_shard(ck, name, lambda t: t.__setitem__(name, new))


def chop(path: Path, n: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:-n])


def overwrite(path: Path, offset: int, raw: bytes) -> None:
    data = bytearray(path.read_bytes())
    data[offset:offset + len(raw)] = raw
    path.write_bytes(bytes(data))


def edit_header(path: Path, fn: Callable[[dict], None]) -> None:
    """Rewrite a safetensors header in place (same length, space-padded), leaving the data bytes alone."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    fn(header)
    new = json.dumps(header, separators=(",", ":")).encode()
    assert len(new) <= n
    path.write_bytes(raw[:8] + new.ljust(n) + raw[8 + n:])


SHARD2 = "model-00002-of-00003.safetensors"


def _missing_tensor(ck: Path) -> list[str]:
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    drop(ck, name)
    return [name, "missing"]


def _missing_scale(ck: Path) -> list[str]:
    name = "model.layers.0.self_attn.kv_b_proj.weight_scale_inv"
    drop(ck, name)
    return [name, "missing"]


def _index_names_absent_tensor(ck: Path) -> list[str]:
    name = "model.layers.2.self_attn.o_proj.weight"
    return [name, drop(ck, name, keep_in_index=True)]


def _wrong_shape(ck: Path) -> list[str]:
    name = "model.layers.2.self_attn.kv_a_layernorm.weight"
    return [name, replace(ck, name, torch.ones(31, dtype=torch.bfloat16)), "[31]"]


def _wrong_scale_shape(ck: Path) -> list[str]:
    name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"
    return [name, replace(ck, name, torch.ones(1, 2))]


def _wrong_dtype(ck: Path) -> list[str]:
    name = "model.norm.weight"
    return [name, replace(ck, name, torch.ones(64, dtype=torch.float32)), "F32"]


def _fp8_stored_as_bf16(ck: Path) -> list[str]:
    name = "model.layers.1.mlp.shared_experts.down_proj.weight"
    return [name, replace(ck, name, torch.zeros(64, 32, dtype=torch.bfloat16)), "BF16"]


def _truncated_shard(ck: Path) -> list[str]:
    chop(ck / SHARD2, 7)
    return [SHARD2, "truncated"]


def _header_not_json(ck: Path) -> list[str]:
    overwrite(ck / SHARD2, 8, b"\xff\xfe{{")
    return [SHARD2, "header"]


def _header_length_corrupt(ck: Path) -> list[str]:
    overwrite(ck / SHARD2, 0, (2**40).to_bytes(8, "little"))
    return [SHARD2, "header"]


def _header_offsets_disagree_with_shape(ck: Path) -> list[str]:
    name = "model.norm.weight"
    fname = weight_map(ck)[name]

    def shrink(h: dict) -> None:
        h[name]["data_offsets"][1] -= 2

    edit_header(ck / fname, shrink)
    return [fname, name, "corrupt header"]


def _header_offsets_overlap(ck: Path) -> list[str]:
    # both spans have the right length, but two tensors share bytes: only safetensors' own check can tell
    fname = weight_map(ck)["model.norm.weight"]
    names = [n for n, f in weight_map(ck).items() if f == fname and n.endswith("layernorm.weight")]

    def alias(h: dict) -> None:
        h[names[1]]["data_offsets"] = list(h[names[0]]["data_offsets"])

    edit_header(ck / fname, alias)
    return [fname]


def _file_shorter_than_header(ck: Path) -> list[str]:
    (ck / SHARD2).write_bytes(b"\x05\x00")
    return [SHARD2, "truncated"]


def _index_names_missing_file(ck: Path) -> list[str]:
    name = "model.layers.0.mlp.down_proj.weight"
    edit_json(ck / INDEX, lambda d: d["weight_map"].__setitem__(name, "model-00009-of-00009.safetensors"))
    return ["model-00009-of-00009.safetensors", name]


def _index_path_outside(ck: Path) -> list[str]:
    # the file exists outside the checkpoint: it must be refused for where it is, not for being absent
    shutil.copy(ck / SHARD2, ck.parent / "x.safetensors")
    edit_json(ck / INDEX, lambda d: d["weight_map"].__setitem__("model.norm.weight", "../x.safetensors"))
    return ["../x.safetensors", "outside"]


def _index_path_absolute(ck: Path) -> list[str]:
    target = str(shutil.copy(ck / SHARD2, ck.parent / "abs.safetensors"))
    edit_json(ck / INDEX, lambda d: d["weight_map"].__setitem__("model.norm.weight", target))
    return ["abs.safetensors", "outside"]


def _index_entry_not_a_name(ck: Path) -> list[str]:
    edit_json(ck / INDEX, lambda d: d["weight_map"].__setitem__("model.norm.weight", 2))
    return [INDEX, "model.norm.weight", "must be a file name, got 2"]


def _index_not_json(ck: Path) -> list[str]:
    (ck / INDEX).write_text('{"weight_map": ')
    return [INDEX]


def _no_weights(ck: Path) -> list[str]:
    for f in ck.glob("*.safetensors*"):
        f.unlink()
    return [ck.name, "model.safetensors"]


def _config_bad_json(ck: Path) -> list[str]:
    (ck / "config.json").write_text('{"hidden_size": 64,')
    return ["config.json", "JSON"]


def _config_missing_key(ck: Path) -> list[str]:
    edit_json(ck / "config.json", lambda d: d.pop("num_attention_heads"))
    return ["config.json", "missing required key", "num_attention_heads"]


def _config_inconsistent(ck: Path) -> list[str]:
    edit_json(ck / "config.json", lambda d: d.update(n_group=3))  # 8 experts do not split into 3 groups
    return ["config.json", "n_group"]


def _config_wrong_type(ck: Path) -> list[str]:
    edit_json(ck / "config.json", lambda d: d.update(num_experts_per_tok="2"))
    return ["config.json", "num_experts_per_tok"]


def _config_disagrees_with_tensors(ck: Path) -> list[str]:
    edit_json(ck / "config.json", lambda d: d.update(hidden_size=48))
    return ["lm_head.weight", "[256, 64]", "[256, 48]"]


def _config_fewer_experts(ck: Path) -> list[str]:
    edit_json(ck / "config.json", lambda d: d.update(n_routed_experts=4, num_experts_per_tok=2))
    return ["model.layers.1.mlp.gate.weight"]


def _config_more_layers(ck: Path) -> list[str]:
    edit_json(ck / "config.json", lambda d: d.update(num_hidden_layers=5))
    return ["model.layers.4.", "missing"]


BROKEN: dict[str, tuple[Callable[[Path], list[str]], bool]] = {  # case -> (break it, FP8 checkpoint?)
    "missing tensor": (_missing_tensor, False),
    "missing scale": (_missing_scale, True),
    "index names a tensor its shard lacks": (_index_names_absent_tensor, False),
    "wrong shape": (_wrong_shape, False),
    "wrong scale shape": (_wrong_scale_shape, True),
    "wrong dtype": (_wrong_dtype, False),
    "FP8 tensor stored as BF16": (_fp8_stored_as_bf16, True),
    "truncated shard": (_truncated_shard, False),
    "header not JSON": (_header_not_json, False),
    "header length corrupt": (_header_length_corrupt, False),
    "file shorter than a header": (_file_shorter_than_header, False),
    "header offsets disagree with shape": (_header_offsets_disagree_with_shape, False),
    "header offsets overlap": (_header_offsets_overlap, False),
    "index names a missing file": (_index_names_missing_file, False),
    "index path outside the checkpoint": (_index_path_outside, False),
    "index path absolute": (_index_path_absolute, False),
    "index entry not a file name": (_index_entry_not_a_name, False),
    "index not JSON": (_index_not_json, False),
    "no weight files": (_no_weights, False),
    "config.json bad JSON": (_config_bad_json, False),
    "config.json missing key": (_config_missing_key, False),
    "config.json inconsistent": (_config_inconsistent, False),
    "config.json wrong value type": (_config_wrong_type, False),
    "config.json hidden_size != tensors": (_config_disagrees_with_tensors, False),
    "config.json fewer experts than tensors": (_config_fewer_experts, False),
    "config.json more layers than tensors": (_config_more_layers, False),
}


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_checkpoint_names_culprit(case: str, make_checkpoint) -> None:
    breaker, fp8 = BROKEN[case]
    ck = make_checkpoint(tiny_config(quantization_config=FP8_32) if fp8 else None)
    culprits = breaker(ck)
    with pytest.raises(CheckpointError) as e:
        load_model(ck, dtype=torch.float32, progress=False)
    msg = str(e.value)
    assert isinstance(e.value, ValueError) and "\n" not in msg, msg
    for c in culprits:
        assert c in msg, f"{case}: {c!r} not named in {msg!r}"


def test_sharded_and_single_file_load_the_same_weights(make_checkpoint) -> None:
    one = load_model(make_checkpoint(num_shards=1), dtype=torch.float32, progress=False).state_dict()
    three = load_model(make_checkpoint(num_shards=3), dtype=torch.float32, progress=False).state_dict()
    assert one.keys() == three.keys()
    assert all(torch.equal(one[k], three[k]) for k in one)
    assert one["model.layers.1.mlp.w13"].abs().sum() > 0  # weights were actually read


def _hub_snapshot(src: Path, root: Path) -> Path:
    """src laid out as Hugging Face's cache holds a download: every file a blob under blobs/, linked (relative
    links) from snapshots/<rev>/."""
    snap = root / "models--tiny" / "snapshots" / "0123abc"
    blobs = root / "models--tiny" / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted(src.iterdir())):
        shutil.copy(f, blobs / f"blob{i}")
        (snap / f.name).symlink_to(Path("../../blobs") / f"blob{i}")
    return snap


@pytest.mark.parametrize("num_shards", [1, 3])
def test_hugging_face_cache_layout_loads(num_shards: int, make_checkpoint, tmp_path: Path) -> None:
    """Symlinked shards (and config) load like the files they point to, also when the links lead outside the
    folder: that is how the Hugging Face cache holds every downloaded checkpoint."""
    src = make_checkpoint(num_shards=num_shards)
    snap = _hub_snapshot(src, tmp_path)
    assert all(f.is_symlink() for f in snap.iterdir())
    want = load_model(src, dtype=torch.float32, progress=False).state_dict()
    got = load_model(snap, dtype=torch.float32, progress=False).state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_a_symlinked_shard_elsewhere_is_followed(make_checkpoint, tmp_path: Path) -> None:
    """A link the user put in the folder is followed, wherever it leads (index names with `..` or an absolute path
    are refused: BROKEN above)."""
    ck = make_checkpoint()
    (ck / SHARD2).rename(tmp_path / "moved.safetensors")
    (ck / SHARD2).symlink_to(tmp_path / "moved.safetensors")
    load_model(ck, dtype=torch.float32, progress=False)


class _Trap:
    """Unpickling this touches `path`: proof that a pickle was loaded."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def test_loader_never_unpickles(make_checkpoint, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    ck = make_checkpoint(tiny_config(quantization_config=FP8_32))
    sentinel = tmp_path / "unpickled"
    for name in ("pytorch_model.bin", "model.pt", "training_args.bin"):  # bait beside the safetensors files
        (ck / name).write_bytes(pickle.dumps(_Trap(sentinel)))

    def refuse(*args, **kwargs):
        raise AssertionError("the loader unpickled something")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    load_model(ck, dtype=torch.float32, progress=False)
    for f in ck.glob("*.safetensors*"):
        f.unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_model(ck, dtype=torch.float32, progress=False)  # a pickle-only checkpoint is refused, not loaded
    assert not sentinel.exists()
