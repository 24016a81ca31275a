"""Kernel bench for a lent GPU: every Triton kernel at DeepSeek-V3 shapes, checked against its reference, timed.

    python bench/kernel_bench.py            # H200-sized cases, about 2-4 minutes, table printed last
    python bench/kernel_bench.py --smoke    # tiny shapes; on a machine without a GPU it runs Triton's interpreter

Times are medians of triton.testing.do_bench. Bytes and FLOPs are counted from shapes (the unique bytes a kernel
must move, the FLOPs it must do; MLA's bytes by FlashMLA's formula); %roof compares the time with
max(bytes / bandwidth, FLOPs / peak). Targets: MLA decode at batch 64 x 4k context >= 70% of HBM bandwidth;
FP8 GEMM at M = 64..128 >= 60% of DeepGEMM's published TFLOPS (its README, H800). flashinfer's MLA decode and
top-k/top-p sampling run on the same inputs where installed. Exit status 1 when a kernel disagrees with its
reference (perf misses are reported, not fatal).
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

# H200 SXM: HBM3e bandwidth; dense tensor-core peaks from the spec sheet (measured bf16 GEMMs reach about 790)
PEAK = {"bw": 4.8e12, "bf16": 989e12, "fp8": 1979e12}
# DeepGEMM README (first release, H800): normal FP8 GEMM TFLOPS at (M, N, K)
DEEPGEMM = {(64, 2112, 7168): 206, (64, 24576, 1536): 289, (64, 32768, 512): 219, (64, 7168, 16384): 336,
            (64, 4096, 7168): 287, (64, 7168, 2048): 295, (128, 2112, 7168): 352, (128, 24576, 1536): 535,
            (128, 32768, 512): 358, (128, 7168, 16384): 645, (128, 4096, 7168): 533, (128, 7168, 2048): 510}


@dataclass
class Row:
    kernel: str
    case: str
    ms: float
    nbytes: float
    flops: float
    peak: str  # "bf16" | "fp8"
    err: float
    tol: float
    target: tuple[str, float, float] | None = None  # (what, achieved fraction, wanted fraction)

    @property
    def ok(self) -> bool:
        return self.err <= self.tol

    def cells(self, gpu: bool) -> list[str]:
        s = self.ms / 1e3
        roof = max(self.nbytes / PEAK["bw"], self.flops / PEAK[self.peak]) / s if gpu and s > 0 else None
        tgt = ""
        if self.target and gpu:
            what, got, want = self.target
            tgt = f"{what} {got:.0%} {'ok' if got >= want else f'MISS (want {want:.0%})'}"
        return [self.kernel, self.case, f"{self.ms:.4f}", f"{self.nbytes / s / 1e9:.0f}",
                f"{self.flops / s / 1e12:.1f}", f"{roof:.0%}" if roof is not None else "-", f"{self.err:.1e}",
                "ok" if self.ok else "FAIL", tgt]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def timer(gpu: bool, fn: Callable[..., object], *args: object, **kwargs: object) -> float:
    """Milliseconds per fn(*args, **kwargs): do_bench's median on a GPU, else one wall-clock run (interpreter)."""
    call = functools.partial(fn, *args, **kwargs)
    if gpu:
        import triton.testing

        return float(triton.testing.do_bench(call, warmup=25, rep=100, return_mode="median"))
    t = time.perf_counter()
    call()
    return (time.perf_counter() - t) * 1e3


def tree_mask(g: torch.Generator, n: int) -> torch.Tensor:
    """[n, n] ancestor mask of a random tree in topological order."""
    m = torch.eye(n, dtype=torch.bool)
    for i in range(1, n):
        m[i] |= m[int(torch.randint(0, i, (1,), generator=g))]
    return m


def flashmla_bytes(b: int, ctx: int, n: int, heads: int, c: int, r: int) -> int:
    """Bytes an MLA step moves by FlashMLA's benchmark formula: the whole latent cache once, plus queries and outputs
    at 2 bytes (our outputs are float32, so this undercounts the writes a little)."""
    return (b * (ctx + n) * (c + r) + b * n * heads * (c + r) + b * n * heads * c) * 2


