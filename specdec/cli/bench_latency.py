"""`specdec bench latency`: the same requests with and without MTP on one loaded model, warmed up, interleaved
batch by batch over --runs runs; reports tokens/s, ms/token, time to first token, mean accepted length and the
speedup measured in this same run.

Requests run one at a time (--batch-size 1) and generate exactly --max-tokens (EOS ignored), greedy unless
--temperature is set. Without --input-file, the built-in held-out prompts (specdec.prompts) are used.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..benchmark import latency_ab
from . import common


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_report(r: dict, header: str | None = None) -> str:
    """The A/B table, the speedup, and a decode step's cost split into drafting and verifying, also as fractions
    of a plain step."""
    rows = [[name, _fmt(s["tokens_per_s"], ".1f"), _fmt(s["ms_per_token"], ".2f"), _fmt(s["ttft_ms"], ".1f"),
             _fmt(s["mean_accepted_length"], ".2f"), _fmt(s["acceptance_rate"], ".1%"), _fmt(s["ms_per_step"], ".2f"),
             _fmt(s["draft_ms_per_step"] if name == "with MTP" else None, ".2f"), _fmt(s["verify_ms_per_step"], ".2f")]
            for name, s in (("with MTP", r["with_mtp"]), ("without MTP", r["without_mtp"]))]
    table = common.format_table(["", "tokens/s", "ms/token", "TTFT ms", "mean accepted length", "acceptance rate",
                                 "ms/step", "draft ms", "verify ms"], rows)
    runs = " ".join(f"{x:.2f}x" for x in r["speedup_per_run"])
    lines = [header, table, f"speedup {r['speedup']:.2f}x (per run: {runs})"]
    plain, mtp = r["without_mtp"]["ms_per_step"], r["with_mtp"]
    if plain and mtp["ms_per_step"]:
        lines.append(f"one MTP step = {mtp['ms_per_step'] / plain:.2f} plain steps: drafting "
                     f"{mtp['draft_ms_per_step'] / plain:.2f}, verifying {mtp['verify_ms_per_step'] / plain:.2f}")
    return "\n".join(filter(None, lines))


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
    print(describe_run(args, len(prompts), common.describe(spec)) + f", {llm.threads or 'default'} thread(s)",
          flush=True)
    r = latency_ab(llm, plain, [p.prompt for p in prompts], params, runs=args.runs, warmup=args.num_iters_warmup,
                   batch_size=args.batch_size, log=lambda line: print(line, flush=True))
    if args.profile:
        print(profile(llm, plain, prompts[0].prompt, params[0]))
    r = {"speedup": r.pop("speedup"), "mean_accepted_length": r.pop("mean_accepted_length"), **r,
         "num_prompts": len(prompts), "max_tokens": args.max_tokens, "temperature": args.temperature,
         "batch_size": args.batch_size, "runs": args.runs, "threads": llm.threads}
    print(format_report(r))
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
                   help="also print where a step's time goes (phases, then the top torch ops) for the first request")
    p.add_argument("--json", default=None, metavar="OUT",
                   help="write the results as JSON: speedup, mean_accepted_length, with_mtp, without_mtp")
    p.set_defaults(func=run)
