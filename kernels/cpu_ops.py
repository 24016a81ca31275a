"""CPU kernels of our own for weights kept as released: FP8 e4m3 block-scaled linears, the routed experts of a decode
or verify step in one call, and the BF16 head. Each op has a plain-torch `*_ref` beside it: the contract it meets.

The ops are C++ (kernels/csrc), registered with torch.library as torch.ops.specdec.*, so eager, compiled and traced
code call the same op (fake implementations let torch.compile trace them). The extension is built with torch's JIT
builder on first use (`available()`, or the first op called), cached under the torch extensions directory; later
processes load the cached build. Where it cannot build (no compiler, no ninja), `available()` is False,
`unavailable_reason()` says why, one warning line says so, and callers run the torch path. The same extension holds
the rest of a layer's ops (norms, RoPE, SiLU * up, the router, absorbed MLA): kernels/cpu_fused.py.

Every op takes `isa`: "auto" runs the best path this CPU has (`isas()`, best first); "avx512", "avx2" or "portable"
force one (a path the CPU lacks is a ValueError). Below `gemm_rows` rows of x, register kernels decode the weights
as they read them; from there on the weight is dequantized to float32 tiles and torch's GEMM runs on them. The
default (None) is the crossover bench/cpu_ops_bench.py measures, which grows with the weight's K: K / 16 rows, within
16 to 64 (csrc/cpu_ops.h). Threads (torch.get_num_threads) split the weight's rows. Bad arguments raise a one-line
ValueError naming the op and the argument.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
import warnings
from pathlib import Path

import torch

from .fp8 import weight_dequant_ref
from .moe import moe_ref

CSRC = Path(__file__).resolve().parent / "csrc"
# one build folder per checkout (torch keys its cache by name alone): two checkouts on one machine, with the same
# sources at other paths, otherwise rebuild it in turn, and one process can find the other's build half written
NAME = f"specdec_cpu_ops_{hashlib.sha1(str(CSRC).encode()).hexdigest()[:8]}"
SOURCES = ("ops.cpp", "linear.cpp", "moe.cpp", "fused.cpp", "mla.cpp")  # fused, mla: kernels/cpu_fused.py

_build: dict[str, str | None] = {}  # "reason": None once loaded in this process, else why the build failed


def _load() -> str | None:
    from torch.utils import cpp_extension

    # torch runs `ninja` from PATH, even to load a cached build; pip's ninja (a dependency) sits in this
    # interpreter's scripts folder, which is on PATH only while its virtual environment is active
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([path, sysconfig.get_path("scripts")])
    try:
        # -ffp-contract=off: float32 operations run as written (a * b - c * d rounds three times, as torch's ops do);
        # g++ otherwise fuses them into multiply-adds wherever a target has FMA. Fused ones are intrinsics.
        cpp_extension.load(NAME, [str(CSRC / s) for s in SOURCES], extra_cflags=["-O3", "-ffp-contract=off"],
                           is_python_module=False)
    except Exception as e:  # no compiler, no ninja, a compile error: every one means "use the torch path"
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        warnings.warn(f"specdec CPU kernels unavailable ({reason}); running the torch path", stacklevel=4)
        return reason
    finally:
        os.environ["PATH"] = path
    _register_fakes()
    return None


def unavailable_reason() -> str | None:
    """None when the kernels are loaded (building them on the first call), else why they cannot be."""
    if "reason" not in _build:
        _build["reason"] = _load()
    return _build["reason"]


def available() -> bool:
    """Whether the CPU kernels are loaded (built on the first call; a failed build warns once)."""
    return unavailable_reason() is None


class _Ops:
    """torch.ops.specdec's ops as their default overloads, looked up once: calling an overload skips the packet's
    overload resolution, about 1 us of a small op's 2.5 us."""

    def __getattr__(self, name: str) -> torch._ops.OpOverload:
        op = getattr(torch.ops.specdec, name).default
        setattr(self, name, op)
        return op


_OPS = _Ops()


def _ops() -> _Ops:
    if _build.get("reason", "") is None:  # loaded (the common case: no further checks)
        return _OPS
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(f"specdec CPU kernels unavailable: {reason}")
    return _OPS


def isas() -> list[str]:
    """The code paths this CPU runs, best first: a subset of avx512, avx2, portable (always last)."""
    return list(_ops().cpu_isas())


