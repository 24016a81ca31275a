"""Shared Triton plumbing: kernels bound to Triton at their first launch, one autotune config under the interpreter.

Why lazily: Triton fixes interpreter-or-GPU when `triton.language` is imported (its own library functions such as
`tl.max` are `@jit`-decorated then) and again when each kernel is decorated. The kernel modules are imported by
`import specdec` (the model uses the references that sit beside the kernels), often before a test or a CPU run has
set TRITON_INTERPRET=1. So no module here imports triton at import time: a kernel module names `tl` (a placeholder)
and decorates its kernels with `lazy_jit`; the first launch imports triton, binds the module's `tl` to
`triton.language` and applies `triton.jit` / `triton.autotune`. Only the environment at the first launch matters,
and `import specdec` never imports triton.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2(n: int, lo: int = 1) -> int:
    """The smallest power of two >= max(n, lo)."""
    return max(lo, 1 << max(n - 1, 0).bit_length())


def upcast(dtype: torch.dtype) -> bool:
    """Whether a kernel should convert 16-bit operands to float32 before any arithmetic: under the interpreter bf16
    arithmetic is wrong (triton issue #11584); fp8 operands may go into tl.dot as they are."""
    return interpreting() and dtype in (torch.bfloat16, torch.float16)


class _Unbound:
    """Stands for triton.language in a kernel module until its first kernel launch binds the real module."""

    def __getattr__(self, name: str) -> Any:
        raise RuntimeError(f"tl.{name}: triton.language is bound at the first kernel launch (see triton_util)")


tl: Any = _Unbound()


def _triton() -> Any:
    """Import triton; fail clearly when it was imported before TRITON_INTERPRET=1 (its library is then GPU-only)."""
    import triton
    import triton.language

    if interpreting() and isinstance(triton.language.standard.max, triton.runtime.JITFunction):
        raise RuntimeError("TRITON_INTERPRET=1 was set after triton was imported in this process; set it before "
                           "anything imports triton (specdec itself imports it only at the first kernel launch)")
    return triton


class LazyKernel:
    """A kernel that becomes `triton.jit(fn)` (autotuned over `configs()` when given) at its first launch."""

    def __init__(self, fn: Callable[..., None], configs: Callable[[], list[Any]] | None, key: Sequence[str]):
        self.fn, self.configs, self.key = fn, configs, list(key)
        self._kernel: Any = None

    @property
    def kernel(self) -> Any:
        if self._kernel is None:
            triton = _triton()
            self.fn.__globals__["tl"] = triton.language
            k = triton.jit(self.fn)
            if self.configs is not None:
                cfgs = self.configs()
                # autotuning benchmarks on a GPU; the interpreter can only run one config
                k = triton.autotune(cfgs[:1] if interpreting() else cfgs, key=self.key)(k)
            self._kernel = k
        return self._kernel

    def __getitem__(self, grid: Any) -> Any:
        return self.kernel[grid]


def lazy_jit(fn: Callable[..., None] | None = None, *, configs: Callable[[], list[Any]] | None = None,
             key: Sequence[str] = ()) -> Any:
    """Decorator: `@lazy_jit` or `@lazy_jit(configs=..., key=[...])`, where configs() returns triton.Config objects
    (the first is the interpreter's). A kernel must not call other kernels: keep each one self-contained."""
    if fn is not None:
        return LazyKernel(fn, None, ())
    return lambda f: LazyKernel(f, configs, key)


def config(num_warps: int = 4, num_stages: int = 3, **meta: int) -> Any:
    """A triton.Config, for configs() functions (imports triton, so call it only at launch time)."""
    return _triton().Config(meta, num_warps=num_warps, num_stages=num_stages)


def check_device(*tensors: torch.Tensor) -> None:
    """Triton runs CUDA tensors, or CPU tensors under the interpreter; anything else is a clear error."""
    for t in tensors:
        if t.device.type != "cuda" and not interpreting():
            raise ValueError(f"Triton kernels need CUDA tensors (got {t.device}); on CPU set TRITON_INTERPRET=1")
