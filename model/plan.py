"""What each rank holds under tensor/expert parallelism, read off the model built on the meta device.

The loader fills that same model, so `specdec inspect` (memory per rank) and a real load cannot disagree about
which slice of which checkpoint tensor a rank holds: attention heads, dense/shared-expert MLP widths and the
vocabulary are split; routed experts are spread whole over ranks; latent projections, norms and routers are
replicated. The MTP layers' copies of embed_tokens / shared_head.head are not held (the runtime shares the main
model's), so they do not count.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from .checkpoint import ST_DTYPES, checkpoint_manifest
from .config import ModelConfig
from .parallel import DistInfo
from .transformer import DeepseekV3


@lru_cache(maxsize=16)
def rank_shapes(cfg: ModelConfig, tp: int, rank: int = 0) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor name -> the shape of this rank's part of it, for every tensor the rank holds. Raises
    ValueError (naming the tensor or dimension) for a split the runtime refuses: uneven, or cutting FP8 blocks."""
    if not (isinstance(tp, int) and tp >= 1):
        raise ValueError(f"tensor_parallel_size must be a positive integer, got {tp!r}")
    with torch.device("meta"):
        model = DeepseekV3(cfg, keep_fp8=cfg.fp8 is not None, dist=DistInfo(rank, tp))
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


WEIGHT_PATHS = {"released": None, "bfloat16": 2, "float32": 4}  # path -> bytes an element (None: as stored)


def weight_bytes_per_rank(cfg: ModelConfig, tp: int = 1, path: str = "released") -> int:
    """Bytes of the checkpoint tensors rank 0 holds, MTP layers included, on a weight path: "released" keeps their
    stored dtypes (FP8 1, BF16 2, F32 4; FP8 block scales included); "bfloat16" and "float32" dequantize every weight
    to 2 or 4 bytes an element (no scales). tp=1 is the whole model. Other ranks hold as much (the split is even),
    or a cut FP8 block's copied scale more."""
    if path not in WEIGHT_PATHS:
        raise ValueError(f"weight path {path!r}: choose one of {', '.join(WEIGHT_PATHS)}")
    manifest, size = checkpoint_manifest(cfg), WEIGHT_PATHS[path]
    return sum(math.prod(shape) * (size or ST_DTYPES[manifest[name].dtype].itemsize)
               for name, shape in rank_shapes(cfg, tp).items() if size is None or not name.endswith("_scale_inv"))