def bench_mla(rows: list[Row], dev: torch.device, smoke: bool, heads: int, fi: bool,
              cases: list[tuple[int, int, int, str]] | None = None) -> None:
    """(batch, context, new tokens, "decode" | "chain" | "tree") cases, default a sweep; bytes by flashmla_bytes."""
    from specdec.kernels.attn_meta import AttnMeta
    from specdec.kernels.mla import mla_attention, mla_attention_ref

    c, r = (32, 16) if smoke else (512, 64)
    mscale = 0.1 * math.log(40) + 1  # YaRN factor 40 with mscale_all_dim 1: scale carries mscale^2
    scale = 192**-0.5 * mscale**2
    if cases is None and smoke:
        cases = [(2, 40, 1, "decode"), (2, 40, 4, "tree"), (1, 70, 3, "chain")]
    elif cases is None:
        cases = [(b, ctx, 1, "decode") for b, ctx in [(1, 4096), (1, 32768), (16, 4096), (64, 1024), (64, 4096),
                                                       (64, 32768)]]
        cases += [(b, ctx, n, "tree") for n in (2, 4, 8, 16) for b, ctx in [(64, 4096), (1, 32768)]]
        cases += [(64, 4096, 4, "chain"), (8, 4096, 64, "tree")]
    g = torch.Generator().manual_seed(0)
    fi_mla = None
    if fi:
        from specdec.kernels.flashinfer_mla import FlashinferMLA

        fi_mla = FlashinferMLA(dev)
    for b, ctx, n, kind in cases:
        total = b * (ctx + n)
        slots = torch.randperm(total, device=dev).view(b, ctx + n)
        tm = torch.cat([tree_mask(g, n)] * b).to(dev) if kind == "tree" else None  # None: causal (is_causal)
        meta = AttnMeta.build(slots, [ctx] * b, [n] * b, tm)
        q = torch.randn(b * n, heads, c, device=dev, dtype=torch.bfloat16)
        q_pe = torch.randn(b * n, heads, r, device=dev, dtype=torch.bfloat16)
        kv = torch.randn(total, c + r, device=dev, dtype=torch.bfloat16)
        ref = mla_attention_ref(q, q_pe, kv, meta, scale)
        nbytes = flashmla_bytes(b, ctx, n, heads, c, r)
        flops = b * n * heads * (ctx + n) * (4 * c + 2 * r)
        name = f"B={b} ctx={ctx} T={n} {kind} H={heads}"
        out = mla_attention(q, q_pe, kv, meta, scale)
        ms = timer(dev.type == "cuda", mla_attention, q, q_pe, kv, meta, scale)
        target = ("BW", nbytes / (ms / 1e3) / PEAK["bw"], 0.7) if (b, ctx, n) == (64, 4096, 1) else None
        rows.append(Row("mla", name, ms, nbytes, flops, "bf16", rel(out, ref), 2e-2, target))
        if fi_mla is not None and fi_mla.fits(q, q_pe, meta):
            out = fi_mla(q, q_pe, kv, meta, scale)
            ms = timer(True, fi_mla, q, q_pe, kv, meta, scale)
            rows.append(Row("flashinfer mla", name, ms, nbytes, flops, "bf16", rel(out, ref), 2e-2))
        del slots, kv, ref, out