def fp8_linear(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, block: tuple[int, int] = (128, 128),
               offset: tuple[int, int] = (0, 0), *, isa: str = "auto", gemm_rows: int | None = None) -> torch.Tensor:
    """x [M, K] float32 or bfloat16, rows contiguous; w [N, K] float8_e4m3fn; s float32
    [ceil((N + offset[0]) / block[0]), ceil((K + offset[1]) / block[1])]: w[n, k] scales by
    s[(n + offset[0]) // block[0], (k + offset[1]) // block[1]] (offset: where a tensor-parallel shard starts inside
    its first block; the shard keeps a copy of that block's scale). Returns x @ dequant(w).T [M, N] in x's dtype,
    accumulated in float32, each block's scale applied once to its block's sum."""
    return _ops().fp8_linear(x, w, s, *block, *offset, isa, gemm_rows)


def dequant_ref(w: torch.Tensor, s: torch.Tensor, block: tuple[int, int] = (128, 128),
                offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """w [N, K] float8_e4m3fn with s as fp8_linear takes them -> float32 [N, K] (w * its block's scale)."""
    n0, k0 = offset
    if not (n0 or k0):
        return weight_dequant_ref(w, s, *block)
    full = torch.zeros(n0 + w.shape[0], k0 + w.shape[1], dtype=w.dtype, device=w.device)  # cut blocks, whole
    full[n0:, k0:] = w
    return weight_dequant_ref(full, s, *block)[n0:, k0:]


def fp8_linear_ref(x: torch.Tensor, w: torch.Tensor, s: torch.Tensor, block: tuple[int, int] = (128, 128),
                   offset: tuple[int, int] = (0, 0)) -> torch.Tensor:
    """fp8_linear in plain torch: dequantize, then a float32 matmul."""
    return (x.float() @ dequant_ref(w, s, block, offset).T).to(x.dtype)


def fp8_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
            s13: torch.Tensor, s2: torch.Tensor, block: tuple[int, int] = (128, 128), *, isa: str = "auto",
            gemm_rows: int | None = None) -> torch.Tensor:
    """Routed experts in one call, as moe_ref (kernels/moe.py) lays them out: x [T, D] float32 or bfloat16;
    topk_ids [T, K] int64 local expert ids, -1 = not on this rank; topk_w [T, K] float32; w13 [E, 2I, D] (gate rows
    then up rows) and w2 [E, D, I] float8_e4m3fn, contiguous; s13 [E, 2 * ceil(I/bn), ceil(D/bk)] (the gate grid,
    then the up grid), s2 [E, ceil(D/bn), ceil(I/bk)] float32. Returns sum_k topk_w[t, k] * expert_k(x[t]) [T, D]
    in x's dtype, computed in float32. Each chosen expert runs once on all the tokens that chose it (its blocks read
    once per call); unchosen experts cost nothing."""
    return _ops().fp8_moe(x, topk_ids, topk_w, w13, w2, s13, s2, *block, isa, gemm_rows)


def fp8_moe_ref(x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
                s13: torch.Tensor, s2: torch.Tensor, block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """fp8_moe in plain torch: moe_ref on the dequantized experts, in float32."""
    return moe_ref(x.float(), topk_ids, topk_w, w13, w2, s13, s2, block).to(x.dtype)


def bf16_linear(x: torch.Tensor, w: torch.Tensor, *, isa: str = "auto", gemm_rows: int | None = None) -> torch.Tensor:
    """x [M, D] float32 or bfloat16, rows contiguous; w [V, D] bfloat16, contiguous -> x @ w.T [M, V] in x's dtype,
    from the exact float32 values of w with a float32 accumulate (the head: the draft reads it k times a step)."""
    return _ops().bf16_linear(x, w, isa, gemm_rows)


def bf16_linear_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """bf16_linear in plain torch."""
    return (x.float() @ w.float().T).to(x.dtype)


def _register_fakes() -> None:
    """Output shapes for torch.compile's tracing, these ops' and kernels/cpu_fused.py's (the ops allocate their
    outputs, but for cpu_fused's `*_into` ops, which write into `out` and return nothing)."""
    from . import cpu_fused  # here, not at the top: cpu_fused imports this module's loader

    cpu_fused._register_fakes()

    @torch.library.register_fake("specdec::fp8_linear")
    def _(x, w, s, block_n=128, block_k=128, n_off=0, k_off=0, isa="auto", gemm_rows=None):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("specdec::bf16_linear")
    def _(x, w, isa="auto", gemm_rows=None):
        return x.new_empty(x.shape[0], w.shape[0])

    @torch.library.register_fake("specdec::fp8_moe")
    def _(x, topk_ids, topk_w, w13, w2, s13, s2, block_n=128, block_k=128, isa="auto", gemm_rows=None):
        return x.new_empty(x.shape)
