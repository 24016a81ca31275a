"""`specdec inspect`: the released layout's numbers (resident bytes per weight path and per rank derived here from the
tensor list alone), per-rank bytes equal to the runtime's own parameters, header-only checking of a checkpoint, and
one-line errors for broken ones."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from cli_errors import one_line_error
from reference import V3_CONFIG

from specdec.cli import main
from specdec.cli.inspect import RESERVE
from specdec.model import loader
from specdec.model.checkpoint import ST_DTYPES, checkpoint_manifest, is_shared_copy, tiny_config
from specdec.model.config import ModelConfig
from specdec.model.parallel import DistInfo
from specdec.model.plan import WEIGHT_PATHS, weight_bytes_per_rank
from specdec.model.transformer import DeepseekV3

V3 = str(V3_CONFIG)
V3_ROUTED_PER_EXPERT = 3 * 2048 * 7168  # gate, up, down of one routed expert
V3_EMBED = 129280 * 7168
# the release's tensors every rank holds whole; at tp=8 every other tensor (scales included) splits exactly 8 ways
V3_REPLICATED = re.compile(r"norm\.|layernorm\.|\.q_a_proj\.|\.kv_a_proj_with_mqa\.|\.mlp\.gate\.|\.eh_proj\.")


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(["inspect", *argv, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture(scope="module")
def v3() -> dict:
    """`specdec inspect <released config.json> --tp 8 --gpu-mem-gb 141 --json`, parsed."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["inspect", V3, "--tp", "8", "--gpu-mem-gb", "141", "--json"]) == 0
    return json.loads(out.getvalue())


def test_released_config_json(v3: dict) -> None:
    s = v3
    cfg = ModelConfig.from_file(V3)
    manifest = checkpoint_manifest(cfg)  # equal to the reference listing: test_manifest.py
    assert len(s["tensors"]) == s["tensor_count"] == 91_991
    assert s["tensors"] == {n: {"shape": list(t.shape), "dtype": t.dtype} for n, t in manifest.items()}
    assert s["element_count"] == 684_531_386_000 and s["checkpoint_bytes"] == 688_574_839_360
    p = s["params"]
    assert p["main"] == 671_026_419_200  # DeepSeek's "671B"
    assert p["mtp_shared_copies"] == 2 * V3_EMBED
    scales = sum(t.shape[0] * t.shape[1] for n, t in manifest.items() if n.endswith("_scale_inv"))
    assert p["main"] + p["mtp"] + scales == s["element_count"]
    # 58 MoE layers (61 - 3 dense) keep 8 of their 256 routed experts: DeepSeek's "37B activated"
    assert p["activated_per_token"] == p["main"] - 58 * (256 - 8) * V3_ROUTED_PER_EXPERT == 37_552_297_472
    assert s["kv_cache_bytes_per_token"] == {"main": 61 * 576 * 2, "mtp": 576 * 2, "total": 62 * 576 * 2}
    w, kv, n = s["weight_bytes_per_rank"], s["kv_cache_bytes_per_token"]["total"], s["kv_cache_capacity_tokens"]
    budget = 141 * 2**30 * (1 - RESERVE)
    assert s["reserve_fraction"] == RESERVE and w + n * kv <= budget < w + (n + 1) * kv
    # one rank: every stored byte except the MTP's BF16 copies of embed_tokens and lm_head
    assert weight_bytes_per_rank(cfg, 1) == 688_574_839_360 - 2 * V3_EMBED * 2


