"""The C++ CPU ops (kernels/cpu_ops.py, kernels/csrc) against their plain-torch references: every code path forced in
turn, random shapes with partial and cut blocks, M from 1 to past the GEMM crossover, 1 and 2 threads, bad inputs,
torch.compile, and the build's fallback."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from _interp import wide_rows

from specdec.kernels import cpu_ops
from specdec.kernels.fp8 import weight_quant_ref

ISAS = ("avx512", "avx2", "portable")
MS = (1, 2, 3, 4, 7, 16, 64)
ROUTES = {"rows": 10**9, "gemm": 1}  # gemm_rows forcing the register kernels / the dequantize-then-GEMM route
FP8 = torch.float8_e4m3fn
TOL = 5e-6  # relative to the output's largest magnitude; the fp32 paths measure 1e-7..5e-7


@pytest.fixture(scope="module", autouse=True)
def built() -> None:
    if not cpu_ops.available():
        if shutil.which(os.environ.get("CXX", "c++")) is None:
            pytest.skip(f"no C++ compiler: {cpu_ops.unavailable_reason()}")
        pytest.fail(f"the CPU ops did not build: {cpu_ops.unavailable_reason()}")


@pytest.fixture(params=ISAS)
def isa(request: pytest.FixtureRequest) -> str:
    if request.param not in cpu_ops.isas():
        pytest.skip(f"this CPU lacks {request.param} (it runs {', '.join(cpu_ops.isas())})")
    return request.param


@pytest.fixture
def two_threads() -> Iterator[None]:
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(1)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| in float64."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300)) if b.numel() else 0.0


def quantized(g: torch.Generator, n: int, k: int, block: tuple[int, int] = (128, 128),
              offset: tuple[int, int] = (0, 0)) -> tuple[torch.Tensor, torch.Tensor]:
    """A random FP8 weight [n, k] and its scales, cut at `offset` into its first block (a shard's view)."""
    n0, k0 = offset
    q, s = weight_quant_ref(torch.randn(n0 + n, k0 + k, generator=g) * 0.1, *block)
    return q[n0:, k0:].contiguous(), s


def random_case(g: torch.Generator) -> tuple[int, int, tuple[int, int], tuple[int, int]]:
    """(n, k, block, offset): sizes that are rarely multiples of the vectors or the blocks, some blocks cut."""
    n, k = (int(v) for v in torch.randint(1, 300, (2,), generator=g))
    block = [(128, 128), (32, 32), (16, 48), (100, 36)][int(torch.randint(4, (1,), generator=g))]
    cut = bool(torch.randint(2, (1,), generator=g))
    offset = (int(torch.randint(block[0], (1,), generator=g)), int(torch.randint(block[1], (1,), generator=g)))
    return n, k, block, offset if cut else (0, 0)


def test_isas_follow_the_cpu_flags() -> None:
    isas = cpu_ops.isas()
    assert isas[-1] == "portable" and set(isas) <= set(ISAS)
    cpuinfo = Path("/proc/cpuinfo")
    if sys.platform != "linux" or os.uname().machine != "x86_64" or not cpuinfo.exists():
        assert isas == ["portable"]
        return
    flags = set(re.search(r"^flags\s*:(.*)$", cpuinfo.read_text(), re.M).group(1).split())
    base = {"fma", "f16c"} <= flags
    assert ("avx512" in isas) == (base and {"avx512f", "avx512bw", "avx512vl"} <= flags)
    assert ("avx2" in isas) == (base and "avx2" in flags)


@pytest.mark.parametrize("route", ROUTES)
def test_fp8_decode_is_exact_for_every_byte(isa: str, route: str) -> None:
    # every non-NaN e4m3fn byte (0x7F / 0xFF are torch's NaN; the loader refuses them) against torch's conversion:
    # x = I picks single weights, scale 1, so each output is one decoded byte; 37 columns: full vectors and a tail
    codes = torch.tensor([b for b in range(256) if b & 0x7F != 0x7F], dtype=torch.uint8)
    k = 37
    w = codes[(torch.arange(len(codes))[:, None] + torch.arange(k)) % len(codes)].view(FP8)
    s = torch.ones(len(codes) // 128 + 1, 1)
    y = cpu_ops.fp8_linear(torch.eye(k), w, s, isa=isa, gemm_rows=ROUTES[route])
    assert torch.equal(y, w.float().T)


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("m", MS)
def test_fp8_linear_matches_reference(seed: int, isa: str, m: int, route: str) -> None:
    g = torch.Generator().manual_seed(seed)
    n, k, block, offset = random_case(g)
    w, s = quantized(g, n, k, block, offset)
    x = torch.randn(m, k, generator=g)
    y = cpu_ops.fp8_linear(x, w, s, block, offset, isa=isa, gemm_rows=ROUTES[route])
    err = rel(y, cpu_ops.fp8_linear_ref(x, w, s, block, offset))
    assert y.shape == (m, n) and y.dtype == torch.float32
    assert err < TOL, f"seed {seed}: n={n} k={k} block={block} offset={offset}: rel err {err:.2e}"


@pytest.mark.parametrize("k,m_gemm", [(128, 16), (512, 32), (2048, 64)])
def test_auto_route_picks_by_m_and_k(seed: int, k: int, m_gemm: int) -> None:
    # the default route switches to dequantize-then-GEMM at K / 16 rows of x, within [16, 64]
    g = torch.Generator().manual_seed(seed)
    w, s = quantized(g, 96, k)
    for m, route in ((m_gemm - 1, "rows"), (m_gemm, "gemm")):
        x = torch.randn(m, k, generator=g)
        forced = {r: cpu_ops.fp8_linear(x, w, s, gemm_rows=rows) for r, rows in ROUTES.items()}
        assert not torch.equal(forced["rows"], forced["gemm"]), "the routes agree bit for bit: nothing to tell"
        assert torch.equal(cpu_ops.fp8_linear(x, w, s), forced[route]), f"seed {seed}: M={m} K={k} ran not {route}"


def test_fp8_linear_shards_equal_the_whole(seed: int, isa: str) -> None:
    # a tensor-parallel shard cuts a 128-block: it keeps its rows / columns, a copy of the cut block's scale and
    # the offset into it. Column shards give the whole output's columns bit for bit; row shards sum to it.
    g = torch.Generator().manual_seed(seed)
    w, s = quantized(g, 300, 320)
    x = torch.randn(3, 320, generator=g)
    whole = cpu_ops.fp8_linear(x, w, s, isa=isa)
    r0, r1 = 70, 230
    shard = cpu_ops.fp8_linear(x, w[r0:r1].contiguous(), s[r0 // 128:-(-r1 // 128)], offset=(r0 % 128, 0), isa=isa)
    assert torch.equal(shard, whole[:, r0:r1])
    parts = [cpu_ops.fp8_linear(x[:, c0:c1], w[:, c0:c1].contiguous(), s[:, c0 // 128:-(-c1 // 128)].contiguous(),
                                offset=(0, c0 % 128), isa=isa) for c0, c1 in ((0, 100), (100, 200), (200, 320))]
    assert rel(sum(parts), whole) < TOL, f"seed {seed}"


def test_fp8_linear_bfloat16_x(seed: int, isa: str) -> None:
    g = torch.Generator().manual_seed(seed)
    w, s = quantized(g, 200, 256)
    x = torch.randn(4, 256, generator=g).bfloat16()
    y = cpu_ops.fp8_linear(x, w, s, isa=isa)
    assert y.dtype == torch.bfloat16
    assert rel(y, cpu_ops.fp8_linear_ref(x, w, s)) < 8e-3  # one bf16 rounding of a float32 result


def test_rows_of_x_far_apart(isa: str) -> None:
    # row 2 of x starts past 2^31 elements: offsets are 64-bit
    x = wide_rows(3, 64, torch.float32)
    x.copy_(torch.randn(3, 64))
    w, s = quantized(torch.Generator().manual_seed(0), 40, 64)
    assert rel(cpu_ops.fp8_linear(x, w, s, isa=isa), cpu_ops.fp8_linear_ref(x, w, s)) < TOL


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("m", MS)
def test_bf16_linear_matches_reference(seed: int, isa: str, m: int, route: str) -> None:
    g = torch.Generator().manual_seed(seed)
    v, d = (int(t) for t in torch.randint(1, 400, (2,), generator=g))
    w = torch.randn(v, d, generator=g).bfloat16()
    x = torch.randn(m, d, generator=g)
    y = cpu_ops.bf16_linear(x, w, isa=isa, gemm_rows=ROUTES[route])
    assert y.shape == (m, v)
    err = rel(y, cpu_ops.bf16_linear_ref(x, w))
    assert err < TOL, f"seed {seed}: v={v} d={d}: rel err {err:.2e}"  # the head's target: 1e-5


def moe_case(g: torch.Generator, t: int, e: int = 6, topk: int = 2, d: int = 0, inter: int = 0,
             block: tuple[int, int] = (128, 128)) -> tuple[torch.Tensor, ...]:
    """x, topk_ids (distinct per token, some -1: experts on another rank), topk_w, w13, w2, s13, s2."""
    d = d or int(torch.randint(1, 300, (1,), generator=g))
    inter = inter or int(torch.randint(1, 200, (1,), generator=g))
    x = torch.randn(t, d, generator=g)
    ids = torch.stack([torch.randperm(e + 2, generator=g)[:topk] for _ in range(t)]) - 2  # -2, -1: another rank's
    ids = ids.clamp_min(-1)
    topk_w = torch.rand(t, topk, generator=g)
    w13, s13 = zip(*[_halves(g, inter, d, block) for _ in range(e)])
    w2, s2 = zip(*[quantized(g, d, inter, block) for _ in range(e)])
    return x, ids, topk_w, torch.stack(w13), torch.stack(w2), torch.stack(s13), torch.stack(s2)


def _halves(g: torch.Generator, inter: int, d: int, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    (wg, sg), (wu, su) = quantized(g, inter, d, block), quantized(g, inter, d, block)  # each half blocked alone
    return torch.cat([wg, wu]), torch.cat([sg, su])


@pytest.mark.parametrize("route", ROUTES)
@pytest.mark.parametrize("t", MS)
def test_fp8_moe_matches_reference(seed: int, isa: str, t: int, route: str) -> None:
    g = torch.Generator().manual_seed(seed)
    block = [(128, 128), (32, 32)][seed % 2]
    args = moe_case(g, t, block=block)
    y = cpu_ops.fp8_moe(*args, block, isa=isa, gemm_rows=ROUTES[route])
    err = rel(y, cpu_ops.fp8_moe_ref(*args, block))
    assert y.shape == args[0].shape and y.dtype == torch.float32
    assert err < TOL, f"seed {seed}: d={args[0].shape[1]} I={args[4].shape[2]} block={block}: rel err {err:.2e}"


def test_fp8_moe_bfloat16_x_and_no_local_experts(seed: int, isa: str) -> None:
    g = torch.Generator().manual_seed(seed)
    x, ids, *rest = moe_case(g, 5)
    y = cpu_ops.fp8_moe(x.bfloat16(), ids, *rest, isa=isa)
    assert y.dtype == torch.bfloat16
    assert rel(y, cpu_ops.fp8_moe_ref(x.bfloat16(), ids, *rest)) < 8e-3
    assert torch.equal(cpu_ops.fp8_moe(x, torch.full_like(ids, -1), *rest, isa=isa), torch.zeros_like(x))


@pytest.mark.parametrize("route", ROUTES)
def test_empty_sizes(isa: str, route: str) -> None:
    rows = ROUTES[route]
    for m, n, k in ((0, 5, 7), (3, 0, 7), (3, 5, 0)):
        w, s = torch.zeros(n, k, dtype=FP8), torch.ones(-(-n // 128), -(-k // 128))
        y = cpu_ops.fp8_linear(torch.randn(m, k), w, s, isa=isa, gemm_rows=rows)
        assert y.shape == (m, n) and not y.any()
        assert not cpu_ops.bf16_linear(torch.randn(m, k), w.bfloat16(), isa=isa, gemm_rows=rows).any()
    x, ids, tw, *rest = moe_case(torch.Generator().manual_seed(0), 2, d=40, inter=24)
    assert cpu_ops.fp8_moe(x[:0], ids[:0], tw[:0], *rest, isa=isa, gemm_rows=rows).shape == (0, 40)


def test_two_threads_give_the_same_bits(seed: int, isa: str, two_threads: None) -> None:
    # enough rows that the threads split them (a chunk is >= 64 KB of weights); every output element is computed
    # by one thread in one order, so the bits equal one thread's
    g = torch.Generator().manual_seed(seed)
    w, s = quantized(g, 1500, 200, (32, 32), (5, 9))
    x = torch.randn(5, 200, generator=g)
    wb = torch.randn(900, 160, generator=g).bfloat16()
    moe = moe_case(g, 4, d=256, inter=384)
    ops = [lambda: cpu_ops.fp8_linear(x, w, s, (32, 32), (5, 9), isa=isa),
           lambda: cpu_ops.fp8_linear(x, w, s, (32, 32), (5, 9), isa=isa, gemm_rows=1),
           lambda: cpu_ops.bf16_linear(x[:, :160], wb, isa=isa),
           lambda: cpu_ops.fp8_moe(*moe, isa=isa)]
    two = [op() for op in ops]
    torch.set_num_threads(1)
    one = [op() for op in ops]
    for i in (0, 2, 3):
        assert torch.equal(one[i], two[i]), f"seed {seed}: op {i}"
    assert rel(two[1], one[1]) < TOL, f"seed {seed}"  # torch's GEMM may split its sums differently


def test_bad_inputs_are_one_line_value_errors() -> None:
    g = torch.Generator().manual_seed(0)
    w, s = quantized(g, 64, 96)
    x = torch.randn(2, 96)
    moe = moe_case(g, 2, d=96, inter=64)
    cases = [
        (lambda: cpu_ops.fp8_linear(x, w.float(), s), "fp8_linear: w must be a 2-D Float8_e4m3fn tensor"),
        (lambda: cpu_ops.fp8_linear(x, w.t().contiguous().t(), s), "fp8_linear: w must be contiguous"),
        (lambda: cpu_ops.fp8_linear(x, w, s.double()), "fp8_linear: s must be a 2-D Float tensor"),
        (lambda: cpu_ops.fp8_linear(x, w, s[:, :0]), r"fp8_linear: s must be \[1, 1\]"),
        (lambda: cpu_ops.fp8_linear(x, w, s, offset=(128, 0)), "fp8_linear: block .* offset"),
        (lambda: cpu_ops.fp8_linear(x.double(), w, s), "fp8_linear: x must be float32 or bfloat16"),
        (lambda: cpu_ops.fp8_linear(x[:, :95], w, s), r"fp8_linear: x must be \[M, 96\]"),
        (lambda: cpu_ops.fp8_linear(torch.randn(96, 2).t(), w, s), "fp8_linear: x's rows must be contiguous"),
        (lambda: cpu_ops.fp8_linear(x, w, s, isa="sse2"), "fp8_linear: isa='sse2' is not one of"),
        (lambda: cpu_ops.bf16_linear(x, w.float()), "bf16_linear: w must be a 2-D BFloat16 tensor"),
        (lambda: cpu_ops.fp8_moe(moe[0], moe[1] + 20, *moe[2:]), r"fp8_moe: topk_ids\[0, 0\] = \d+ is not an expert"),
        (lambda: cpu_ops.fp8_moe(moe[0], moe[1].int(), *moe[2:]), "fp8_moe: topk_ids must be a 2-D Long"),
        (lambda: cpu_ops.fp8_moe(*moe[:5], moe[5][:, :1].contiguous(), moe[6]), r"fp8_moe: s13 must be \[6, 2, 1\]"),
        (lambda: cpu_ops.fp8_moe(*moe[:3], moe[3][:, :-1].contiguous(), *moe[4:]), "fp8_moe: w13 .* w2 .* disagree"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message) as err:
            call()
        assert "\n" not in str(err.value), str(err.value)


def test_a_path_the_cpu_lacks_is_refused() -> None:
    missing = [i for i in ISAS if i not in cpu_ops.isas()]
    if not missing:
        pytest.skip("this CPU runs every path")
    with pytest.raises(ValueError, match=f"isa='{missing[0]}' is not available on this CPU"):
        cpu_ops.bf16_linear(torch.randn(1, 8), torch.randn(8, 8).bfloat16(), isa=missing[0])


def test_compiled_and_traced_calls_run_the_op(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    w, s = quantized(g, 96, 160)
    wb = torch.randn(64, 96, generator=g).bfloat16()
    moe = moe_case(g, 3, d=96, inter=64)

    def step(x: torch.Tensor) -> torch.Tensor:
        h = cpu_ops.fp8_linear(x, w, s)
        return cpu_ops.bf16_linear(cpu_ops.fp8_moe(h, *moe[1:]), wb)

    x = torch.randn(3, 160, generator=g)
    eager = step(x)
    assert torch.equal(torch.compile(step, fullgraph=True, backend="aot_eager")(x), eager)
    graph = torch.fx.symbolic_trace(step).graph
    assert [str(n.target) for n in graph.nodes if n.op == "call_function"] == [
        "specdec.fp8_linear.default", "specdec.fp8_moe.default", "specdec.bf16_linear.default"]
    for op, args in ((torch.ops.specdec.fp8_linear, (x, w, s)), (torch.ops.specdec.bf16_linear, (x[:, :96], wb)),
                     (torch.ops.specdec.fp8_moe, (x[:, :96].contiguous(), *moe[1:]))):
        torch.library.opcheck(op, args, test_utils=("test_faketensor", "test_aot_dispatch_dynamic"))


def test_failed_build_warns_once_and_reports_why(monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.utils import cpp_extension

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("Ninja is required to load C++ extensions (pip install ninja to get it)")

    monkeypatch.setattr(cpp_extension, "load", fail)
    monkeypatch.setattr(cpu_ops, "_build", {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not cpu_ops.available() and not cpu_ops.available()
    assert [str(w.message) for w in caught] == [
        "specdec CPU kernels unavailable (Ninja is required to load C++ extensions (pip install ninja to get it)); "
        "running the torch path"]
    assert cpu_ops.unavailable_reason().startswith("Ninja is required")
    with pytest.raises(RuntimeError, match="specdec CPU kernels unavailable: Ninja"):
        cpu_ops.fp8_linear(torch.randn(1, 8), torch.zeros(8, 8, dtype=FP8), torch.ones(1, 1))


def test_the_build_finds_ninja_in_the_scripts_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    # pip's ninja lands in this interpreter's scripts folder, on PATH only while its virtual environment is active
    from torch.utils import cpp_extension

    seen = []
    monkeypatch.setattr(cpp_extension, "load", lambda *a, **k: seen.append(os.environ["PATH"]))
    monkeypatch.setattr(cpu_ops, "_build", {})
    monkeypatch.setenv("PATH", "/nowhere")
    assert cpu_ops.available()
    assert seen == [os.pathsep.join(["/nowhere", sysconfig.get_path("scripts")])]
    assert os.environ["PATH"] == "/nowhere"


def test_a_second_process_loads_the_cached_build() -> None:
    from torch.utils.cpp_extension import _get_build_directory

    lib = Path(_get_build_directory(cpu_ops.NAME, False)) / f"{cpu_ops.NAME}.so"
    before = lib.stat().st_mtime_ns
    code = "from specdec.kernels import cpu_ops; assert cpu_ops.available(), cpu_ops.unavailable_reason()"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)
    assert lib.stat().st_mtime_ns == before, "a second process rebuilt the extension"


def test_bench_quick_prints_its_tables(capsys: pytest.CaptureFixture[str]) -> None:
    path = Path(__file__).parents[1] / "bench" / "cpu_ops_bench.py"
    spec = importlib.util.spec_from_file_location("cpu_ops_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.main(["--quick"])
    out = capsys.readouterr().out
    for table, row in (("fp8_linear", "bundled q_a_proj 128x256  1  fp8 auto"),
                       ("routed experts", "bundled 16 experts top-2 D=256 I=128  4  fp32 moe_runs"),
                       ("BF16 head", "bundled head 4096x256  1  fp32 torch.mm")):
        assert table in out and re.search(re.sub(r"\s+", r"\\s+", row), out), f"{table}: no row {row!r}"
