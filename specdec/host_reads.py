"""A guard for regions that must never read the device from the host: what a CUDA graph captures, or a compiled
step at fixed shapes. It raises on a CPU too, where every tensor already is on the host, for the calls that would
read the device on a GPU, so a CPU test proves a step capturable.

What it refuses (the table `FORBIDDEN` and the rules of `_refusal`, nowhere else):
  - a tensor's value as a Python value: `.item()`, `int()`, `float()`, `bool()` / `if tensor:`
    (`aten._local_scalar_dense`), `torch.equal`, `torch.allclose`, `.tolist()`, `.numpy()` (these two read CPU
    memory without dispatching an op: a TorchFunctionMode catches them);
  - outputs whose shape depends on the data: the ops torch tags `dynamic_output_shape` (what FakeTensor refuses
    to trace: `nonzero`, `masked_select`, `unique`, `bincount`, ...), one-argument `torch.where`, boolean-mask
    indexing and mask assignment (`x[mask]`, `x[mask] = v` run `nonzero`), `repeat_interleave` with tensor
    repeats and no `output_size`, `one_hot` (it reads the ids on the host); integer indexing (a gather) and
    `repeat_interleave` with int repeats or `output_size` are fixed-shape and allowed;
  - ops whose CUDA kernel reads a device value on the host first: `masked_fill` with a tensor fill value
    (`value.item()`), `multinomial` (gpt-fast and vLLM sample with exponential noise and an argmax instead);
  - copies to the CPU from another device (`.cpu()`, `.to("cpu")`, `cpu_tensor.copy_(device_tensor)`).
Everything else runs, `nonzero_static`, gathers, scatters, topk and sorts included. Not seen: host reads inside a
custom op's own kernel, and `torch.cuda.synchronize()` (no tensor op).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

T = TypeVar("T")

SCALAR = "reads a tensor's value as a Python value"
SHAPE = "has an output shape that depends on the data"
FORBIDDEN: dict[str, str] = {
    "aten._local_scalar_dense": SCALAR + " (.item(), int(), float(), bool())",
    "aten.item": SCALAR + " (.item(), int(), float())",
    "aten.is_nonzero": SCALAR + " (bool(tensor), `if tensor:`)",
    "aten.equal": SCALAR + " (torch.equal returns a Python bool)",
    "aten.allclose": SCALAR + " (torch.allclose returns a Python bool)",
    "aten.where.default": SHAPE + " (one-argument torch.where is nonzero)",
    "aten.nonzero_numpy": SHAPE + " (nonzero)",
    "aten.argwhere": SHAPE + " (nonzero)",
    "aten.one_hot": "reads the ids on the host (num_classes=-1 takes their max; a CPU checks their range with "
                    ".item()): compare with torch.arange instead",
    "aten.masked_fill.Tensor": "reads its tensor fill value on the host on CUDA (value.item()): pass a number",
    "aten.masked_fill_.Tensor": "reads its tensor fill value on the host on CUDA (value.item()): pass a number",
    "aten.multinomial": "synchronizes with the host on CUDA: sample by exponential noise and argmax",
}
# read CPU memory without dispatching an op, so only a TorchFunctionMode sees them
HOST_METHODS = {torch.Tensor.tolist: ".tolist()", torch.Tensor.numpy: ".numpy()",
                torch.Tensor.__array__: ".__array__() (numpy.asarray)"}
COPIES = frozenset({"aten._to_copy", "aten.to", "aten.copy_", "aten.copy", "aten._copy_from",
                    "aten._copy_from_and_resize"})
MASK_DTYPES = (torch.bool, torch.uint8)
HERE = str(Path(__file__).resolve())
TORCH_DIR = str(Path(torch.__file__).parent)


class HostReadError(RuntimeError):
    """A forbidden host read inside a no_host_reads region; the message names the op and the calling line."""


def _copy_to_host(packet: str, args: tuple, kwargs: dict) -> str | None:
    """The source device of a copy op that lands on the CPU from elsewhere, else None."""
    if packet in ("aten.copy_", "aten.copy"):  # (dst, src)
        src, dst = args[1], args[0].device
    elif packet in ("aten._copy_from", "aten._copy_from_and_resize"):  # (src, dst)
        src, dst = args[0], args[1].device
    else:  # to / _to_copy: a device argument, or the device of `other` (to.other)
        src, dst = args[0], None
        for a in (kwargs.get("device"), *args[1:]):
            if isinstance(a, (torch.device, str, torch.Tensor)):
                dst = a.device if isinstance(a, torch.Tensor) else torch.device(a)
                break
    return src.device.type if src.device.type != "cpu" and dst is not None and dst.type == "cpu" else None


def _refusal(func: Any, args: tuple, kwargs: dict) -> str | None:
    """Why `func` may not run in a captured region, or None if it may."""
    packet = str(func.overloadpacket)
    why = FORBIDDEN.get(str(func)) or FORBIDDEN.get(packet)
    if why:
        return why
    if packet in COPIES:
        src = _copy_to_host(packet, args, kwargs)
        return f"copies a {src} tensor to the host" if src else None
    if packet in ("aten.index", "aten.index_put", "aten.index_put_", "aten._index_put_impl_"):
        masks = [i for i in args[1] if isinstance(i, torch.Tensor) and i.dtype in MASK_DTYPES]
        return SHAPE + " (boolean-mask indexing runs nonzero: use torch.where)" if masks else None
    if packet == "aten.repeat_interleave":  # int repeats, or output_size given: the shape is known
        fixed = func._overloadname == "self_int" or kwargs.get("output_size") is not None
        return None if fixed else SHAPE + " (repeat_interleave with tensor repeats needs output_size)"
    if torch.Tag.dynamic_output_shape in func.tags:
        return SHAPE
    if torch.Tag.data_dependent_output in func.tags:
        return SCALAR
    return None


def _caller() -> str | None:
    """file:line of the innermost frame outside torch and this module (where the read was written), if any."""
    for frame in reversed(traceback.extract_stack()):
        if frame.filename != HERE and not frame.filename.startswith((TORCH_DIR, "<")):
            return f"{frame.filename}:{frame.lineno}"
    return None


def _raise(op: str, why: str) -> None:
    where = _caller()
    raise HostReadError(f"{op} {why}, inside a no-host-reads region" + (f" (at {where})" if where else ""))


class _Dispatch(TorchDispatchMode):
    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        why = _refusal(func, args, kwargs)
        if why:
            _raise(str(func.overloadpacket), why)
        return func(*args, **kwargs)


class _Methods(TorchFunctionMode):
    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        if func in HOST_METHODS:
            _raise(f"Tensor{HOST_METHODS[func]}", SCALAR)
        return func(*args, **(kwargs or {}))


@contextmanager
def no_host_reads() -> Iterator[None]:
    """Inside, any host read of device data (see the module docstring) raises HostReadError naming the op and the
    line that called it; nothing else changes."""
    with _Methods(), _Dispatch():
        yield


def check_no_host_reads(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """fn(*args, **kwargs) under no_host_reads(): its result, or HostReadError at the first host read."""
    with no_host_reads():
        return fn(*args, **kwargs)
