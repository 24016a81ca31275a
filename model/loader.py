"""Checkpoint loader: safetensors only (never unpickle), lazy, validated against the manifest before reading."""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import torch
from safetensors import safe_open
from tqdm import tqdm

from specdec.kernels.backend import Backend
from specdec.kernels.cpu_ops import dequant_ref
from specdec.kernels.triton_util import cdiv

from .checkpoint import ST_DTYPES, TensorSpec, checkpoint_manifest
from .config import ConfigError, ModelConfig
from .layers import Linear
from .parallel import DistInfo
from .transformer import DeepseekV3


class CheckpointError(ValueError):
    """A checkpoint that is malformed, truncated, incomplete or disagrees with its config."""


@dataclass(frozen=True)
class HeaderEntry:
    file: Path
    spec: TensorSpec


def _read_header(path: Path) -> dict[str, TensorSpec]:
    """Parse a safetensors header and check that the file holds every byte it promises."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated (no safetensors header)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, 100_000_000):
                raise CheckpointError(f"{path}: corrupt safetensors header length {n} (file is {size} bytes)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header")
    out, end = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            spec = TensorSpec(tuple(int(s) for s in info["shape"]), str(info["dtype"]))
            begin, stop = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError, IndexError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name}") from None
        if spec.dtype in ST_DTYPES and stop - begin != math.prod(spec.shape) * ST_DTYPES[spec.dtype].itemsize:
            raise CheckpointError(f"{path}: corrupt header: tensor {name} spans {stop - begin} bytes, "
                                  f"not those of {spec.dtype} {list(spec.shape)}")
        out[name], end = spec, max(end, stop)
    if 8 + n + end > size:
        raise CheckpointError(f"{path}: truncated: header promises {8 + n + end} bytes, file has {size}")
    return out


class Checkpoint:
    """A checkpoint directory (config.json + model.safetensors or a sharded index), read lazily."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a checkpoint directory")
        try:
            self.config = ModelConfig.from_file(self.path / "config.json")
        except ConfigError as e:
            raise CheckpointError(str(e)) from None
        self.raw_config = json.loads((self.path / "config.json").read_text())
        self.entries = self._scan()
        self._files: dict[Path, object] = {}

    def _scan(self) -> dict[str, HeaderEntry]:
        index = self.path / "model.safetensors.index.json"
        single = self.path / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
                assert isinstance(weight_map, dict)
            except (json.JSONDecodeError, KeyError, TypeError, AssertionError):
                raise CheckpointError(f"{index}: malformed index (needs a 'weight_map' object)") from None
            files: dict[str, list[str]] = {}
            for name, fname in weight_map.items():
                if not isinstance(fname, str) or not fname:
                    raise CheckpointError(f"{index.name}: weight_map entry for tensor {name} must be a file name, "
                                          f"got {fname!r}")
                files.setdefault(fname, []).append(name)
        elif single.is_file():
            files = {"model.safetensors": None}  # type: ignore[dict-item]
        else:
            raise CheckpointError(f"{self.path}: no model.safetensors or model.safetensors.index.json")
        entries: dict[str, HeaderEntry] = {}
        for fname, names in files.items():
            # The name must stay in the folder; the file may be a symlink to anywhere (Hugging Face's cache links
            # snapshots/<rev>/*.safetensors to ../../blobs/<hash>): the folder's owner put it there.
            rel = PurePosixPath(fname)
            if rel.is_absolute() or ".." in rel.parts:
                raise CheckpointError(f"{index.name}: entry {fname!r} points outside the checkpoint directory")
            f = self.path / rel
            if not f.is_file():
                which = f" (holds {names[0]})" if names else ""
                raise CheckpointError(f"{index.name}: names missing file {fname}{which}")
            header = _read_header(f)
            for name in names or header:
                if name not in header:
                    raise CheckpointError(f"{f.name}: index says it holds tensor {name}, its header does not")
                entries[name] = HeaderEntry(f, header[name])
        return entries

    def validate(self, manifest: dict[str, TensorSpec] | None = None) -> None:
        """Every manifest tensor present with its shape and dtype, else a CheckpointError naming it."""
        manifest = manifest or checkpoint_manifest(self.config)
        for name, spec in manifest.items():
            e = self.entries.get(name)
            if e is None:
                raise CheckpointError(f"{self.path}: missing tensor {name} (config expects it)")
            if e.spec.shape != spec.shape:
                raise CheckpointError(f"{e.file.name}: tensor {name} has shape {list(e.spec.shape)}, "
                                      f"config expects {list(spec.shape)}")
            if e.spec.dtype != spec.dtype:
                raise CheckpointError(f"{e.file.name}: tensor {name} has dtype {e.spec.dtype}, "
                                      f"expected {spec.dtype}")

    def read(self, name: str, rows: tuple[int, int] | None = None, cols: tuple[int, int] | None = None
             ) -> torch.Tensor:
        """The tensor (or a [rows, cols] slice of it) as stored; reads only those bytes."""
        e = self.entries[name]
        try:
            if e.file not in self._files:
                self._files[e.file] = safe_open(str(e.file), framework="pt", device="cpu")
            sl = self._files[e.file].get_slice(name)
            if rows is None and cols is None:
                t = sl[:]
            else:
                r = slice(*rows) if rows else slice(None)
                t = sl[r, slice(*cols)] if cols else sl[r]
        except Exception as ex:  # safetensors raises its own error types
            raise CheckpointError(f"{e.file.name}: cannot read tensor {name} ({ex})") from None
        if not _all_finite(t):
            raise CheckpointError(f"{e.file.name}: tensor {name} holds NaN or infinite values (corrupt data)")
        return t


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN/inf in a stored tensor (FP8 e4m3fn has no inf; its NaN is every exponent and mantissa bit set)."""
    if t.dtype == torch.float8_e4m3fn:
        return not bool(((t.view(torch.uint8) & 0x7F) == 0x7F).any())
    return not t.is_floating_point() or bool(torch.isfinite(t).all())


def _shard_range(local: int, rank: int) -> tuple[int, int]:
    """Rank `rank`'s [begin, end) of a dimension split in equal shares of `local` (model/plan.py checked the split)."""
    return rank * local, (rank + 1) * local


