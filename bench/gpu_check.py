"""One-shot GPU check: what the CPU-only work could not verify, in one run that writes one JSON file.

    python bench/gpu_check.py --out gpu_check.json        # on a lent H200: under 8 minutes
    python bench/gpu_check.py --smoke --out check.json    # tiny shapes on the CPU (Triton's interpreter)

Sections, in order; one that would start after --budget seconds is recorded as skipped:
  kernels  every Triton kernel against its reference at DeepSeek-V3's TP=8 per-rank shapes (bench/kernel_bench.py)
  gemm     FP8 GEMM TFLOPS at M = 1..128 on the per-rank linears, beside torch._scaled_mm (per-tensor scales,
           cuBLAS) where the device has FP8
  mla      MLA decode bandwidth (bytes by FlashMLA's formula), the Triton kernel and flashinfer's where installed
  model    a random-weight DeepSeek-V3 with the release's per-layer dimensions, 4 layers (1 dense, 3 MoE) and the
           MTP layer, decoded greedily without and with MTP: equal tokens, tokens/s, host syncs per step (counted
           with torch.cuda.set_sync_debug_mode), the load-time warm-up's seconds; for triton and flashinfer
  graphs   the same model decoded greedily, plain and with MTP (k=3 at every step), at batch sizes 1 to 64, by
           an engine that replays CUDA graphs and by an eager one (specdec/cuda_graphs.py): equal tokens, tokens/s
           of both (after a first pass that captures), the graphs replayed per bucket, host syncs per step;
           --smoke runs the padded graph path eagerly on the CPU, under the host-read guard
Exit status 1 when a kernel disagrees with its reference, MTP decoding changes the greedy tokens, or graph replay
changes them.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.util
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def _bench_kernels() -> Any:
    """bench/kernel_bench.py as a module (a file beside this one, not a package)."""
    spec = importlib.util.spec_from_file_location("bench_kernels", Path(__file__).with_name("kernel_bench.py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


kbench = _bench_kernels()

# DeepSeek-V3's release config.json, but 4 layers (the first dense) plus its MTP layer
RELEASE_DIMS = dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                    num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=128, num_key_value_heads=128,
                    q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                    n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4,
                    routed_scaling_factor=2.5, num_nextn_predict_layers=1, max_position_embeddings=4096,
                    rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                  "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})
FP8_BLOCKS = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic"}
# TP=8 per-rank FP8 linears (N, K): q_a, q_b, kv_a, o_proj, dense gate/up, dense down, shared gate/up, shared down
PER_RANK_LINEARS = [(1536, 7168), (3072, 1536), (576, 7168), (7168, 2048), (2304, 7168), (7168, 2304), (256, 7168),
                    (7168, 256)]


def row_json(r: kbench.Row) -> dict[str, Any]:
    s = r.ms / 1e3
    return {**dataclasses.asdict(r), "ok": r.ok, "GB/s": r.nbytes / s / 1e9 if s else None,
            "TFLOP/s": r.flops / s / 1e12 if s else None}


def scaled_mm_baseline(gpu: bool) -> Callable[..., None] | None:
    """A bench_gemm baseline: torch._scaled_mm on the same FP8 weights, activations FP8 with one per-tensor scale."""
    if not gpu or torch.cuda.get_device_capability() < (8, 9):
        return None

    def run(rows: list[kbench.Row], a: torch.Tensor, w: torch.Tensor) -> None:
        (m, k), n = a.shape, w.shape[0]
        sa = a.float().abs().amax().clamp_min(1e-12) / 448.0
        aq, one = (a.float() / sa).to(torch.float8_e4m3fn), torch.ones((), device=a.device)
        case = f"M={m} N={n} K={k}"
        try:
            fn = lambda: torch._scaled_mm(aq, w.t(), scale_a=sa, scale_b=one, out_dtype=torch.bfloat16)
            err = kbench.rel(fn(), (aq.float() * sa) @ w.float().t())
            ms = kbench.timer(True, fn)
        except (RuntimeError, ValueError) as e:  # shapes cuBLAS's FP8 GEMM does not take (M < 16 on some builds)
            rows.append(kbench.Row("scaled_mm", f"{case} unsupported: {str(e).splitlines()[0][:80]}", 0, 0, 0,
                                   "fp8", 0.0, 0.0))
            return
        rows.append(kbench.Row("scaled_mm", case, ms, m * k + n * k + m * n * 2, 2 * m * n * k, "fp8", err, 1e-2))

    return run


def section_kernels(dev: torch.device, smoke: bool, fi: bool) -> list[dict[str, Any]]:
    rows: list[kbench.Row] = []
    kbench.bench_dequant(rows, dev, smoke)
    kbench.bench_moe(rows, dev, smoke, 1 if smoke else 8, None if smoke else [1, 16, 64, 256])
    trees = None if smoke else [(64, 4096, n, "tree") for n in (4, 16)] + [(8, 4096, 4, "chain"), (1, 32768, 8, "tree")]
    kbench.bench_mla(rows, dev, smoke, 4 if smoke else 16, fi, trees)
    return [row_json(r) for r in rows]


def section_gemm(dev: torch.device, smoke: bool) -> list[dict[str, Any]]:
    rows: list[kbench.Row] = []
    shapes = None if smoke else [(m, n, k) for n, k in PER_RANK_LINEARS for m in (1, 2, 4, 8, 16, 32, 64, 128)]
    kbench.bench_gemm(rows, dev, smoke, shapes, scaled_mm_baseline(dev.type == "cuda"))
    return [row_json(r) for r in rows]


def section_mla(dev: torch.device, smoke: bool, fi: bool) -> list[dict[str, Any]]:
    rows: list[kbench.Row] = []
    decode = [(b, ctx, 1, "decode") for b, ctx in [(1, 4096), (16, 4096), (64, 1024), (64, 4096), (128, 4096),
                                                   (64, 16384)]]
    kbench.bench_mla(rows, dev, smoke, 4 if smoke else 16, fi, None if smoke else decode)
    if not smoke:  # TP=1: all 128 heads on one GPU
        kbench.bench_mla(rows, dev, smoke, 128, fi, decode[:3])
    out = [row_json(r) for r in rows]
    for r in out:
        r["HBM fraction"] = r["GB/s"] * 1e9 / kbench.PEAK["bw"] if r["GB/s"] and dev.type == "cuda" else None
    return out


def random_model(config: dict[str, Any], dev: torch.device, dtype: torch.dtype, backend: Any, seed: int = 0) -> Any:
    """DeepseekV3 with random weights built on `dev` directly (no checkpoint): FP8 codes ~ N(0, 1) with block
    scales 1/sqrt(fan-in), other matrices N(0, 1/fan-in), norms 1, router biases 0."""
    from specdec.model.config import ModelConfig
    from specdec.model.layers import Linear, RMSNorm
    from specdec.model.transformer import DeepseekV3

    cfg = ModelConfig.from_dict(config)
    with torch.device(dev):
        model = DeepseekV3(cfg, dtype=dtype, backend=backend, keep_fp8=backend.keep_fp8)
    g = torch.Generator(dev).manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            for name, p in mod.named_parameters(recurse=False):
                if isinstance(mod, RMSNorm):
                    p.fill_(1.0)
                elif name == "weight_scale_inv":
                    p.fill_(mod.in_features ** -0.5 if isinstance(mod, Linear) else 1.0)
                elif p.dtype == torch.float8_e4m3fn:
                    p.copy_(torch.randn(p.shape, generator=g, device=dev).to(p.dtype))
                elif name == "e_score_correction_bias":
                    p.zero_()
                else:
                    p.copy_(torch.randn(p.shape, generator=g, device=dev) * p.shape[-1] ** -0.5)
    model.finalize()
    return model.eval()


def make_engine(model: Any, spec: Any, prompts: list[list[int]], max_tokens: int, dev: torch.device,
                dtype: torch.dtype, graphs: bool = False) -> Any:
    """An engine with room for the prompts at once; graphs: its decode forwards from CUDA graphs (on a CPU, the
    padded graph path run eagerly under the host-read guard)."""
    from specdec.engine import Engine

    need = sum(len(p) + max_tokens + 64 for p in prompts)
    e = Engine(model, spec, dev, dtype, seed=0, kv_cache_tokens=64 * (need // 64 + len(prompts) + 1),
               max_num_seqs=max(len(prompts), 1))
    if graphs:
        e.runner.use_graphs(e.scheduler.max_num_seqs)
    return e


def decode(model: Any, spec: Any, prompts: list[list[int]], max_tokens: int, dev: torch.device,
           dtype: torch.dtype, engine: Any = None, **extra: Any) -> tuple[list[list[int]], float, int]:
    """Greedy decoding through `engine` (default: a new one; extra: more SamplingParams): (generated tokens per
    prompt, seconds, engine steps). With make_engine, the functions that know the engine's API."""
    from specdec.params import SamplingParams

    engine = engine or make_engine(model, spec, prompts, max_tokens, dev, dtype)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **extra)
    t0 = time.perf_counter()
    reqs = [engine.add(p, params) for p in prompts]
    while engine.has_unfinished:
        engine.step()
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    seconds = time.perf_counter() - t0
    reqs = dict(enumerate(reqs))
    return [reqs[i].generated for i in range(len(prompts))], seconds, max(r.metrics.num_steps for r in reqs.values())