def bench_gemm(rows: list[Row], dev: torch.device, smoke: bool, shapes: list[tuple[int, int, int]] | None = None,
               baseline: Callable[..., None] | None = None) -> None:
    """(M, N, K) cases, default DeepGEMM's; baseline(rows, a [M, K] bf16, w [N, K] fp8) adds a row to compare."""
    from specdec.kernels.fp8 import act_quant, act_quant_ref, fp8_gemm, fp8_gemm_ref, weight_quant_ref

    bn = bk = 32 if smoke else 128
    if shapes is None:
        shapes = [(8, 64, 96), (1, 48, 64)] if smoke else [(1, 7168, 2048), (16, 4096, 7168), *DEEPGEMM]
    for m, n, k in shapes:
        a = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        w, w_s = weight_quant_ref(torch.randn(n, k, device=dev) * 0.05, bn, bk)
        aq, a_s = act_quant(a, bk)
        out = fp8_gemm(aq, a_s, w, w_s, bn, bk, out_dtype=torch.bfloat16)
        err = rel(out, fp8_gemm_ref(aq, a_s, w, w_s, bn, bk))
        ms = timer(dev.type == "cuda", fp8_gemm, aq, a_s, w, w_s, bn, bk, out_dtype=torch.bfloat16)
        nbytes = m * k + n * k + m * n * 2 + (a_s.numel() + w_s.numel()) * 4
        flops = 2 * m * n * k
        target = None
        if (m, n, k) in DEEPGEMM:
            target = ("DeepGEMM", flops / (ms / 1e3) / 1e12 / DEEPGEMM[m, n, k], 0.6)
        rows.append(Row("fp8_gemm", f"M={m} N={n} K={k}", ms, nbytes, flops, "fp8", err, 1e-2, target))
        if baseline is not None:
            baseline(rows, a, w)
        if m >= 64 or smoke:
            q_ref, s_ref = act_quant_ref(a, bk)
            err = max(rel(aq.float(), q_ref.float()), rel(a_s, s_ref))
            ms = timer(dev.type == "cuda", act_quant, a, bk)
            rows.append(Row("act_quant", f"M={m} K={k}", ms, m * k * 3 + a_s.numel() * 4, 0, "fp8", err, 1e-6))


def bench_dequant(rows: list[Row], dev: torch.device, smoke: bool) -> None:
    """weight_dequant (FP8 weights to bf16, at load) against weight_dequant_ref."""
    from specdec.kernels.fp8 import weight_dequant, weight_dequant_ref, weight_quant_ref

    blk = 32 if smoke else 128
    for n, k in [(48, 80)] if smoke else [(7168, 2048), (2304, 7168)]:
        w, s = weight_quant_ref(torch.randn(n, k, device=dev), blk, blk)
        err = rel(weight_dequant(w, s, blk, blk), weight_dequant_ref(w, s, blk, blk))
        ms = timer(dev.type == "cuda", weight_dequant, w, s, blk, blk, dtype=torch.bfloat16)
        rows.append(Row("weight_dequant", f"N={n} K={k}", ms, n * k * 3 + s.numel() * 4, 0, "bf16", err, 0.0))


def bench_moe(rows: list[Row], dev: torch.device, smoke: bool, tp: int, tokens: list[int] | None = None) -> None:
    from specdec.kernels.fp8 import weight_quant_ref
    from specdec.kernels.moe import moe, moe_w8a8_ref

    if smoke:
        e_all, d, i, topk, blk, default = 8, 64, 32, 2, 32, [1, 6]
    else:
        e_all, d, i, topk, blk, default = 256, 7168, 2048, 8, 128, [1, 16, 64, 256]
    tokens = tokens or default
    e = e_all // tp  # expert parallel: this rank's experts, the rest routed elsewhere (-1)
    # bf16 activations on a GPU; the interpreter's f32 -> bf16 cast truncates, which moves fp8 rounding boundaries
    act = torch.bfloat16 if dev.type == "cuda" else torch.float32
    g13 = [weight_quant_ref(torch.randn(i, d, device=dev) * 0.02, blk, blk) for _ in range(2 * e)]
    w13 = torch.stack([torch.cat([g13[2 * j][0], g13[2 * j + 1][0]]) for j in range(e)])
    s13 = torch.stack([torch.cat([g13[2 * j][1], g13[2 * j + 1][1]]) for j in range(e)])
    del g13
    g2 = [weight_quant_ref(torch.randn(d, i, device=dev) * 0.02, blk, blk) for _ in range(e)]
    w2, s2 = torch.stack([q for q, _ in g2]), torch.stack([s for _, s in g2])
    del g2
    for t in tokens:
        x = torch.randn(t, d, device=dev, dtype=act)
        ids = torch.rand(t, e_all, device=dev).topk(topk, dim=-1).indices
        ids = torch.where(ids < e, ids, -1)  # this rank holds experts [0, e)
        w = torch.rand(t, topk, device=dev)
        out = moe(x, ids, w, w13, w2, s13, s2, (blk, blk))
        err = rel(out, moe_w8a8_ref(x, ids, w, w13, w2, s13, s2, (blk, blk)))
        ms = timer(dev.type == "cuda", moe, x, ids, w, w13, w2, s13, s2, (blk, blk))
        active = int(ids[ids >= 0].unique().numel())
        routed = int((ids >= 0).sum())
        nbytes = active * (3 * i * d + (s13[0].numel() + s2[0].numel()) * 4) + 2 * t * d * 2
        rows.append(Row("moe", f"T={t} E={e}/{e_all} top{topk} active={active}", ms, nbytes, 2 * routed * 3 * i * d,
                        "fp8", err, 2e-2))


