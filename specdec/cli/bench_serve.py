"""`specdec bench serve`: an online serving benchmark modelled on `vllm bench serve`. Streamed /v1/completions
requests (the built-in held-out prompts, or --input-file JSONL) go out at --request-rate (Poisson; default: all at
once) and/or under --max-concurrency, against a running server (--base-url) or one started here, in this process,
on a free port of 127.0.0.1 from the model flags. Reports TTFT, TPOT, ITL and end-to-end latency (mean / median /
p99), output tokens/s and requests/s, and the acceptance length and per-position acceptance read from the server's
/metrics (the difference over the run).

--compare-mtp starts servers on one loaded model (with MTP; with its fixed shape when adaptive speculation is on,
the default; without MTP) and measures each at each --concurrency (default 1 4 16), rotating which goes first,
printing the curve with the draft tokens each MTP side verified per step (the draft budget adaptive speculation
chose at that load; --plot draws the curve). Requests
generate exactly --max-tokens (EOS ignored) unless the JSONL says otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import asdict

from ..api import LLM
from . import common, serve
from .bench_acceptance import plot_formats

SERVER_FLAGS = {"model": "--model", "dtype": "--dtype", "device": "--device", "tp": "--tp", "backend": "--backend",
                "threads": "--threads", "no_mtp": "--no-mtp", "max_num_seqs": "--max-num-seqs",
                "kv_cache_tokens": "--kv-cache-tokens", "max_queued_requests": "--max-queued-requests",
                "enable_prefix_caching": "--no-enable-prefix-caching", **common.SPEC_FLAGS}
COMPARE_ONLY = {"concurrency": "--concurrency", "plot": "--plot"}


def request_bodies(prompts: list[common.Prompt], args: argparse.Namespace, model: str) -> list[dict]:
    """Streamed completion bodies carrying each request's SamplingParams; one without a seed gets --seed + its
    index."""
    bodies = []
    for i, p in enumerate(prompts):
        params = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(p.params(args)).items()
                  if v is not None}
        bodies.append({"model": model, "prompt": p.prompt, "seed": args.seed + i, **params, "stream": True,
                       "stream_options": {"include_usage": True}})
    return bodies


def measure(load: Callable[..., tuple[list, float]], url: str, bodies: list[dict], args: argparse.Namespace,
            max_concurrency: int | None) -> dict:
    """--num-warmups requests one at a time, then the timed run (load: loadgen.load_process's run_load),
    summarized."""
    from ..server import loadgen

    for _ in range(args.num_warmups):
        load(url, bodies[:1])
    before = loadgen.spec_counters(url)
    results, duration = load(url, bodies, args.request_rate, max_concurrency, args.seed)
    out = loadgen.summarize(results, duration, before, loadgen.spec_counters(url))
    return out | {"max_concurrency": max_concurrency, "request_rate": args.request_rate}


def _ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def format_report(r: dict) -> str:
    s = r["spec_decode"]
    rows = [["successful requests", str(r["completed"])], ["failed requests", str(r["failed"])],
            ["duration (s)", f"{r['duration']:.2f}"], ["total input tokens", str(r["total_input_tokens"])],
            ["input tokens from the prefix cache", str(r["total_cached_tokens"])],
            ["total generated tokens", str(r["total_output_tokens"])],
            ["request throughput (req/s)", f"{r['request_throughput']:.2f}"],
            ["output token throughput (tok/s)", f"{r['output_throughput']:.1f}"]]
    for key, name in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E latency")):
        rows += [[f"{stat} {name} (ms)", _ms(r[f"{stat}_{key}_ms"])] for stat in ("mean", "median", "p99")]
    rows += [["acceptance length (1 + accepted / drafts)", "-" if s["acceptance_length"] is None
              else f"{s['acceptance_length']:.2f}"],
             ["acceptance rate (accepted / draft tokens)", "-" if s["acceptance_rate"] is None
              else f"{s['acceptance_rate']:.1%}"],
             ["acceptance per position", " / ".join(f"{x:.0%}" for x in s["acceptance_rate_per_position"]) or "-"]]
    lines = [common.format_table(["bench serve", "result"], rows)]
    lines += [f"error: {e}" for e in r["errors"]]
    return "\n".join(lines)


def draft_tokens_per_step(r: dict) -> float | None:
    """Draft tokens verified per decode step over a run (plain steps count, with none): the draft budget that
    adaptive speculation chose at that load, on average."""
    s = r["spec_decode"]
    return s["num_draft_tokens"] / s["num_drafts"] if s["num_drafts"] else None


def format_curve(c: dict) -> str:
    """One row per concurrency: tokens/s of each side, the speedups over no MTP, TPOT and TTFT, and the MTP
    sides' acceptance length and draft tokens per step."""
    fixed = "fixed_mtp" in c
    sides = ["with_mtp", "fixed_mtp", "without_mtp"] if fixed else ["with_mtp", "without_mtp"]
    names = {"with_mtp": "MTP", "fixed_mtp": "fixed", "without_mtp": "no-MTP"}
    f2 = lambda x: "-" if x is None else f"{x:.2f}"
    rows = []
    for i, n in enumerate(c["concurrency"]):
        r = {k: c[k][i] for k in sides}
        rows.append([str(n), *(f"{r[k]['output_throughput']:.1f}" for k in sides), f"{c['speedup'][i]:.2f}x",
                     *([f"{c['fixed_speedup'][i]:.2f}x"] if fixed else []),
                     *(_ms(r[k]["mean_tpot_ms"]) for k in sides), *(_ms(r[k]["mean_ttft_ms"]) for k in sides),
                     *(f2(r[k]["spec_decode"]["acceptance_length"]) for k in sides[:-1]),
                     *(f2(draft_tokens_per_step(r[k])) for k in sides[:-1])])
    head = (["concurrency"] + [f"{names[k]} tok/s" for k in sides] + ["speedup"] + (["fixed speedup"] if fixed else [])
            + [f"{names[k]} TPOT ms" for k in sides] + [f"{names[k]} TTFT ms" for k in sides]
            + [f"{names[k]} acceptance length" for k in sides[:-1]] + [f"{names[k]} drafts/step" for k in sides[:-1]])
    return common.format_table(head, rows)


def plot_curve(c: dict, out: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(9, 3.8))
    for key, label in (("with_mtp", "with MTP"), ("fixed_mtp", "fixed MTP"), ("without_mtp", "without MTP")):
        if key in c:
            ax.plot(c["concurrency"], [r["output_throughput"] for r in c[key]], marker="o", label=label)
    ax.set(xscale="log", xlabel="concurrent requests", ylabel="output tokens/s (all requests)", title=title)
    ax2.plot(c["concurrency"], c["speedup"], marker="o", color="C0", label="MTP")
    if "fixed_speedup" in c:
        ax2.plot(c["concurrency"], c["fixed_speedup"], marker="o", color="C1", label="fixed MTP")
        ax2.legend(fontsize=8)
    ax2.axhline(1.0, color="gray", lw=0.8)
    ax2.set(xscale="log", xlabel="concurrent requests", ylabel="MTP speedup (tokens/s ratio)")
    for a in (ax, ax2):
        a.set_xticks(c["concurrency"], [str(n) for n in c["concurrency"]])
        a.minorticks_off()
        a.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


@contextmanager
def _serving(llm: LLM, args: argparse.Namespace) -> Iterator[str]:
    from ..server.app import create_app
    from ..server.background import BackgroundServer

    with BackgroundServer(create_app(llm, llm.path.name, args.max_queued_requests)) as s:
        yield s.base_url


def _check(args: argparse.Namespace) -> None:
    """One-line errors for flags that contradict each other, before anything loads."""
    if args.base_url is not None:
        given = [flag for dest, flag in SERVER_FLAGS.items() if getattr(args, dest) != args.defaults[dest]]
        if given or args.compare_mtp:
            raise ValueError(f"--base-url benchmarks a running server: drop {', '.join(given or ['--compare-mtp'])}")
    if args.compare_mtp:
        if args.no_mtp or args.max_concurrency is not None:
            raise ValueError("--compare-mtp runs with and without MTP at each --concurrency: drop "
                             f"{'--no-mtp' if args.no_mtp else '--max-concurrency'}")
        if any(c < 1 for c in args.concurrency):
            raise ValueError(f"--concurrency {' '.join(map(str, args.concurrency))}: each must be >= 1")
    else:
        given = [flag for dest, flag in COMPARE_ONLY.items() if getattr(args, dest) != args.defaults[dest]]
        if given:
            raise ValueError(f"{', '.join(given)}: only with --compare-mtp (use --max-concurrency for one run)")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise ValueError(f"--max-concurrency {args.max_concurrency}: must be >= 1")
    if not args.request_rate > 0:
        raise ValueError(f"--request-rate {args.request_rate}: must be > 0 (inf: all at once)")
    if args.num_warmups < 0:
        raise ValueError(f"--num-warmups {args.num_warmups}: must be >= 0")


def run(args: argparse.Namespace) -> int:
    from ..server import loadgen

    _check(args)
    common.check_output(args.json, "--json")
    if args.plot:
        common.check_output(args.plot, "--plot", plot_formats())
    prompts = common.load_prompts(args)
    src = args.input_file or "built-in held-out prompts"
    rate = "all at once" if math.isinf(args.request_rate) else f"{args.request_rate:g} req/s (Poisson)"
    head = f"bench serve: {len(prompts)} requests ({src}), {args.max_tokens} tokens each unless set, {rate}"
    with loadgen.load_process() as load:
        if args.base_url is not None:
            url = args.base_url.rstrip("/")
            print(f"{head}, max concurrency {args.max_concurrency or 'none'}, against {url}", flush=True)
            r = measure(load, url, request_bodies(prompts, args, loadgen.served_model(url)), args,
                        args.max_concurrency)
        else:
            llm = serve.load_server_llm(args)
            try:
                common.check_prompts(prompts, llm)
                bodies = request_bodies(prompts, args, llm.path.name)
                desc = f"{common.describe(llm.speculative)}, {llm.threads or 'default'} thread(s)"
                if args.compare_mtp:
                    print(f"{head}, concurrency {' '.join(map(str, args.concurrency))}, {desc} vs no MTP",
                          flush=True)
                    r = _compare(load, llm, bodies, args)
                else:
                    print(f"{head}, max concurrency {args.max_concurrency or 'none'}, in-process server, {desc}",
                          flush=True)
                    with _serving(llm, args) as url:
                        r = measure(load, url, bodies, args, args.max_concurrency)
            finally:
                llm.close()
    if args.compare_mtp:
        print(format_curve(r))
        if args.plot:
            plot_curve(r, args.plot, f"{len(prompts)} requests x {args.max_tokens} tokens")
    else:
        print(format_report(r))
    if args.json:
        common.write_output(args.json, json.dumps(r, indent=1) + "\n", "--json")
    runs = [x for k in ("with_mtp", "fixed_mtp", "without_mtp") for x in r.get(k, [])] if args.compare_mtp else [r]
    return 1 if any(x["failed"] for x in runs) else 0  # the numbers stand, but some requests failed


def _compare(load: Callable[..., tuple[list, float]], llm: LLM, bodies: list[dict], args: argparse.Namespace) -> dict:
    """Servers with MTP as configured, with its fixed shape (adaptive speculation only) and without MTP, on one
    loaded model, measured in turn at each concurrency, who goes first rotating."""
    llms = {"with_mtp": llm}
    if llm.speculative.adaptive:
        llms["fixed_mtp"] = llm.with_speculative(dataclasses.replace(llm.speculative, adaptive=False))
    llms["without_mtp"] = llm.with_speculative(None)
    names = list(llms)
    out: dict = {"concurrency": list(args.concurrency), **{k: [] for k in names}, "speedup": []}
    if "fixed_mtp" in llms:
        out["fixed_speedup"] = []
    with ExitStack() as stack:
        urls = {k: stack.enter_context(_serving(x, args)) for k, x in llms.items()}
        for i, c in enumerate(args.concurrency):
            shift = i % len(names)  # rotate who goes first: drift hits all alike
            for key in names[shift:] + names[:shift]:
                out[key].append(measure(load, urls[key], bodies, args, c))
                r = out[key][-1]
                print(f"concurrency {c}, {key.replace('_', ' ')}: {r['output_throughput']:.1f} tok/s", flush=True)
            plain = max(out["without_mtp"][-1]["output_throughput"], 1e-12)
            out["speedup"].append(out["with_mtp"][-1]["output_throughput"] / plain)
            if "fixed_mtp" in llms:
                out["fixed_speedup"].append(out["fixed_mtp"][-1]["output_throughput"] / plain)
    return out


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="online serving benchmark: TTFT, TPOT, ITL, tokens/s, acceptance",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(p)
    common.add_input_args(p)
    common.add_sampling_args(p, max_tokens=128, ignore_eos=True)
    common.add_spec_args(p)
    serve.add_server_args(p)
    p.add_argument("--base-url", default=None, metavar="URL",
                   help="benchmark the server running there (e.g. http://127.0.0.1:8000) instead of starting one")
    p.add_argument("--request-rate", type=float, default=math.inf, metavar="R",
                   help="requests per second, Poisson arrivals (default inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None, metavar="N",
                   help="at most N requests in flight (default: no limit)")
    p.add_argument("--num-warmups", type=int, default=1, metavar="N",
                   help="untimed requests before each run (default 1)")
    p.add_argument("--compare-mtp", action="store_true",
                   help="start servers with MTP, with its fixed shape (adaptive only) and without MTP on one loaded "
                        "model and measure each at each --concurrency")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], metavar="N",
                   help="--compare-mtp: the concurrency levels (default 1 4 16)")
    p.add_argument("--plot", default=None, metavar="OUT.png",
                   help="--compare-mtp: draw tokens/s and the speedup against concurrency (matplotlib)")
    p.add_argument("--json", default=None, metavar="OUT", help="write the results as JSON (vLLM's field names)")
    p.set_defaults(func=run)
    p.set_defaults(defaults={d: p.get_default(d) for d in (*SERVER_FLAGS, *COMPARE_ONLY)})
