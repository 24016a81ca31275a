"""CPU ops bench (kernels/cpu_ops.py) on one thread: fp8_linear per code path against torch's float32 GEMM on the
dequantized weight (in the layout the model keeps on a CPU, W.T contiguous), at the bundled model's shapes and a few
DeepSeek-V3 ones; the M where dequantize-then-GEMM overtakes the register kernels; the fused MoE against
kernels/torch_backend.py's moe_sparse / moe_runs on dequantized experts; the BF16 head against a float32 GEMM;
kernels/cpu_fused.py's ops against the torch code each replaces (RMSNorm.forward, apply_rope, F.silu(a) * b,
Gate.forward, mqa_attention at contexts 64, 512 and 2048, the absorbed path's einsums) at T = 1 and 4, with an
empty-ish op (rms_norm at D = 8) for the floor: what one call costs, Python to kernel and back.

    python bench/cpu_ops_bench.py            # about a minute on one Zen 4 core
    python bench/cpu_ops_bench.py --quick    # the bundled shapes at M = 1 and 4, short rounds: a smoke run

GB/s counts the weight bytes one call reads (FP8 bytes and scales, BF16, or float32 for torch's GEMM; for the MoE the
chosen experts'), "x bw" divides that by this core's read bandwidth, measured in the same run (the sum of a 256 MB
tensor, best of 5). Paths run interleaved, one call each per round; best and median of the rounds, in microseconds.
Weights are random, one layer's worth; the register kernels' speed does not depend on the values. Each path calls
one weight again and again, so a weight that fits the caches (all of the bundled model's) is read from them, its
float32 copy too; a model step reads each weight once among all the others, from memory where they do not fit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F

from specdec.cli.common import format_table
from specdec.kernels import cpu_fused, cpu_ops
from specdec.kernels.attn_meta import AttnMeta
from specdec.kernels.fp8 import weight_quant_ref
from specdec.kernels.torch_backend import moe_runs, moe_sparse, mqa_attention
from specdec.model.config import ModelConfig
from specdec.model.layers import RMSNorm, apply_rope, transposed_storage
from specdec.model.moe import Gate

CONFIG = Path(cpu_ops.__file__).resolve().parents[1] / "specdec" / "bundled" / "config.json"
V3 = {"q_a_proj": (1536, 7168), "kv_a_proj": (576, 7168), "expert gate+up": (4096, 7168), "expert down": (7168, 2048)}
MS = (1, 4, 16, 64, 256)
SWEEP = (8, 16, 24, 32, 48, 64, 96, 128)  # the crossover's neighbourhood
PORTABLE_FMAS = 2e8  # the scalar path above this many multiply-adds a call is left out (seconds a call)


def bundled_shapes() -> dict[str, tuple[int, int]]:
    """[N, K] of the bundled model's FP8 linears, one of each kind, from its config.json."""
    c = json.loads(CONFIG.read_text())
    h, d, heads = c["hidden_size"], c["qk_nope_head_dim"], c["num_attention_heads"]
    return {"q_a_proj": (c["q_lora_rank"], h), "q_b_proj": (heads * (d + c["qk_rope_head_dim"]), c["q_lora_rank"]),
            "kv_a_proj": (c["kv_lora_rank"] + c["qk_rope_head_dim"], h),
            "kv_b_proj": (heads * (d + c["v_head_dim"]), c["kv_lora_rank"]), "o_proj": (h, heads * c["v_head_dim"]),
            "mlp gate+up": (2 * c["intermediate_size"], h), "mlp down": (h, c["intermediate_size"]),
            "expert gate+up": (2 * c["moe_intermediate_size"], h), "expert down": (h, c["moe_intermediate_size"])}


def read_bandwidth() -> float:
    """This core's read bandwidth in bytes/s: a 256 MB sum, best of 5."""
    big = torch.ones(2**26)
    best = min(_time(big.sum) for _ in range(5))
    return big.numel() * 4 / best


