"""`specdec inspect PATH`: what a checkpoint holds and what it costs to serve, from its config and safetensors
headers alone (no tensor data is read).

Reports parameters (main model, MTP layers, activated per token); the weights' resident bytes on each path (as
released: FP8 blocks with their float32 scales and BF16 tensors as stored; every weight in BF16; in float32), for
the whole model and, at --tp N, per rank; latent-cache bytes per token and, with --gpu-mem-gb, how many tokens of
latent cache (over all sequences) fit beside one rank's weights as released.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

from ..model.checkpoint import ST_DTYPES, TensorSpec, checkpoint_manifest, is_shared_copy
from ..model.config import ModelConfig
from ..model.loader import Checkpoint
from ..model.plan import WEIGHT_PATHS, weight_bytes_per_rank
from . import common

KV_DTYPE_BYTES = 2  # the latent cache is BF16
RESERVE = 0.10  # share of --gpu-mem-gb kept free for activations, workspace and the CUDA context
GIB = 2**30


def _layer(name: str) -> int | None:
    parts = name.split(".")
    return int(parts[2]) if name.startswith("model.layers.") else None


def param_counts(cfg: ModelConfig, manifest: dict[str, TensorSpec]) -> dict[str, int]:
    """Parameter counts (weights only; FP8 block scales are not parameters).

    main: the main model, embedding and lm_head included. mtp: every tensor of the MTP layers as stored, including
    their copies of embed_tokens / lm_head, which `mtp_shared_copies` counts on its own. activated_per_token: the
    main model with only num_experts_per_tok of its n_routed_experts routed experts per MoE layer."""
    main = mtp = copies = routed = 0
    for name, spec in manifest.items():
        if name.endswith("_scale_inv"):
            continue
        n = math.prod(spec.shape)
        layer = _layer(name)
        if layer is not None and layer >= cfg.num_hidden_layers:
            mtp += n
            copies += n if is_shared_copy(cfg, name) else 0
        else:
            main += n
            routed += n if ".mlp.experts." in name else 0
    activated = main - routed
    if cfg.n_routed_experts:
        activated += routed // cfg.n_routed_experts * cfg.num_experts_per_tok
    return {"main": main, "mtp": mtp, "mtp_shared_copies": copies, "activated_per_token": activated}


def kv_bytes_per_token(cfg: ModelConfig) -> dict[str, int]:
    """Latent-cache bytes per token: (kv_lora_rank + qk_rope_head_dim) BF16 values per layer, on every rank."""
    row = cfg.kv_cache_dim * KV_DTYPE_BYTES
    main, mtp = cfg.num_hidden_layers * row, cfg.num_nextn_predict_layers * row
    return {"main": main, "mtp": mtp, "total": main + mtp}


def kv_capacity_tokens(gpu_mem_gib: float, weight_bytes: int, kv_per_token: int) -> int:
    """Tokens of latent cache (over all sequences) that fit in (1 - RESERVE) * gpu_mem_gib GiB after one rank's
    weights (0 if none)."""
    free = int(gpu_mem_gib * GIB * (1 - RESERVE)) - weight_bytes
    return max(free, 0) // kv_per_token


def summarize(path: Path, tp: int = 1, gpu_mem_gib: float | None = None) -> dict[str, Any]:
    """Everything `inspect` reports, as one JSON-able dict; `tensors` lists every tensor of the checkpoint layout;
    `resident_bytes[path]` is {"model": bytes, "per_rank": rank 0's bytes at tp} for each of model/plan.py's
    WEIGHT_PATHS (what the loader holds of the checkpoint's tensors; copies a runtime path derives at load, such as
    the CPU's absorbed MLA weights, are what `bench latency` counts on a loaded model).

    path: a checkpoint directory (config and safetensors headers are validated: names, shapes, dtypes, file
    lengths; no tensor data is read) or a bare config.json. Raises ValueError (CheckpointError, ConfigError) with
    a one-line message for a broken checkpoint or an impossible --tp."""
    if tp < 1:
        raise ValueError(f"--tp {tp}: must be a positive integer")
    if gpu_mem_gib is not None and not (math.isfinite(gpu_mem_gib) and gpu_mem_gib > 0):
        raise ValueError(f"--gpu-mem-gb {gpu_mem_gib}: must be a positive, finite number of GiB")
    if path.is_dir():
        ck = Checkpoint(path)
        ck.validate()
        cfg, source = ck.config, "checkpoint"
    elif path.is_file():
        cfg, source = ModelConfig.from_file(path), "config"
    else:
        raise ValueError(f"{path}: no such checkpoint directory or config.json")
    manifest = checkpoint_manifest(cfg)
    try:
        resident = {path: {"model": weight_bytes_per_rank(cfg, 1, path),
                           "per_rank": weight_bytes_per_rank(cfg, tp, path)} for path in WEIGHT_PATHS}
    except ValueError as e:
        raise ValueError(f"--tp {tp}: {e}") from None
    weights = resident["released"]["per_rank"]
    kv = kv_bytes_per_token(cfg)
    return {
        "path": str(path),
        "source": source,
        "headers_validated": source == "checkpoint",
        "tensor_count": len(manifest),
        "element_count": sum(math.prod(s.shape) for s in manifest.values()),
        "checkpoint_bytes": sum(math.prod(s.shape) * ST_DTYPES[s.dtype].itemsize for s in manifest.values()),
        "params": param_counts(cfg, manifest),
        "tp": tp,
        "weight_bytes_per_rank": weights,
        "resident_bytes": resident,
        "fp8": cfg.fp8 is not None,
        "kv_cache_bytes_per_token": kv,
        "gpu_mem_gib": gpu_mem_gib,
        "reserve_fraction": RESERVE,
        "kv_cache_capacity_tokens": (None if gpu_mem_gib is None
                                     else kv_capacity_tokens(gpu_mem_gib, weights, kv["total"])),
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "n_routed_experts": cfg.n_routed_experts,
        "tensors": {n: {"shape": list(s.shape), "dtype": s.dtype} for n, s in manifest.items()},
    }


def _si(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _weight_rows(s: dict[str, Any]) -> list[tuple[str, str, str, str]]:
    """Resident weight bytes per path: the whole model's, then (at --tp > 1) one rank's."""
    rows = []
    for path, r in s["resident_bytes"].items():
        name = {"released": "as released", "bfloat16": "in BF16"}.get(path, f"in {path}")
        note = ("every weight dequantized" if path != "released" else
                "FP8 blocks + float32 scales, BF16 embedding/head/norms" if s["fp8"] else "stored dtypes")
        if not rows:
            note += "; MTP layers included, their embed/head copies not held"
        rows.append((f"weights {name}", f"{r['model']:,} B", f"{r['model'] / GIB:,.2f} GiB", note))
        if s["tp"] > 1:
            rows.append((f"weights {name}, per rank tp={s['tp']}", f"{r['per_rank']:,} B",
                         f"{r['per_rank'] / GIB:,.2f} GiB", "" if len(rows) > 2 else
                         "heads, MLP widths and vocabulary split, routed experts spread, the rest on every rank"))
    return rows


def format_summary(s: dict[str, Any]) -> str:
    """The summary as an aligned table for humans."""
    p, kv = s["params"], s["kv_cache_bytes_per_token"]
    what = ("checkpoint, names/shapes/dtypes/file lengths checked from headers" if s["headers_validated"]
            else "config only, no checkpoint checked")
    rows = [
        ("parameters, main model", f"{p['main']:,}", _si(p["main"]), ""),
        ("parameters, MTP layers", f"{p['mtp']:,}", _si(p["mtp"]),
         f"incl. {_si(p['mtp_shared_copies'])} embed/head copies shared with the main model"),
        ("activated per token", f"{p['activated_per_token']:,}", _si(p["activated_per_token"]),
         f"main model, {s['num_experts_per_tok']} of {s['n_routed_experts']} routed experts per MoE layer"),
        *_weight_rows(s),
        ("KV cache per token", f"{kv['total']:,} B", f"{kv['total'] / 2**10:.1f} KiB",
         f"main {kv['main']:,} + MTP {kv['mtp']:,}; BF16 latent, same on every rank"),
    ]
    cap = s["kv_cache_capacity_tokens"]
    if cap is not None:
        note = (f"tokens of latent cache over all sequences; {s['reserve_fraction']:.0%} of {s['gpu_mem_gib']:g} GiB "
                "reserved for activations")
        if cap == 0:
            note = "weights do not fit: " + note
        rows.append((f"KV cache capacity, {s['gpu_mem_gib']:g} GiB/rank", f"{cap:,} tok", _si(cap), note))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{s['path']}: {s['tensor_count']:,} tensors, {s['checkpoint_bytes'] / GIB:.2f} GiB stored ({what})"]
    for r in rows:
        lines.append(f"  {r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:>{widths[2]}}  {r[3]}".rstrip())
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    s = summarize(Path(args.path), args.tp, args.gpu_mem_gb)
    if args.json:
        print(json.dumps(s))
    else:
        print(format_summary(s))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="check a checkpoint from its headers and report its size and memory needs",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="checkpoint directory, or a bare config.json")
    p.add_argument("--tp", type=common.positive_int, default=1, help="tensor/expert parallel ranks (default 1)")
    p.add_argument("--gpu-mem-gb", type=float, default=None, metavar="G",
                   help=f"GPU memory per rank in GiB: report the KV cache capacity in tokens ({RESERVE * 100:.0f}%% "
                        "reserved)")
    p.add_argument("--json", action="store_true", help="one JSON object, every tensor's shape and dtype included")
    p.set_defaults(func=run)
