"""Ahead-of-time compile check: every Triton kernel at the block sizes its launcher picks for DeepSeek-V3's shapes,
compiled for a GPU this machine need not have.

    python -m specdec.kernels.aot --arch 90                  # sm_90a (H100, H200); exit status 1 on a failure
    python -m specdec.kernels.aot --arch 80                  # sm_80 (A100): the BF16 fallback, no FP8 kernels
    python -m specdec.kernels.aot --arch 90 --alternatives   # also the autotuner's other candidates (reported)

Triton's wheel ships ptxas, so only a driver is missing: a stand-in answers get_current_target() with the chosen
GPUTarget, the launchers run on meta tensors (shapes and strides, no memory) under triton_util.compile_only, and
each launch becomes JITFunction.warmup(...) with that launch's own arguments, so every integer and pointer is
specialized as on the GPU. Fails on a compile error or on shared memory above the target's per-block limit; prints
each variant's registers and stack frame (spills), read from its cubin by cuobjdump. Compiled kernels land in
Triton's cache directory like any others. Run it in a process without TRITON_INTERPRET=1.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from . import triton_util
from .backend import Backend
from .warmup import Case, Dequant, Mla, ModelShape, model_cases, run_case

# DeepSeek-V3 (the release's config.json)
DEEPSEEK_V3 = ModelShape(hidden=7168, heads=128, q_lora=1536, kv_lora=512, nope=128, rope=64, v_head=128,
                         inter=18432, moe_inter=2048, experts=256, shared=1, topk=8, fp8_block=(128, 128))
# (batch, new tokens per sequence, cached context): decode at batch 1, 32 and 64, decode on a short context (one
# KV split), a k=3 chain verification at batch 1 and 32, an 8-node tree, a 4096-token prefill
STEPS = [(1, 1, 4096), (32, 1, 4096), (64, 1, 4096), (1, 1, 200), (1, 4, 4096), (32, 4, 4096), (1, 8, 4096),
         (1, 4096, 0)]
# captured steps (CUDA graphs): decode at batch 1 and 64, a 4-node verification at batch 32, the block table at the
# release's context (163840 slots), whose width the kernel cuts its splits from; 200 keys: most splits empty
CAPTURED = [(1, 1, 200), (64, 1, 4096), (32, 4, 4096)]
CONTEXT = 163840
# shared memory per block (bytes) and SM count by compute capability
SHARED_LIMIT = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
SMS = {80: 108, 86: 84, 89: 128, 90: 132}


def cases(arch: int) -> list[tuple[Case, torch.dtype]]:
    """What the check compiles: both TP=8 per-rank and TP=1 shapes in bf16 (FP8 weights where the GPU has FP8,
    and the BF16-weight MoE of an sm_80 fallback or a BF16 checkpoint), MLA on float32 inputs and in captured
    steps, and one weight dequantization (the same variant at every DeepSeek-V3 weight shape: all multiples of
    16)."""
    fp8 = arch >= 89
    out: list[tuple[Case, torch.dtype]] = [(Dequant(7168, 2048), torch.bfloat16)] if fp8 else []
    for tp in (8, 1):
        if fp8:
            out += [(c, torch.bfloat16) for c in model_cases(DEEPSEEK_V3, tp, STEPS, fp8=True)]
        out += [(c, torch.bfloat16) for c in model_cases(DEEPSEEK_V3, tp, STEPS, fp8=False)]
        out += [(c, torch.float32) for c in model_cases(DEEPSEEK_V3, tp, STEPS, fp8=False) if isinstance(c, Mla)]
        s = DEEPSEEK_V3
        out += [(Mla(b, ctx, n, s.heads // tp, s.kv_lora, s.rope, tree=n > 1, width=CONTEXT), torch.bfloat16)
                for b, n, ctx in CAPTURED]
    return list(dict.fromkeys(out))


class StandInDriver:
    """Triton's active driver for compiling without a GPU: a target, device 0, stream 0, nothing else."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self) -> Any:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return 0

    def get_active_torch_device(self) -> torch.device:
        return torch.device("meta")

    def get_benchmarker(self) -> Callable[..., Any]:
        raise RuntimeError("the stand-in driver compiles only: nothing can be benchmarked")


@dataclass
class Variant:
    """One compiled kernel variant and the cases whose launches use it."""

    kernel: str
    config: str
    required: bool
    cases: list[str] = field(default_factory=list)
    seconds: float = 0.0
    shared: int = 0
    regs: int | None = None
    stack: int | None = None
    error: str | None = None


def resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers, stack frame bytes) per thread from `cuobjdump -res-usage`; ptxas puts spills in the stack frame."""
    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", f.name], capture_output=True,
                             text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return (int(m[1]), int(m[2])) if m else (None, None)


class Compiler:
    """triton_util.compile_only's hook: compiles each launch's variant once and files the case under it."""

    def __init__(self, alternatives: bool):
        self.alternatives = alternatives
        self.case = ""
        self.variants: dict[Any, Variant] = {}
        self.skipped: set[tuple[str, str]] = set()  # (kernel, config) alternatives left uncompiled

    def __call__(self, lk: triton_util.LazyKernel, args: tuple, kwargs: dict) -> None:
        from triton.runtime.autotuner import Autotuner

        k, name = lk.kernel, lk.fn.__name__.lstrip("_")
        if not isinstance(k, Autotuner):
            self._compile(k, name, args, kwargs, True)
            return
        k.nargs = dict(zip(k.arg_names, args))
        candidates = k.prune_configs(kwargs)
        k.nargs = None
        for i, cfg in enumerate(candidates):
            if i and not self.alternatives:
                self.skipped.add((name, _describe(cfg.all_kwargs())))
                continue
            self._compile(k.fn, name, args, {**kwargs, **cfg.all_kwargs()}, i == 0)

    def _compile(self, jit: Any, name: str, args: tuple, kwargs: dict, required: bool) -> None:
        config = _describe(kwargs) + _specialized(jit.arg_names, args)
        t0 = time.perf_counter()
        try:
            ck = jit.warmup(*args, grid=(1,), **kwargs)
        except Exception as e:  # a compile error is this check's finding, reported per variant
            key = (name, config, str(e))
            v = self.variants.setdefault(key, Variant(name, config, required, error=_first_line(e)))
            v.required |= required
            v.cases.append(self.case)
            return
        v = self.variants.get(ck.hash)
        if v is None:
            regs, stack = resource_usage(ck.asm["cubin"])
            v = self.variants[ck.hash] = Variant(name, config, required, seconds=time.perf_counter() - t0,
                                                 shared=ck.metadata.shared, regs=regs, stack=stack)
        v.required |= required
        v.cases.append(self.case)


def _describe(kwargs: dict) -> str:
    keep = {k: v for k, v in kwargs.items() if k.startswith("BLOCK") or k in ("num_warps", "num_stages", "SPLIT")}
    return " ".join(f"{k.removeprefix('BLOCK_').lower()}={v}" for k, v in keep.items())


def _specialized(names: list[str], args: tuple) -> str:
    """How Triton specializes the integer arguments, where that splits variants: = 1 (a constant), or not a
    multiple of 16 (no divisibility hint); the rest are multiples of 16."""
    ints = [(n, a) for n, a in zip(names, args) if isinstance(a, int) and not isinstance(a, bool)]
    one = [n for n, a in ints if a == 1]
    odd = [n for n, a in ints if a != 1 and a % 16]
    return "".join(f" {label}:{','.join(v)}" for label, v in (("=1", one), ("%16", odd)) if v)


def _first_line(e: BaseException) -> str:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return f"{type(e).__name__}: {lines[-1] if lines else ''}"[:300]


def check(arch: int, alternatives: bool = False, out: Any = sys.stdout) -> int:
    """Compile every case for sm_<arch>; print one row per variant; return the number of failed required ones."""
    if triton_util.interpreting():
        raise RuntimeError("kernels/aot.py compiles for a GPU: run it without TRITON_INTERPRET=1")
    if arch not in SHARED_LIMIT:
        raise ValueError(f"--arch {arch}: choose one of {', '.join(map(str, SHARED_LIMIT))}")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning
    from triton.runtime.driver import driver

    saved = driver._active  # reset_active() would look for a real driver, and there may be none
    driver.set_active(StandInDriver(arch))
    comp = Compiler(alternatives)
    backend, meta = Backend("triton", fp8=arch >= 89), torch.device("meta")
    t0 = time.perf_counter()
    todo = cases(arch)
    try:
        with triton_util.compile_only(comp, SMS[arch]), torch.inference_mode():
            for case, dtype in todo:
                comp.case = f"{case} {str(dtype).removeprefix('torch.')}"
                run_case(backend, case, meta, dtype)
    finally:
        driver._active = saved
    limit = SHARED_LIMIT[arch]
    failed = 0
    print(f"sm_{arch}: {len(todo)} cases, {len(comp.variants)} variants in {time.perf_counter() - t0:.0f} s "
          f"(shared memory limit {limit} B)", file=out)
    for v in sorted(comp.variants.values(), key=lambda v: (v.kernel, not v.required, v.config)):
        bad = v.error is not None or v.shared > limit
        failed += bad and v.required
        status = "FAIL" if bad and v.required else ("fail (alternative)" if bad else "ok")
        usage = v.error or (f"shared {v.shared:>6} B  regs {v.regs}  stack {v.stack} B  {v.seconds:4.1f} s"
                            + ("" if v.required else "  (alternative)"))
        print(f"  {status:<4} {v.kernel:<18} {v.config:<60} {usage}  [{len(v.cases)} cases: {v.cases[0]}]", file=out)
    if comp.skipped:
        print(f"  {len(comp.skipped)} autotune alternatives not compiled (--alternatives compiles them)", file=out)
    print(f"{failed} required variants failed" if failed else "all required variants compile", file=out)
    return failed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90 for sm_90a (default)")
    ap.add_argument("--alternatives", action="store_true", help="also compile the autotuner's other candidates")
    args = ap.parse_args(argv)
    return 1 if check(args.arch, args.alternatives) else 0


if __name__ == "__main__":
    sys.exit(main())