def count_syncs(dev: torch.device, fn: Callable[[], Any]) -> tuple[Any, int | None]:
    """fn()'s result and how many host syncs it made (None off CUDA), from torch's sync debug warnings."""
    if dev.type != "cuda":
        return fn(), None
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            out = fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return out, sum("synchroniz" in str(w.message) for w in seen)


@functools.cache
def release_model(dev: torch.device, smoke: bool) -> tuple[Any, dict[str, Any], torch.dtype, float]:
    """The random-weight model that the model and graphs sections decode, built once: (model, its config.json
    dict, dtype, seconds to build). The release's per-layer dimensions, 4 layers (2 small ones with --smoke)."""
    from specdec.kernels.backend import Backend
    from specdec.model.checkpoint import tiny_config

    fp8 = {**FP8_BLOCKS, "weight_block_size": [32, 32] if smoke else [128, 128]}
    config = tiny_config(**({"num_hidden_layers": 2} if smoke else RELEASE_DIMS), quantization_config=fp8)
    dtype = torch.float32 if smoke else torch.bfloat16
    t0 = time.perf_counter()
    model = random_model(config, dev, dtype, Backend.resolve("triton", dev))
    return model, config, dtype, time.perf_counter() - t0


def use_backend(model: Any, backend: Any) -> None:
    for m in model.modules():  # every layer holds the backend it was built with
        if hasattr(m, "backend"):
            m.backend = backend