def _load_linear(ck: Checkpoint, name: str, m: Linear, dist: DistInfo) -> None:
    spec = ck.entries[f"{name}.weight"].spec
    n_full, k_full = spec.shape
    rows = cols = None
    if m.shard_dim == 0 and m.out_features != n_full:
        rows = _shard_range(m.out_features, dist.rank)
    if m.shard_dim == 1 and m.in_features != k_full:
        cols = _shard_range(m.in_features, dist.rank)
    w = ck.read(f"{name}.weight", rows, cols)
    if spec.dtype == "F8_E4M3":
        # the scale blocks covering this share; a share that starts inside a block keeps a copy of its scale
        bn, bk = ck.config.fp8.block_n, ck.config.fp8.block_k
        srows = (rows[0] // bn, cdiv(rows[1], bn)) if rows else None
        scols = (cols[0] // bk, cdiv(cols[1], bk)) if cols else None
        s = ck.read(f"{name}.weight_scale_inv", srows, scols)
        offset = (rows[0] % bn if rows else 0, cols[0] % bk if cols else 0)
        if m.weight_scale_inv is not None:
            m.weight.data.copy_(w)
            m.weight_scale_inv.data.copy_(s)
            return
        w = dequant_ref(w, s, (bn, bk), offset)  # dequantized at load: sliced inside blocks as freely as BF16
    m.weight.data.copy_(w.to(m.weight.dtype))


def load_model(path: str | Path, *, dtype: torch.dtype = torch.bfloat16, device: str | torch.device = "cpu",
               backend: Backend | None = None, keep_fp8: bool = False, dist: DistInfo | None = None,
               mla_mode: str = "auto", progress: bool = True, cpu_layout: bool | None = None) -> DeepseekV3:
    """Build DeepSeek-V3 (+ MTP) for `path` and load this rank's share of its weights.

    FP8 linears stay FP8 when keep_fp8 (the Triton/flashinfer paths, or our C++ kernels on a CPU, which also keep
    BF16 tensors BF16), else they are dequantized at load to dtype.
    cpu_layout: lay the weights out for CPU decoding (DeepseekV3.lay_out_for_cpu); default: on a CPU with the
    torch backend and dense weights.
    Raises CheckpointError (a ValueError) naming the tensor and file for any defect.
    """
    ck = Checkpoint(path)
    ck.validate()
    dist = dist or DistInfo()
    device = torch.device(device)
    keep_fp8 = keep_fp8 and ck.config.fp8 is not None
    with torch.device(device):
        model = DeepseekV3(ck.config, dtype=dtype, backend=backend, keep_fp8=keep_fp8, dist=dist, mla_mode=mla_mode)
    todo = []
    for mname, mod in model.named_modules(remove_duplicate=True):
        for pname, p in mod.named_parameters(recurse=False):
            if pname != "weight_scale_inv":
                todo.append((mname, mod, pname, p))
    for mname, mod, pname, p in tqdm(todo, desc=f"loading {ck.path.name}", unit="tensor", disable=not progress,
                                     leave=False):
        if isinstance(mod, Linear):
            _load_linear(ck, mname, mod, dist)
            continue
        name = f"{mname}.{pname}"
        shard = getattr(p, "shard_dim", None)
        full = ck.entries[name].spec.shape
        rows = _shard_range(p.shape[0], dist.rank) if shard == 0 and p.shape[0] != full[0] else None
        p.data.copy_(ck.read(name, rows).to(p.dtype))
    model.finalize()
    if cpu_layout is None:  # weights kept as released stay as stored; the rest is laid out for small-M GEMMs
        cpu_layout = device.type == "cpu" and (backend is None or backend.name == "torch")
    if cpu_layout:
        model.lay_out_for_cpu()
    return model.eval()