def test_released_resident_bytes_per_path_and_rank(v3: dict) -> None:
    """As released, BF16 and float32, whole and per rank at tp=8, against a reference built from the tensor list:
    the MTP's embed/head copies are not held, the dequantized paths drop the FP8 scales, and at tp=8 a rank holds
    the replicated tensors whole and an eighth of every other (routed experts: 32 of 256)."""
    cfg = ModelConfig.from_file(V3)
    ref: dict[str, dict[str, int]] = {}
    for path, size in (("released", None), ("bfloat16", 2), ("float32", 4)):
        whole = rank = 0
        for name, t in checkpoint_manifest(cfg).items():
            if is_shared_copy(cfg, name) or size and name.endswith("_scale_inv"):
                continue
            b = math.prod(t.shape) * (size or ST_DTYPES[t.dtype].itemsize)
            whole, rank = whole + b, rank + (b if V3_REPLICATED.search(name) else b // 8)
        ref[path] = {"model": whole, "per_rank": rank}
    assert v3["resident_bytes"] == ref
    held = v3["params"]["main"] + v3["params"]["mtp"] - v3["params"]["mtp_shared_copies"]
    assert ref["bfloat16"]["model"] == 2 * held == 1_365_272_974_848  # the "1.3 TB" in BF16
    assert ref["float32"]["model"] == 4 * held  # its "2.7 TB"
    assert ref["released"]["model"] == 684_868_123_200 and ref["released"]["per_rank"] == 86_801_178_816
    assert v3["weight_bytes_per_rank"] == ref["released"]["per_rank"]  # what the KV capacity is left beside


def test_released_config_table(v3: dict, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", V3, "--gpu-mem-gb", "80"]) == 0
    out = capsys.readouterr().out
    for want in ("91,991 tensors", "671,026,419,200", "37,552,297,472", "71,424 B", "10% of 80 GiB",
                 "0 tok", "weights do not fit", "weights as released  684,868,123,200 B",
                 "weights in BF16  1,365,272,974,848 B", "weights in float32  2,730,545,949,696 B"):
        assert want in re.sub(r"\s{2,}", "  ", out), want
    rows = out.splitlines()[1:]
    number_ends = {r.index(num) + len(num) for r in rows for num in [re.split(r"\s{2,}", r.strip())[1]]}
    assert len(rows) == 8 and len(number_ends) == 1 and "per rank" not in out, out  # one right-aligned column
    assert main(["inspect", V3, "--tp", "8"]) == 0
    out = re.sub(r"\s{2,}", "  ", capsys.readouterr().out)
    for want in ("as released, per rank tp=8  86,801,178,816 B", "BF16, per rank tp=8  172,672,833,024 B",
                 "float32, per rank tp=8  345,345,666,048 B"):
        assert want in out, want


FP8_8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [8, 8]}


@pytest.mark.parametrize("config", [tiny_config(quantization_config=FP8_8),
                                    tiny_config(q_lora_rank=None, n_shared_experts=2, first_k_dense_replace=2)],
                         ids=["fp8+q_lora", "bf16+q_proj"])
@pytest.mark.parametrize("tp", [1, 2, 4, 3, 8])
def test_inspect_refuses_exactly_the_splits_the_runtime_refuses(config: dict, tp: int, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """inspect's per-rank bytes come from the runtime's own meta-device model (model/plan.py; test_tp.py checks
    that a rank's load reads exactly them), so it accepts a --tp exactly when the runtime builds that split, and
    then reports more bytes per rank the fewer ranks share the model."""
    cfg = ModelConfig.from_dict(config)
    (tmp_path / "config.json").write_text(json.dumps(config))
    try:
        with torch.device("meta"):
            DeepseekV3(cfg, dtype=torch.bfloat16, keep_fp8=True, dist=DistInfo(0, tp))
    except ValueError as e:
        assert main(["inspect", str(tmp_path / "config.json"), "--tp", str(tp)]) == 2
        assert f"--tp {tp}: {e}" in capsys.readouterr().err
        return
    s = run_json(capsys, str(tmp_path / "config.json"), "--tp", str(tp))
    assert s["weight_bytes_per_rank"] == weight_bytes_per_rank(cfg, tp)
    assert s["resident_bytes"] == {p: {"model": weight_bytes_per_rank(cfg, 1, p),
                                       "per_rank": weight_bytes_per_rank(cfg, tp, p)} for p in WEIGHT_PATHS}
    r = s["resident_bytes"]
    assert r["float32"] == {k: 2 * v for k, v in r["bfloat16"].items()}
    if tp > 1:
        for p in WEIGHT_PATHS:
            assert r[p]["model"] / tp <= r[p]["per_rank"] < r[p]["model"], p


def test_unknown_weight_path_is_refused() -> None:
    with pytest.raises(ValueError, match="weight path 'int4': choose one of released, bfloat16, float32"):
        weight_bytes_per_rank(ModelConfig.from_dict(tiny_config()), 1, "int4")


def test_checkpoint_dir_is_checked_from_headers_only(make_checkpoint, capsys: pytest.CaptureFixture[str],
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    ck = make_checkpoint(tiny_config(quantization_config=FP8_8))

    def no_data(*args, **kwargs):
        raise AssertionError("inspect read tensor data")

    monkeypatch.setattr(loader, "safe_open", no_data)
    s = run_json(capsys, str(ck), "--tp", "2", "--gpu-mem-gb", "0.001")
    assert s["source"] == "checkpoint" and s["headers_validated"] and s["tp"] == 2
    assert s["tensors"] == {n: {"shape": list(e.spec.shape), "dtype": e.spec.dtype}
                            for n, e in loader.Checkpoint(ck).entries.items()}
    assert s["kv_cache_capacity_tokens"] > 0
    assert run_json(capsys, str(ck / "config.json"))["source"] == "config"


def _missing_tensor(ck: Path) -> str:
    index = ck / "model.safetensors.index.json"
    d = json.loads(index.read_text())
    d["weight_map"]["model.layers.1.mlp.gate.weight"] = "gone.safetensors"
    index.write_text(json.dumps(d))
    return "gone.safetensors"


def _truncated(ck: Path) -> str:
    f = ck / "model-00003-of-00003.safetensors"
    f.write_bytes(f.read_bytes()[:-1])
    return f.name


def _bad_config(ck: Path) -> str:
    (ck / "config.json").write_text("{")
    return "config.json"


@pytest.mark.parametrize("breaker", [_missing_tensor, _truncated, _bad_config])
def test_broken_checkpoint_exits_nonzero_with_one_line(breaker, make_checkpoint,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    ck = make_checkpoint()
    culprit = breaker(ck)
    assert main(["inspect", str(ck)]) != 0
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and culprit in err and err.startswith("specdec inspect: error:"), err


@pytest.mark.parametrize("argv", [["/nonexistent/ckpt"], ["--tp", "0"], ["--tp", "3"], ["--gpu-mem-gb", "-1"]])
def test_bad_arguments_exit_nonzero(argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "config.json").write_text(json.dumps(tiny_config()))
    if argv[0].startswith("--"):
        argv = [str(tmp_path / "config.json"), *argv]
    one_line_error(capsys, ["inspect", *argv], argv[-1])  # argparse refuses --tp 0 (exit 2), summarize the others


def test_subprocess_broken_checkpoint_has_no_traceback(make_checkpoint) -> None:
    ck = make_checkpoint()
    culprit = _truncated(ck)
    r = subprocess.run([sys.executable, "-m", "specdec", "inspect", str(ck)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0 and "Traceback" not in r.stderr and culprit in r.stderr
    assert r.stderr.count("\n") == 1, r.stderr


def test_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["inspect", "--help"])
    assert e.value.code == 0 and "(10% reserved)" in capsys.readouterr().out
