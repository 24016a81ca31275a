"""EngineConfig: everything an LLM is built from, as one frozen value.

`LLM(...)` validates its keyword arguments into an EngineConfig once. Under tensor parallelism rank 0's config is the
group's: the workers rank 0 spawns are built from it (`LLM.from_config`, a picklable factory that repeats no
keyword list), and under torchrun each rank's own config is checked against rank 0's at start (`differences`), so a
launch line that differs between nodes is an error naming the field, not a group that drifts apart.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from .params import SpecConfig, check_seed, check_spec_config

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
BUNDLED_MODEL = Path(__file__).parent / "bundled"


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The torch device asked for (default: cuda when available, else cpu); ValueError for one this machine lacks."""
    try:
        dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available()
                                                                           else "cpu")
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"device={device!r} is not a torch device ({e})") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={str(dev)!r}: this machine has no CUDA device (torch {torch.__version__}"
                             f"{' is a CPU build' if torch.version.cuda is None else ''})")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device={str(dev)!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise ValueError(f"device={str(dev)!r}: specdec runs on cpu or cuda")
    return dev


@dataclass(frozen=True)
class EngineConfig:
    """model: the checkpoint directory (None: the bundled model); dtype: a torch dtype or its name; device: "cpu",
    "cuda" or "cuda:N" (None: cuda when available; under tensor parallelism each rank takes its local GPU);
    threads: CPU intra-op threads (None: the default for the model's size); kv_cache_tokens: the KV pool (None:
    sized from free memory, the smallest over the ranks); warmup: None = on CUDA with Triton; enforce_eager: no CUDA
    graphs (a CPU never captures any). The rest are LLM's keyword arguments of the same names. Normalized at
    construction: model becomes a Path, device a string."""

    model: str | os.PathLike | None = None
    dtype: str | torch.dtype = "bfloat16"
    device: str | torch.device | None = None
    speculative: SpecConfig | None = SpecConfig()
    backend: str = "auto"
    tensor_parallel_size: int = 1
    mla_mode: str = "auto"
    seed: int = 0
    threads: int | None = None
    kv_cache_tokens: int | None = None
    max_num_seqs: int = 64
    prefill_chunk: int = 512
    enable_prefix_caching: bool = True
    warmup: bool | None = None
    dequantize_fp8: bool = False
    enforce_eager: bool = False

    def __post_init__(self) -> None:
        if self.model is not None and not isinstance(self.model, (str, os.PathLike)):
            raise ValueError(f"model must be a checkpoint directory (a str or Path) or None, got "
                             f"{type(self.model).__name__}")
        object.__setattr__(self, "model", Path(self.model) if self.model is not None else BUNDLED_MODEL)
        resolve_dtype(self.dtype)
        object.__setattr__(self, "device", str(resolve_device(self.device)))
        check_seed(self.seed, "seed")
        check_spec_config(self.speculative, "speculative")
        for name in ("tensor_parallel_size", "max_num_seqs", "prefill_chunk"):
            _positive(name, getattr(self, name))
        for name in ("threads", "kv_cache_tokens"):
            if getattr(self, name) is not None:
                _positive(name, getattr(self, name))
        for name in ("enable_prefix_caching", "dequantize_fp8", "enforce_eager"):
            if type(getattr(self, name)) is not bool:
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")
        if self.warmup is not None and type(self.warmup) is not bool:
            raise ValueError(f"warmup must be True, False or None, got {self.warmup!r}")

    def differences(self, other: EngineConfig) -> list[str]:
        """The fields in which `other` differs from this config, as "field=mine vs theirs" (a device's GPU index
        not counted: every rank takes its own)."""
        out = []
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            if f.name == "device":
                a, b = torch.device(a).type, torch.device(b).type
            if a != b:
                out.append(f"{f.name}={a!r} vs {b!r}")
        return out


def _positive(name: str, v: Any) -> None:
    if not (type(v) is int and v >= 1):
        raise ValueError(f"{name} must be a positive integer, got {v!r}")
