"""`specdec bench latency`: the same requests with and without MTP on one loaded model, warmed up, interleaved batch by
batch over --runs runs; with adaptive speculation (the default) its fixed shape runs in the same rotation, so adaptive,
fixed and no MTP are compared in one run. Reports tokens/s, ms/token, time to first token, mean accepted length and the
speedups measured in this same run (overall, per run, best and median). Then the floor: the kernels that ran, the loaded
model's resident weight bytes, this machine's one-core read bandwidth measured in the same run, and each step's time as
a multiple of the time its weights take to read at that bandwidth (the bytes one step of the first request reads,
specdec/profiling.py; on a CPU with the torch backend). --profile adds the aten ops of one plain step, one verify step
and the drafting.

Requests run one at a time (--batch-size 1) and generate exactly --max-tokens (EOS ignored), greedy unless
--temperature is set. Without --input-file, the built-in held-out prompts (specdec.prompts) are used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from typing import Any

from ..benchmark import latency_ab
from ..profiling import StepProfile, kernels_ran, profile_steps
from ..roofline import REPEATS, read_bandwidth, resident_weight_bytes, step_floor
from . import common

MB = 1e6


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _runs(xs: list[float]) -> str:
    return f"per run: {' '.join(f'{x:.2f}x' for x in xs)}; best {max(xs):.2f}x, median {statistics.median(xs):.2f}x"


def format_report(r: dict, header: str | None = None) -> str:
    """The comparison table (MTP as configured, adaptive speculation's fixed shape when it ran, no MTP), the
    speedups (overall, per run, best and median), and a decode step's cost split into drafting and verifying, also
    as fractions of a plain step."""
    mtp_name = "adaptive MTP" if r["with_mtp"].get("adaptive") else "with MTP"
    sides = [(mtp_name, r["with_mtp"])] + ([("fixed MTP", r["fixed_mtp"])] if "fixed_mtp" in r else []) + [
        ("without MTP", r["without_mtp"])]
    rows = [[name, _fmt(s["tokens_per_s"], ".1f"), _fmt(s["ms_per_token"], ".2f"), _fmt(s["ttft_ms"], ".1f"),
             _fmt(s["mean_accepted_length"], ".2f"), _fmt(s["acceptance_rate"], ".1%"), _fmt(s["ms_per_step"], ".2f"),
             _fmt(s["draft_ms_per_step"] if s["mtp"] else None, ".2f"), _fmt(s["verify_ms_per_step"], ".2f")]
            for name, s in sides]
    table = common.format_table(["", "tokens/s", "ms/token", "TTFT ms", "mean accepted length", "acceptance rate",
                                 "ms/step", "draft ms", "verify ms"], rows)
    lines = [header, table, f"speedup {r['speedup']:.2f}x ({_runs(r['speedup_per_run'])})"]
    if "fixed_mtp" in r:
        lines += [f"fixed MTP speedup {r['fixed_speedup']:.2f}x ({_runs(r['fixed_speedup_per_run'])})",
                  f"adaptive vs fixed {r['adaptive_vs_fixed']:.2f}x ({_runs(r['adaptive_vs_fixed_per_run'])})"]
    plain = r["without_mtp"]["ms_per_step"]
    for name, s in sides[:-1]:
        if plain and s["ms_per_step"]:
            lines.append(f"one {name} step = {s['ms_per_step'] / plain:.2f} plain steps: drafting "
                         f"{s['draft_ms_per_step'] / plain:.2f}, verifying {s['verify_ms_per_step'] / plain:.2f}")
    return "\n".join(filter(None, lines))


def floor(r: dict, steps: dict[str, StepProfile], bandwidth: float, buffer_bytes: int) -> dict:
    """The plain and MTP steps' times beside their weights' read time at `bandwidth` bytes/s (roofline.step_floor):
    a plain step reads what steps["plain"] read; an MTP step what the verify and draft parts read, each also apart."""
    plain, mtp = r["without_mtp"], r["with_mtp"]
    v, d = steps["verify"].weight_bytes, steps["draft"].weight_bytes
    return {"read_bandwidth_gbs": bandwidth / 1e9, "bandwidth_buffer_bytes": buffer_bytes,
            "plain": step_floor(plain["ms_per_step"], steps["plain"].weight_bytes, bandwidth),
            "mtp": step_floor(mtp["ms_per_step"], v + d, bandwidth),
            "verify": step_floor(mtp["verify_ms_per_step"], v, bandwidth),
            "draft": step_floor(mtp["draft_ms_per_step"], d, bandwidth)}


def format_floor(r: dict) -> str:
    """The kernels, the resident weights and, where measured, the floor, as text."""
    k, w = r["kernels"], r["resident_weight_bytes"]
    ops = f"; custom ops {', '.join(k['custom_ops'])} (cpu_ops {k['isa']})" if k["custom_ops"] else ""
    by_dtype = ", ".join(f"{d} {n / MB:.1f}" for d, n in sorted(w.items(), key=lambda x: -x[1]) if d != "total")
    lines = [f"kernels: {k['backend']} backend{ops}", f"resident weights: {w['total'] / MB:.1f} MB ({by_dtype})"]
    f = r["floor"]
    if f is None:
        return "\n".join(lines + ["floor: measured on a CPU with the torch backend only (Triton kernels read "
                                   "weights unseen by the dispatcher)"])
    rows = [[name, f"{x['weight_bytes'] / MB:.1f}", f"{x['floor_ms']:.2f}", _fmt(x["ms"], ".2f"),
             "-" if x["multiple"] is None else f"{x['multiple']:.1f}x"]
            for name, x in (("plain step", f["plain"]), ("MTP step", f["mtp"]), ("  verify", f["verify"]),
                            ("  drafting", f["draft"]))]
    return "\n".join(lines + [
        f"floor: one core reads {f['read_bandwidth_gbs']:.1f} GB/s (the best of {REPEATS} sums over "
        f"{f['bandwidth_buffer_bytes'] / 2**20:.0f} MiB); weights read by one step of the first request",
        common.format_table(["", "weights MB", "read ms", "step ms", "multiple"], rows)])


def format_ops(steps: dict[str, StepProfile], top: int = 10) -> str:
    """Ops per step, per layer run and per verified token-layer, then each step's most frequent ops."""
    names = {"plain": "plain step", "verify": "verify step", "draft": "drafting"}
    rows = [[names[n], f"{s.num_ops:,}", f"{s.layers}" + (f" x {s.tokens}" if s.tokens and s.tokens > 1 else ""),
             f"{s.per_layer:.1f}", _fmt(s.per_token_layer, ".1f"), f"{s.weight_bytes / MB:.1f}"]
            for n, s in steps.items()]
    table = common.format_table(["", "aten ops", "layer runs x tokens", "ops/layer", "ops/token-layer",
                                 "weights MB"], rows)
    tops = [f"top ops, {names[n]}: " + ", ".join(f"{op.removeprefix('aten.')} {c}" for op, c in s.ops.most_common(top))
            for n, s in steps.items()]
    return "\n".join(["ops of one decode step (dispatcher calls; a custom op counts once; layer runs: main layers, "
                      "or the draft's MTP-layer runs)", table, *tops])


def profile(llm: Any, plain: Any, prompt: str | list[int], params: Any, top: int = 15) -> str:
    """Where one request's time goes, with and without MTP: its phases (prefill, drafting, verifying) per decode
    step, then the torch ops that took the most time (torch.profiler, self CPU time)."""
    from torch.profiler import profile as torch_profile

    out = []
    for name, x in (("with MTP", llm), ("without MTP", plain)):
        x.generate([prompt], params)  # warm
        with torch_profile() as prof:
            m = x.generate([prompt], params)[0].metrics
        steps = max(m.num_decode_steps, 1)
        out.append(f"{name}: {m.num_decode_steps} decode steps; per step: drafting {1e3 * m.draft_time / steps:.2f} "
                   f"ms, verifying {1e3 * m.verify_time / steps:.2f} ms; prefill {1e3 * m.prefill_time:.1f} ms")
        out.append(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))
    return "\n".join(out)


