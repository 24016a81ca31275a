"""`specdec inspect PATH`: what a checkpoint holds and what it costs to serve, from its config and safetensors
headers alone (no tensor data is read).

Reports parameters (main model, MTP layers, activated per token), weight bytes per rank at --tp N, latent-cache
bytes per token and, with --gpu-mem-gb, how many tokens of context fit beside one rank's weights.
"""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import Any

from .model.checkpoint import TensorSpec, checkpoint_manifest, is_shared_copy
from .model.config import ModelConfig
from .model.loader import Checkpoint

DTYPE_BYTES = {"F8_E4M3": 1, "BF16": 2, "F16": 2, "F32": 4}
KV_DTYPE_BYTES = 2  # the latent cache is BF16
RESERVE = 0.10  # share of --gpu-mem-gb kept free for activations, workspace and the CUDA context
GIB = 2**30

# Tensor parallelism as the runtime does it (model/mla.py, model/moe.py, model/layers.py): heads, the dense and
# shared-expert MLPs and the vocabulary are split; routed experts are spread whole over ranks (expert parallel);
# latent projections, norms and the router are replicated.
_SPLIT_ROWS = re.compile(r"\.(q_proj|q_b_proj|kv_b_proj|mlp\.gate_proj|mlp\.up_proj|shared_experts\.gate_proj|"
                         r"shared_experts\.up_proj)\.|^model\.embed_tokens\.|^lm_head\.")
_SPLIT_COLS = re.compile(r"\.(o_proj|mlp\.down_proj|shared_experts\.down_proj)\.")
_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.")


def _layer(name: str) -> int | None:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


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
            routed += n if _EXPERT.search(name) else 0
    activated = main - routed
    if cfg.n_routed_experts:
        activated += routed // cfg.n_routed_experts * cfg.num_experts_per_tok
    return {"main": main, "mtp": mtp, "mtp_shared_copies": copies, "activated_per_token": activated}