def random_prompts(config: dict[str, Any], n: int, length: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(2, config["vocab_size"], (length,), generator=g).tolist() for _ in range(n)]


def section_model(dev: torch.device, smoke: bool, backends: list[str]) -> dict[str, Any]:
    from specdec.kernels.backend import Backend
    from specdec.kernels.warmup import ModelShape, model_cases, warmup
    from specdec.params import SpecConfig

    model, config, dtype, build_s = release_model(dev, smoke)
    n_prompts, prompt_len, max_tokens = (2, 8, 4) if smoke else (2, 32, 32)
    prompts = random_prompts(config, n_prompts, prompt_len)
    spec = SpecConfig(num_speculative_tokens=3)
    out: dict[str, Any] = {"config": {k: config[k] for k in ("num_hidden_layers", "hidden_size", "n_routed_experts")},
                           "build_s": build_s, "runs": {}}
    shape = ModelShape.of(model.cfg)
    steps = [(n_prompts, 1, prompt_len + max_tokens), (n_prompts, spec.num_speculative_tokens + 1,
                                                       prompt_len + max_tokens), (1, prompt_len, 0)]
    for name in backends:
        backend = Backend.resolve(name, dev)
        use_backend(model, backend)
        run: dict[str, Any] = {}
        if dev.type == "cuda":
            run["warmup_s"] = warmup(backend, model_cases(shape, 1, steps, fp8=backend.keep_fp8), dev, dtype)
        for label, s in (("plain", None), ("mtp", spec)):
            first = decode(model, s, prompts, max_tokens, dev, dtype)[1]  # compiles whatever the warm-up missed
            (tokens, seconds, steps_n), syncs = count_syncs(dev, lambda s=s: decode(model, s, prompts, max_tokens,
                                                                                   dev, dtype))
            run[label] = {"tokens": tokens, "first_run_s": first, "seconds": seconds, "steps": steps_n,
                          "tokens_per_s": n_prompts * max_tokens / seconds, "syncs": syncs,
                          "syncs_per_step": syncs / steps_n if syncs is not None else None}
        # the target adjustments and logprobs on the device: still the plain tokens with MTP
        extra = dict(presence_penalty=0.5, repetition_penalty=1.3, logit_bias={prompts[0][0]: -100.0},
                     min_tokens=2, logprobs=2)
        adjusted = [decode(model, s, prompts, max_tokens, dev, dtype, **extra)[0] for s in (None, spec)]
        run["lossless"] = run["plain"]["tokens"] == run["mtp"]["tokens"] and adjusted[0] == adjusted[1]
        run["adjusted_lossless"] = adjusted[0] == adjusted[1]
        run["speedup"] = run["mtp"]["tokens_per_s"] / run["plain"]["tokens_per_s"]
        out["runs"][name] = run
    return out


