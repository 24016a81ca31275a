"""Shared Triton plumbing: kernels bound to Triton at their first launch, one autotune config under the interpreter.

Why lazily: Triton fixes interpreter-or-GPU when `triton.language` is imported (its own library functions such as
`tl.max` are `@jit`-decorated then) and again when each kernel is decorated. The kernel modules are imported by
`import specdec` (the model uses the references that sit beside the kernels), often before a test or a CPU run has
set TRITON_INTERPRET=1. So no module here imports triton at import time: a kernel module names `tl` (a placeholder)
and decorates its kernels with `lazy_jit`; the first launch imports triton, binds the module's `tl` to
`triton.language` and applies `triton.jit` / `triton.autotune`. Only the environment at the first launch matters,
and `import specdec` never imports triton.

Every launch runs under `torch.cuda.device(<its first tensor's device>)`: Triton launches on the current CUDA device,
not on the tensors' one. `compile_only` (used by kernels/aot.py) turns launches into ahead-of-time compiles.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
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


# kernels/aot.py's hook: (kernel, args, kwargs) -> None, called instead of a launch; and its target's SM count
_compile_hook: Callable[[LazyKernel, tuple, dict], None] | None = None
_compile_sms = 0


@contextmanager
def compile_only(hook: Callable[[LazyKernel, tuple, dict], None], sms: int) -> Iterator[None]:
    """Inside the block no kernel runs: each launch calls hook(kernel, args, kwargs) instead, launchers accept
    tensors on the meta device (shapes and strides without memory), and sm_count() answers `sms`."""
    global _compile_hook, _compile_sms
    saved = _compile_hook, _compile_sms
    _compile_hook, _compile_sms = hook, sms
    try:
        yield
    finally:
        _compile_hook, _compile_sms = saved


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; the compile target's under compile_only; 1 elsewhere."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _compile_sms if device.type == "meta" and _compile_hook is not None else 1


class LazyKernel:
    """A kernel that becomes `triton.jit(fn)` at its first launch, autotuned over `configs()` when given: `prune`
    (Triton's early_config_prune: (configs, named_args, **kwargs) -> the candidates for this launch, the default
    first) narrows them per launch. Under the interpreter only that default runs; on a GPU the others are benchmarked
    once per tuning key and the choice is kept in Triton's cache directory."""

    def __init__(self, fn: Callable[..., None], configs: Callable[[], list[Any]] | None, key: Sequence[str],
                 prune: Callable[..., list[Any]] | None):
        self.fn, self.configs, self.key, self.prune = fn, configs, list(key), prune
        self._kernel: Any = None

    @property
    def kernel(self) -> Any:
        if self._kernel is None:
            triton = _triton()
            self.fn.__globals__["tl"] = triton.language
            k = triton.jit(self.fn)
            if self.configs is not None:
                prune = self.prune or (lambda configs, named_args, **kwargs: configs)
                if interpreting():  # autotuning benchmarks on a GPU; the interpreter runs the default
                    prune = (lambda p: lambda configs, named_args, **kwargs: p(configs, named_args, **kwargs)[:1])(
                        prune)
                k = triton.autotune(self.configs(), key=self.key, prune_configs_by={"early_config_prune": prune},
                                    cache_results=not interpreting())(k)
            self._kernel = k
        return self._kernel

    def __getitem__(self, grid: Any) -> Callable[..., None]:
        return lambda *args, **kwargs: self._launch(grid, args, kwargs)

    def _launch(self, grid: Any, args: tuple, kwargs: dict) -> None:
        if _compile_hook is not None:
            _compile_hook(self, args, kwargs)
            return
        dev = next(a.device for a in args if isinstance(a, torch.Tensor))
        if dev.type == "cuda":
            with torch.cuda.device(dev):
                self.kernel[grid](*args, **kwargs)
        else:
            self.kernel[grid](*args, **kwargs)


def lazy_jit(fn: Callable[..., None] | None = None, *, configs: Callable[[], list[Any]] | None = None,
             key: Sequence[str] = (), prune: Callable[..., list[Any]] | None = None) -> Any:
    """Decorator: `@lazy_jit` or `@lazy_jit(configs=..., key=[...], prune=...)`, where configs() returns
    triton.Config objects (see LazyKernel). A kernel must not call other kernels: keep each one self-contained."""
    if fn is not None:
        return LazyKernel(fn, None, (), None)
    return lambda f: LazyKernel(f, configs, key, prune)


def config(num_warps: int = 4, num_stages: int = 3, **meta: int) -> Any:
    """A triton.Config, for configs() functions (imports triton, so call it only at launch time)."""
    return _triton().Config(meta, num_warps=num_warps, num_stages=num_stages)


def check_device(*tensors: torch.Tensor) -> None:
    """Triton runs CUDA tensors, or CPU tensors under the interpreter (meta tensors under compile_only), all on one
    device; anything else is a clear error."""
    allowed = "meta" if _compile_hook is not None else ("cpu" if interpreting() else None)
    for t in tensors:
        if t.device.type != "cuda" and t.device.type != allowed:
            raise ValueError(f"Triton kernels need CUDA tensors (got {t.device}); on CPU set TRITON_INTERPRET=1")
        if t.device != tensors[0].device:
            raise ValueError(f"Triton kernels need all tensors on one device (got {tensors[0].device} and {t.device})")