def _time(fn: Callable[[], object]) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved(paths: dict[str, Callable[[], object]], budget: float) -> dict[str, tuple[float, float]]:
    """path -> (best, median) seconds: one warm-up call each, then rounds of one call each, as many as fit the
    budget (3 to 40)."""
    first = {name: _time(fn) for name, fn in paths.items()}
    rounds = max(3, min(40, int(budget / max(sum(first.values()), 1e-9))))
    runs: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, fn in paths.items():
            runs[name].append(_time(fn))
    return {name: (min(t), statistics.median(t)) for name, t in runs.items()}


def fp8_weight(n: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    return weight_quant_ref(torch.randn(n, k) * 0.05)


def cells(us_bytes: tuple[float, float], nbytes: float, bw: float, base: float) -> list[str]:
    best, med = us_bytes
    return [f"{best * 1e6:.1f}", f"{med * 1e6:.1f}", f"{nbytes / best / 1e9:.1f}", f"{nbytes / best / bw:.2f}",
            f"{base / best:.2f}"]


def linear_table(shapes: dict[str, tuple[int, int]], model: str, ms: tuple[int, ...], bw: float,
                 budget: float) -> list[list[str]]:
    rows = []
    isas = cpu_ops.isas()
    for name, (n, k) in shapes.items():
        w, s = fp8_weight(n, k)
        wt = cpu_ops.dequant_ref(w, s).t().contiguous()  # [K, N]: the model's float32 layout on a CPU
        fp8_bytes, f32_bytes = w.numel() + s.numel() * 4, wt.numel() * 4
        for m in ms:
            x = torch.randn(m, k)
            paths = {f"fp8 {isa}": partial(cpu_ops.fp8_linear, x, w, s, isa=isa, gemm_rows=10**9)
                     for isa in isas if isa != "portable" or m * n * k <= PORTABLE_FMAS}
            paths["fp8 dequant+GEMM"] = partial(cpu_ops.fp8_linear, x, w, s, gemm_rows=1)
            paths["fp8 auto"] = partial(cpu_ops.fp8_linear, x, w, s)
            paths["fp32 torch.mm"] = partial(torch.matmul, x, wt)
            t = interleaved(paths, budget)
            base = t["fp32 torch.mm"][0]
            for path, tt in t.items():
                nbytes = f32_bytes if path.startswith("fp32") else fp8_bytes
                rows.append([f"{model} {name} {n}x{k}", str(m), path, *cells(tt, nbytes, bw, base)])
    return rows


def crossover(shapes: dict[str, tuple[int, int]], budget: float) -> list[list[str]]:
    """Per shape and M of SWEEP: the best register kernel's time over dequantize-then-GEMM's (> 1: GEMM wins), the
    first M from which GEMM keeps winning, and the default route's worst time over the faster of the two."""
    rows = []
    isa = cpu_ops.isas()[0]
    for name, (n, k) in shapes.items():
        w, s = fp8_weight(n, k)
        ratios, auto = [], []
        for m in SWEEP:
            x = torch.randn(m, k)
            t = interleaved({"rows": partial(cpu_ops.fp8_linear, x, w, s, isa=isa, gemm_rows=10**9),
                             "gemm": partial(cpu_ops.fp8_linear, x, w, s, gemm_rows=1),
                             "auto": partial(cpu_ops.fp8_linear, x, w, s)}, budget)
            ratios.append(t["rows"][0] / t["gemm"][0])
            auto.append(t["auto"][0] / min(t["rows"][0], t["gemm"][0]))
        start = next((i for i in range(len(SWEEP)) if all(r > 1 for r in ratios[i:])), None)
        rows.append([f"{name} {n}x{k}", *(f"{r:.2f}" for r in ratios),
                     str(SWEEP[start]) if start is not None else f">{SWEEP[-1]}", f"{max(auto):.2f}"])
    return rows


def moe_table(model: str, e: int, topk: int, d: int, inter: int, bw: float, budget: float) -> list[list[str]]:
    """fp8_moe against moe_sparse / moe_runs on the dequantized experts in the CPU layout (w13[e].T contiguous)."""
    w13, s13 = zip(*[_gate_up(d, inter) for _ in range(e)])
    w2, s2 = zip(*[fp8_weight(d, inter) for _ in range(e)])
    w13, s13, w2, s2 = torch.stack(w13), torch.stack(s13), torch.stack(w2), torch.stack(s2)
    f13 = torch.stack([torch.cat([cpu_ops.dequant_ref(w[:inter], s[:len(s) // 2]),
                                  cpu_ops.dequant_ref(w[inter:], s[len(s) // 2:])]) for w, s in zip(w13, s13)])
    f2 = torch.stack([cpu_ops.dequant_ref(w, s) for w, s in zip(w2, s2)])
    f13, f2 = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (f13, f2))  # model.lay_out_for_cpu
    rows = []
    for t in (1, 4):
        x = torch.randn(t, d)
        ids = torch.stack([torch.randperm(e)[:topk] for _ in range(t)])
        tw = torch.rand(t, topk)
        chosen = len(set(ids.flatten().tolist()))
        fp8_bytes = chosen * (w13[0].numel() + w2[0].numel() + 4 * (s13[0].numel() + s2[0].numel()))
        paths = {f"fp8_moe {isa}": partial(cpu_ops.fp8_moe, x, ids, tw, w13, w2, s13, s2, isa=isa)
                 for isa in cpu_ops.isas() if isa != "portable" or d * inter * e * t <= PORTABLE_FMAS}
        paths["fp32 moe_sparse"] = partial(moe_sparse, x, ids, tw, f13, f2)
        paths["fp32 moe_runs"] = partial(moe_runs, x, ids, tw, f13, f2)
        tt = interleaved(paths, budget)
        base = min(tt["fp32 moe_sparse"][0], tt["fp32 moe_runs"][0])
        for path, v in tt.items():
            rows.append([f"{model} {e} experts top-{topk} D={d} I={inter}", str(t), path,
                         *cells(v, fp8_bytes * (4 if path.startswith("fp32") else 1), bw, base)])
    return rows


def _gate_up(d: int, inter: int) -> tuple[torch.Tensor, torch.Tensor]:
    (wg, sg), (wu, su) = fp8_weight(inter, d), fp8_weight(inter, d)
    return torch.cat([wg, wu]), torch.cat([sg, su])


def head_table(shapes: dict[str, tuple[int, int]], ms: tuple[int, ...], bw: float, budget: float) -> list[list[str]]:
    rows = []
    for name, (v, d) in shapes.items():
        w = (torch.randn(v, d) * 0.05).bfloat16()
        wt = w.float().t().contiguous()
        for m in ms:
            x = torch.randn(m, d)
            paths = {f"bf16 {isa}": partial(cpu_ops.bf16_linear, x, w, isa=isa, gemm_rows=10**9)
                     for isa in cpu_ops.isas() if isa != "portable" or m * v * d <= PORTABLE_FMAS}
            paths["bf16 auto"] = partial(cpu_ops.bf16_linear, x, w)
            paths["fp32 torch.mm"] = partial(torch.matmul, x, wt)
            tt = interleaved(paths, budget)
            for path, t in tt.items():
                nbytes = w.numel() * (4 if path.startswith("fp32") else 2)
                rows.append([f"{name} {v}x{d}", str(m), path, *cells(t, nbytes, bw, tt["fp32 torch.mm"][0])])
    return rows


HEAD = ["us best", "us median", "GB/s", "x bw", "vs fp32"]
CONTEXTS = (64, 512, 2048)


def fused_table(cfg: ModelConfig, ts: tuple[int, ...], budget: float) -> list[list[str]]:
    """kernels/cpu_fused.py's ops per code path against the torch code each replaces, at the bundled model's shapes;
    rms_norm at D = 8 shows the floor: a call's own overhead. Rows: op and shape, T, path, best and median us, the
    speed over torch's best."""
    d, h, c, r = cfg.hidden_size, cfg.num_attention_heads, cfg.kv_lora_rank, cfg.qk_rope_head_dim
    dn, dv, inter, e = cfg.qk_nope_head_dim, cfg.v_head_dim, cfg.moe_intermediate_size, cfg.n_routed_experts
    gate = Gate(cfg)
    gate.weight.normal_(0, 0.05)
    transposed_storage(gate.weight)  # the CPU layout (MoE.lay_out_for_cpu)
    route = (gate.e_score_correction_bias, cfg.n_group, cfg.topk_group, cfg.num_experts_per_tok, cfg.norm_topk_prob,
             cfg.routed_scaling_factor)
    w, s = fp8_weight(h * (dn + dv), c)
    wkvb = cpu_ops.dequant_ref(w, s).view(h, dn + dv, c)  # the absorbed path's float32 kv_b
    norm, norm8 = RMSNorm(d, cfg.rms_norm_eps, torch.float32), RMSNorm(8, cfg.rms_norm_eps, torch.float32)
    rows = []
    for t in ts:
        x, res = torch.randn(t, d), torch.randn(t, d)
        cos, sin = torch.randn(t, r // 2), torch.randn(t, r // 2)
        q = torch.randn(t, h, dn + r)
        hid = torch.randn(t, 2 * inter)
        q_nope, o_lat = torch.randn(t, h, dn), torch.randn(t, h, c)
        cases = {
            f"rms_norm D={d}": (partial(cpu_fused.rms_norm, x, norm.weight, norm.eps), partial(norm.forward, x)),
            "rms_norm D=8 (the floor)": (partial(cpu_fused.rms_norm, x[:, :8].contiguous(), norm8.weight, norm.eps),
                                         partial(norm8.forward, x[:, :8].contiguous())),
            f"add_rms_norm D={d}": (partial(cpu_fused.add_rms_norm, x, res, norm.weight, norm.eps),
                                    partial(_add_then_norm, norm, x, res)),
            f"rope q_pe [T, {h}, {r}] of [T, {h}, {dn + r}]": (partial(cpu_fused.rope, q[..., dn:], cos, sin),
                                                              partial(apply_rope, q[..., dn:], (cos, sin))),
            f"silu_mul I={inter}": (partial(cpu_fused.silu_mul, hid), partial(_silu_times_up, hid)),
            f"moe_route {e} experts, {cfg.n_group} groups": (partial(cpu_fused.moe_route, x, gate.weight, *route),
                                                              partial(gate.forward, x)),
            f"fp8_absorb_q [T, {h}, {dn}] -> C={c}": (
                partial(cpu_fused.fp8_absorb_q, q_nope, w, s, (128, 128), (0, 0), dn, dv),
                partial(torch.einsum, "thd,hdc->thc", q_nope, wkvb[:, :dn])),
            f"fp8_absorb_o C={c} -> [T, {h}, {dv}]": (
                partial(cpu_fused.fp8_absorb_o, o_lat, w, s, (128, 128), (0, 0), dn, dv),
                partial(torch.einsum, "thc,hvc->thv", o_lat, wkvb[:, dn:])),
        }
        for ctx in CONTEXTS:
            kv = torch.randn(ctx + t, c + r)
            meta = AttnMeta.contiguous(torch.zeros(1, dtype=torch.long), [ctx], [t])  # a chain of t new tokens
            qa = torch.randn(t, h, c + r)
            tensors = (meta.block_table, meta.ctx_lens, meta.cu_q, meta.tree_mask)
            cases[f"mla_attention context {ctx}"] = (
                partial(cpu_fused.mla_attention, qa, kv, *tensors, cfg.softmax_scale, c),
                partial(mqa_attention, qa, kv, meta, cfg.softmax_scale, c))
        for name, (op, torch_op) in cases.items():
            paths = {isa: partial(op, isa=isa) for isa in cpu_ops.isas()} | {"torch": torch_op}
            tt = interleaved(paths, budget)
            rows += [[name, str(t), path, f"{b * 1e6:.1f}", f"{m * 1e6:.1f}", f"{tt['torch'][0] / b:.2f}"]
                     for path, (b, m) in tt.items()]
    return rows


def _add_then_norm(norm: RMSNorm, x: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
    return norm.forward(x + res)  # a decoder block's residual step (model/transformer.py)


def _silu_times_up(h: torch.Tensor) -> torch.Tensor:
    i = h.shape[1] // 2
    return F.silu(h[:, :i]) * h[:, i:]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--quick", action="store_true", help="the bundled shapes at M = 1 and 4, short rounds")
    args = p.parse_args(argv)
    if not cpu_ops.available():
        raise SystemExit(f"cpu_ops_bench: the CPU ops did not build: {cpu_ops.unavailable_reason()}")
    torch.set_num_threads(1)
    torch.manual_seed(0)
    budget = 0.05 if args.quick else 0.4
    ms = (1, 4) if args.quick else MS
    bundled = bundled_shapes()
    bw = read_bandwidth()
    print(f"torch {torch.__version__}, one thread; paths on this CPU: {', '.join(cpu_ops.isas())}; "
          f"read bandwidth {bw / 1e9:.1f} GB/s")
    rows = linear_table(bundled, "bundled", ms, bw, budget)
    if not args.quick:
        rows += linear_table(V3, "V3", ms, bw, budget)
    print("\nfp8_linear (vs fp32: speed over torch.mm on the float32 weight)")
    print(format_table(["weight [N x K]", "M", "path", *HEAD], rows, "lrl" + "r" * len(HEAD)))
    if not args.quick:
        print(f"\ndequantize+GEMM vs the {cpu_ops.isas()[0]} register kernel: time ratio register / GEMM (> 1: GEMM "
              "wins); auto worst: the default route's time over the faster one's, at its worst M")
        shapes = {f"bundled {k}": bundled[k] for k in ("q_b_proj", "mlp gate+up", "mlp down")}
        x_rows = crossover(shapes | {f"V3 {k}": v for k, v in V3.items()}, budget)
        print(format_table(["weight", *(f"M={m}" for m in SWEEP), "GEMM from M", "auto worst"], x_rows))
    c = json.loads(CONFIG.read_text())
    moe = [("bundled", c["n_routed_experts"], c["num_experts_per_tok"], c["hidden_size"], c["moe_intermediate_size"])]
    if not args.quick:
        moe.append(("V3", 8, 8, 7168, 2048))  # 8 of V3's 256 experts, all chosen: a verify step's union is up to 32
    print("\nrouted experts, T tokens (vs fp32: speed over the faster of moe_sparse / moe_runs)")
    m_rows = [r for spec in moe for r in moe_table(*spec, bw, budget)]
    print(format_table(["experts", "T", "path", *HEAD], m_rows, "lrl" + "r" * len(HEAD)))
    heads = {"bundled head": (c["vocab_size"], c["hidden_size"])}
    if not args.quick:
        heads["V3 head, a TP-8 shard"] = (129280 // 8, 7168)
    print("\nBF16 head (vs fp32: speed over torch.mm on the float32 weight)")
    h_rows = head_table(heads, (1, 2, 4) if not args.quick else (1,), bw, budget)
    print(format_table(["head [V x D]", "M", "path", *HEAD], h_rows, "lrl" + "r" * len(HEAD)))
    print("\nkernels/cpu_fused.py's ops against the torch code each replaces (vs torch: speed over it), the bundled "
          "model's shapes, T tokens")
    f_rows = fused_table(ModelConfig.from_dict(c), (1, 4), budget)
    print(format_table(["op", "T", "path", "us best", "us median", "vs torch"], f_rows, "lrlrrr"))


if __name__ == "__main__":
    main()