def bench_flashinfer_sampling(rows: list[Row], dev: torch.device) -> None:
    """flashinfer's fused top-k/top-p sampling against torch's sort-based path; checks only that every sampled
    token lies in its row's top-k set (the draws themselves are random)."""
    import flashinfer

    b, vocab, k, p = 64, 129280, 50, 0.9
    logits = torch.randn(b, vocab, device=dev) * 3
    allowed = logits.topk(k, dim=-1).indices

    def torch_sample() -> torch.Tensor:
        top = logits.topk(k, dim=-1)
        probs = top.values.softmax(-1)
        keep = probs.cumsum(-1) - probs < p
        probs = torch.where(keep, probs, 0)
        return top.indices.gather(1, torch.multinomial(probs, 1))[:, 0]

    fi = lambda: flashinfer.sampling.top_k_top_p_sampling_from_logits(logits, k, p)
    nbytes = b * vocab * 4
    for name, fn in (("torch sampling", torch_sample), ("flashinfer sampling", fi)):
        ids = fn().long()
        bad = float((allowed != ids[:, None]).all(-1).float().mean())
        rows.append(Row(name, f"B={b} V={vocab} top{k} p={p}", timer(True, fn), nbytes, 0, "bf16", bad, 0.0))


def print_table(rows: list[Row], gpu: bool, device: str, elapsed: float) -> None:
    head = ["kernel", "case", "ms", "GB/s", "TFLOP/s", "%roof", "rel err", "check", "target"]
    cells = [head] + [r.cells(gpu) for r in rows]
    width = [max(len(c[j]) for c in cells) for j in range(len(head))]
    print(f"\n{device}: {len(rows)} cases in {elapsed:.0f} s; roofline {PEAK['bw'] / 1e12:.1f} TB/s, "
          f"{PEAK['bf16'] / 1e12:.0f} TFLOP/s bf16, {PEAK['fp8'] / 1e12:.0f} TFLOP/s fp8")
    for i, c in enumerate(cells):
        print("  ".join(x.ljust(w) for x, w in zip(c, width)).rstrip())
        if i == 0:
            print("  ".join("-" * w for w in width))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (the interpreter when there is no GPU)")
    ap.add_argument("--tp", type=int, default=8, help="heads 128/tp and experts 256/tp on this GPU (default 8)")
    ap.add_argument("--only", default="mla,gemm,moe,sampling", help="comma list of kernel groups")
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available()
    if not gpu:
        if not args.smoke:
            print("no GPU here: run with --smoke (tiny shapes in Triton's interpreter)", file=sys.stderr)
            return 2
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first kernel launch imports triton
    dev = torch.device("cuda" if gpu else "cpu")
    torch.manual_seed(0)
    try:
        import flashinfer  # noqa: F401

        has_fi = gpu
    except ImportError:
        has_fi = False
    only = set(args.only.split(","))
    rows: list[Row] = []
    t0 = time.time()
    with torch.inference_mode():
        if "gemm" in only:
            bench_gemm(rows, dev, args.smoke)
            bench_dequant(rows, dev, args.smoke)
        if "moe" in only:
            bench_moe(rows, dev, args.smoke, 1 if args.smoke else args.tp)
        if "mla" in only:
            bench_mla(rows, dev, args.smoke, 4 if args.smoke else 128 // args.tp, has_fi)
        if "sampling" in only and has_fi:
            bench_flashinfer_sampling(rows, dev)
    name = torch.cuda.get_device_name() if gpu else "cpu (Triton interpreter)"
    print_table(rows, gpu, name, time.time() - t0)
    return 0 if all(r.ok for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