def describe_run(args: argparse.Namespace, n: int, spec_desc: str) -> str:
    src = args.input_file or "built-in held-out prompts"
    mode = "greedy" if args.temperature == 0 else f"temperature {args.temperature:g}"
    return (f"bench latency: {n} requests ({src}), batch {args.batch_size}, {args.max_tokens} tokens each, {mode}, "
            f"{args.runs} run(s), {spec_desc}")


def run(args: argparse.Namespace) -> int:
    common.check_output(args.json, "--json")
    prompts = common.load_prompts(args)
    spec = common.spec_config(args)
    params = common.request_params(prompts, args, spec)
    llm = common.load_llm(args, spec)
    common.check_prompts(prompts, llm)
    plain = llm.with_speculative(None)
    fixed = llm.with_speculative(dataclasses.replace(spec, adaptive=False)) if spec.adaptive else None
    desc = common.describe(spec) + (" vs its fixed shape" if fixed is not None else "")
    print(describe_run(args, len(prompts), desc) + f", {llm.threads or 'default'} thread(s)", flush=True)
    r = latency_ab(llm, plain, [p.prompt for p in prompts], params, runs=args.runs, warmup=args.num_iters_warmup,
                   batch_size=args.batch_size, log=lambda line: print(line, flush=True), fixed=fixed)
    steps = profile_steps(llm, prompts[0].prompt, spec)
    if args.profile:
        print(format_ops(steps))
        print(profile(llm, plain, prompts[0].prompt, params[0]))
    resident = resident_weight_bytes(llm.model)
    measured = llm.device.type == "cpu" and llm.backend.name == "torch"  # Triton's reads are unseen (profiling.py)
    r = {"speedup": r.pop("speedup"), "mean_accepted_length": r.pop("mean_accepted_length"), **r,
         "num_prompts": len(prompts), "max_tokens": args.max_tokens, "temperature": args.temperature,
         "batch_size": args.batch_size, "runs": args.runs, "threads": llm.threads,
         "kernels": kernels_ran(llm.backend.name, steps), "resident_weight_bytes": resident | {
             "total": sum(resident.values())},
         "floor": floor(r, steps, *read_bandwidth()) if measured else None}
    if args.profile:
        r["steps"] = {n: s.as_dict() for n, s in steps.items()}
    print(format_report(r))
    print(format_floor(r))
    if args.json:
        common.write_output(args.json, json.dumps(r, indent=1) + "\n", "--json")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("latency", help="tokens/s, ms/token, TTFT with and without MTP, and the speedup",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_bench_args(p)
    p.add_argument("--runs", type=common.positive_int, default=3, help="timed passes over the requests (default 3)")
    p.add_argument("--num-iters-warmup", type=common.non_negative_int, default=1, metavar="N",
                   help="untimed passes of the first batch per configuration (default 1)")
    p.add_argument("--profile", action="store_true",
                   help="also print the aten ops of one plain step, one verify step and the drafting (per layer and "
                        "per verified token-layer), then where a step's time goes (phases, the top torch ops by time), "
                        "for the first request")
    p.add_argument("--json", default=None, metavar="OUT",
                   help="write the results as JSON: speedup, mean_accepted_length, with_mtp, without_mtp (adaptive: "
                        "fixed_mtp, fixed_speedup, adaptive_vs_fixed), kernels, resident_weight_bytes, floor (and "
                        "steps, the op counts, with --profile)")
    p.set_defaults(func=run)