def _local_shape(cfg: ModelConfig, manifest: dict[str, TensorSpec], name: str, tp: int) -> tuple[int, ...] | None:
    """Rank 0's part of a tensor at tensor/expert parallelism tp (None: that rank holds none of it; every rank holds
    as much when tp divides evenly, which is required).

    Raises ValueError where the runtime would refuse tp: an uneven split, or one that cuts FP8 blocks."""
    if name.endswith("_scale_inv"):  # one scale per block of this rank's part of the weight
        w = _local_shape(cfg, manifest, name.removesuffix("_scale_inv"), tp)
        return None if w is None else (-(-w[0] // cfg.fp8.block_n), -(-w[1] // cfg.fp8.block_k))
    spec = manifest[name]
    expert = _EXPERT.search(name)
    if expert:
        if cfg.n_routed_experts % tp:
            raise ValueError(f"--tp {tp}: {cfg.n_routed_experts} routed experts do not split evenly over {tp} ranks")
        return spec.shape if int(expert.group(1)) < cfg.n_routed_experts // tp else None
    dim = 0 if _SPLIT_ROWS.search(name) else 1 if _SPLIT_COLS.search(name) else None
    if dim is None or tp == 1:
        return spec.shape
    if ".self_attn." in name and cfg.num_attention_heads % tp:
        raise ValueError(f"--tp {tp}: {cfg.num_attention_heads} attention heads do not split evenly over {tp} ranks")
    shape = list(spec.shape)
    if shape[dim] % tp:
        raise ValueError(f"--tp {tp}: {name} ({shape[dim]} along dim {dim}) does not split evenly over {tp} ranks")
    shape[dim] //= tp
    block = (cfg.fp8.block_n, cfg.fp8.block_k)[dim] if spec.dtype == "F8_E4M3" else 1
    if shape[dim] % block:
        raise ValueError(f"--tp {tp}: splitting {name} into parts of {shape[dim]} cuts its FP8 {block}-blocks")
    return tuple(shape)


def weight_bytes_per_rank(cfg: ModelConfig, manifest: dict[str, TensorSpec], tp: int = 1) -> int:
    """Bytes of checkpoint tensors one rank holds at tensor/expert parallelism tp, in their stored dtypes (FP8 1,
    BF16 2, F32 4; FP8 scales included), MTP layers included, their embed/head copies counted once (shared)."""
    total = 0
    for name, spec in manifest.items():
        if is_shared_copy(cfg, name):
            continue
        shape = _local_shape(cfg, manifest, name, tp)
        if shape is not None:
            total += math.prod(shape) * DTYPE_BYTES[spec.dtype]
    return total


def kv_bytes_per_token(cfg: ModelConfig) -> dict[str, int]:
    """Latent-cache bytes per token: (kv_lora_rank + qk_rope_head_dim) BF16 values per layer, on every rank."""
    row = cfg.kv_cache_dim * KV_DTYPE_BYTES
    main, mtp = cfg.num_hidden_layers * row, cfg.num_nextn_predict_layers * row
    return {"main": main, "mtp": mtp, "total": main + mtp}


def context_tokens(gpu_mem_gib: float, weight_bytes: int, kv_per_token: int) -> int:
    """Tokens of latent cache that fit in (1 - RESERVE) * gpu_mem_gib GiB after one rank's weights (0 if none)."""
    free = int(gpu_mem_gib * GIB * (1 - RESERVE)) - weight_bytes
    return max(free, 0) // kv_per_token


def summarize(path: Path, tp: int = 1, gpu_mem_gib: float | None = None) -> dict[str, Any]:
    """Everything `inspect` reports, as one JSON-able dict; `tensors` lists every tensor of the checkpoint layout.

    path: a checkpoint directory (config and safetensors headers are validated: names, shapes, dtypes, file
    lengths; no tensor data is read) or a bare config.json. Raises ValueError (CheckpointError, ConfigError) with
    a one-line message for a broken checkpoint or an impossible --tp."""
    if tp < 1:
        raise ValueError(f"--tp {tp}: must be a positive integer")
    if gpu_mem_gib is not None and not gpu_mem_gib > 0:
        raise ValueError(f"--gpu-mem-gb {gpu_mem_gib}: must be positive")
    if path.is_dir():
        ck = Checkpoint(path)
        ck.validate()
        cfg, source = ck.config, "checkpoint"
    elif path.is_file():
        cfg, source = ModelConfig.from_file(path), "config"
    else:
        raise ValueError(f"{path}: no such checkpoint directory or config.json")
    manifest = checkpoint_manifest(cfg)
    weights = weight_bytes_per_rank(cfg, manifest, tp)
    kv = kv_bytes_per_token(cfg)
    return {
        "path": str(path),
        "source": source,
        "headers_validated": source == "checkpoint",
        "tensor_count": len(manifest),
        "element_count": sum(math.prod(s.shape) for s in manifest.values()),
        "checkpoint_bytes": sum(math.prod(s.shape) * DTYPE_BYTES[s.dtype] for s in manifest.values()),
        "params": param_counts(cfg, manifest),
        "tp": tp,
        "weight_bytes_per_rank": weights,
        "kv_cache_bytes_per_token": kv,
        "gpu_mem_gib": gpu_mem_gib,
        "reserve_fraction": RESERVE,
        "max_context_tokens": None if gpu_mem_gib is None else context_tokens(gpu_mem_gib, weights, kv["total"]),
        "num_experts_per_tok": cfg.num_experts_per_tok,
        "n_routed_experts": cfg.n_routed_experts,
        "tensors": {n: {"shape": list(s.shape), "dtype": s.dtype} for n, s in manifest.items()},
    }


def _si(n: float) -> str:
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def format_table(s: dict[str, Any]) -> str:
    """The summary as an aligned table for humans."""
    p, kv, tp, w = s["params"], s["kv_cache_bytes_per_token"], s["tp"], s["weight_bytes_per_rank"]
    what = ("checkpoint, names/shapes/dtypes/file lengths checked from headers" if s["headers_validated"]
            else "config only, no checkpoint checked")
    rows = [
        ("parameters, main model", f"{p['main']:,}", _si(p["main"]), ""),
        ("parameters, MTP layers", f"{p['mtp']:,}", _si(p["mtp"]),
         f"incl. {_si(p['mtp_shared_copies'])} embed/head copies shared with the main model"),
        ("activated per token", f"{p['activated_per_token']:,}", _si(p["activated_per_token"]),
         f"main model, {s['num_experts_per_tok']} of {s['n_routed_experts']} routed experts per MoE layer"),
        (f"weights per rank, tp={tp}", f"{w:,} B", f"{w / GIB:.2f} GiB",
         "stored dtypes, MTP included, experts spread over ranks"),
        ("KV cache per token", f"{kv['total']:,} B", f"{kv['total'] / 2**10:.1f} KiB",
         f"main {kv['main']:,} + MTP {kv['mtp']:,}; BF16 latent, same on every rank"),
    ]
    if s["max_context_tokens"] is not None:
        note = f"{s['reserve_fraction']:.0%} of {s['gpu_mem_gib']:g} GiB reserved for activations"
        if s["max_context_tokens"] == 0:
            note = "weights do not fit: " + note
        rows.append((f"context in {s['gpu_mem_gib']:g} GiB/rank", f"{s['max_context_tokens']:,} tok",
                     _si(s["max_context_tokens"]), note))
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
        print(format_table(s))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("inspect", help="check a checkpoint from its headers and report its size and memory needs",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("path", help="checkpoint directory, or a bare config.json")
    p.add_argument("--tp", type=int, default=1, help="tensor/expert parallel ranks (default 1)")
    p.add_argument("--gpu-mem-gb", type=float, default=None, metavar="G",
                   help=f"GPU memory per rank in GiB: report the context that fits ({RESERVE * 100:.0f}%% reserved)")
    p.add_argument("--json", action="store_true", help="one JSON object, every tensor's shape and dtype included")
    p.set_defaults(func=run)