def section_graphs(dev: torch.device, smoke: bool) -> dict[str, Any]:
    """Per batch size, plain and MTP (k=3): an eager engine and one replaying graphs, each decoding the prompts
    twice (the first pass compiles, and captures each bucket it meets; the second is timed; --smoke: once)."""
    from specdec.kernels.backend import Backend
    from specdec.params import SpecConfig

    model, config, dtype, _ = release_model(dev, smoke)
    use_backend(model, Backend.resolve("triton", dev))
    prompt_len, max_tokens = (8, 4) if smoke else (32, 32)
    out: dict[str, Any] = {"batches": []}
    for batch in [3] if smoke else [1, 2, 3, 8, 16, 32, 64]:  # 3: a padded bucket (4)
        prompts = random_prompts(config, batch, prompt_len)
        row: dict[str, Any] = {"batch": batch}
        # k=3 at every step (adaptive speculation would pick each step's drafts from its measured costs)
        for label, spec in (("plain", None), ("mtp", SpecConfig(num_speculative_tokens=3, adaptive=False))):
            runs, tokens = {}, {}
            for mode in ("eager", "graphs"):
                e = make_engine(model, spec, prompts, max_tokens, dev, dtype, graphs=mode == "graphs")
                run = functools.partial(decode, model, spec, prompts, max_tokens, dev, dtype, e)
                first = None if smoke else run()[1]  # --smoke: one pass, which times nothing that matters
                (tokens[mode], seconds, steps), syncs = count_syncs(dev, run)
                runs[mode] = {"first_pass_s": first, "seconds": seconds, "steps": steps,
                              "tokens_per_s": batch * max_tokens / seconds,
                              "syncs_per_step": syncs / steps if syncs is not None else None}
                if e.runner.graphs is not None:
                    runs[mode]["replays"] = {f"{'main' if k.layer is None else f'mtp{k.layer}'} seqs={k.seqs} n={k.n}":
                                             v for k, v in e.runner.graphs.replays.items()}
            row[label] = {**runs, "equal": tokens["eager"] == tokens["graphs"],
                          "speedup": runs["graphs"]["tokens_per_s"] / runs["eager"]["tokens_per_s"]}
        out["batches"].append(row)
    out["equal"] = all(r[label]["equal"] for r in out["batches"] for label in ("plain", "mtp"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes; without a GPU in Triton's interpreter")
    ap.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON report (default %(default)s)")
    ap.add_argument("--budget", type=float, default=420, help="seconds after which no new section starts")
    ap.add_argument("--only", default="kernels,gemm,mla,model,graphs", help="comma list of sections")
    args = ap.parse_args(argv)
    gpu = torch.cuda.is_available()
    if not gpu and not args.smoke:
        print("no GPU here: run with --smoke (tiny shapes in Triton's interpreter)", file=sys.stderr)
        return 2
    if not gpu:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first kernel launch imports triton
    dev = torch.device("cuda" if gpu else "cpu")
    try:
        import flashinfer

        fi_version = flashinfer.__version__ if gpu else None
    except ImportError:
        fi_version = None
    report: dict[str, Any] = {"device": torch.cuda.get_device_name() if gpu else f"cpu {platform.processor()}",
                              "torch": torch.__version__, "flashinfer": fi_version, "smoke": args.smoke,
                              "sections": {}, "skipped": []}
    t0 = time.perf_counter()
    torch.manual_seed(0)
    sections = {"kernels": lambda: section_kernels(dev, args.smoke, fi_version is not None),
                "gemm": lambda: section_gemm(dev, args.smoke),
                "mla": lambda: section_mla(dev, args.smoke, fi_version is not None),
                "model": lambda: section_model(dev, args.smoke, ["triton"] + ["flashinfer"] * (fi_version is not None)),
                "graphs": lambda: section_graphs(dev, args.smoke)}
    for name in args.only.split(","):
        if time.perf_counter() - t0 > args.budget:
            report["skipped"].append(name)
            continue
        s0 = time.perf_counter()
        with torch.inference_mode():
            report["sections"][name] = sections[name]()
        print(f"{name}: {time.perf_counter() - s0:.0f} s", file=sys.stderr)
    report["elapsed_s"] = time.perf_counter() - t0
    rows = [r for k in ("kernels", "gemm", "mla") for r in report["sections"].get(k, [])]
    runs = report["sections"].get("model", {}).get("runs", {})
    report["ok"] = all(r["ok"] for r in rows) and all(r["lossless"] for r in runs.values()) and \
        report["sections"].get("graphs", {}).get("equal", True)
    args.out.write_text(json.dumps(report, indent=1))
    print(f"{args.out}: ok={report['ok']} in {report['elapsed_s']:.0f} s; skipped {report['skipped'] or 'none'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
