"""`specdec bench acceptance`: how far MTP drafts get: the acceptance rate at each draft position, the histogram of
tokens emitted per verify step, and the mean accepted length; with MTP, the engine's cost model (its estimates of
what verifying and drafting cost, per batch size) and adaptive speculation's last choices; --sweep measures a small
grid of fixed draft shapes (depth k, topk, node budget) beside the configured one, names the fastest and compares
adaptive speculation with the best fixed shape; --plot draws the per-position curves (needs matplotlib).

Requests run one at a time (--batch-size 1) and generate exactly --max-tokens (EOS ignored), greedy unless
--temperature is set. Without --input-file, the built-in held-out prompts (specdec.prompts) are used.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

from ..benchmark import SWEEP_GRID, spec_dict, sweep
from ..draft_policy import DraftingStats
from . import common


def _name(row: dict) -> str:
    if not row["mtp"]:
        return "no MTP"
    return (("adaptive " if row["adaptive"] else "") +
            f"k={row['num_speculative_tokens']} topk={row['topk']} budget={row['num_draft_tokens']}")


def _rate(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def format_positions(row: dict) -> str:
    rows = [[str(d + 1), f"{a:.1%}", f"{c:.1%}", f"{x:.1%}"] for d, (a, c, x) in
            enumerate(zip(row["acceptance_rate_per_position"], row["conditional_acceptance_rate_per_position"],
                          row["draft_rate_per_position"]))]
    return common.format_table(["draft position", "accepted", "given previous accepted", "drafted"], rows)


def format_costs(d: DraftingStats) -> str:
    """The cost model's current estimates and the last choice, per batch-size bucket (draft_policy.BucketStats)."""
    ms = lambda x: f"{1e3 * x:.3f}"
    rows = [[b.batch, str(b.steps), str(b.depth), "-" if b.floor is None else f"{b.floor:.3f}",
             *((ms(e.plain_step), ms(e.per_token), ms(e.draft_step), ms(e.catch_up), f"{e.throughput:.1f}")
               if (e := b.estimates) is not None else ["-"] * 5)] for b in d.buckets]
    head = ["batch", "steps", "depth", "floor", "plain step ms", "ms/verified token", "ms/draft step",
            "ms/caught-up row", "drafting tok/s"]
    return (f"cost model ({'adaptive' if d.adaptive else 'fixed shape'}; acceptance of verified drafts "
            f"{d.acceptance:.1%}); the last step's choice per batch size (depth 0: plain)\n"
            + common.format_table(head, rows))


def format_histogram(row: dict) -> str:
    hist = row["accepted_length_histogram"]
    total = max(1, sum(hist.values()))
    rows = [[n, str(c), f"{c / total:.1%}", "#" * round(40 * c / total)] for n, c in hist.items()]
    return common.format_table(["tokens per verify step", "steps", "share", "histogram"], rows, align="lrrl")


def format_sweep(rows: list[dict], best: dict) -> str:
    table = [[_name(r) + (" *" if r is best else ""), f"{r['tokens_per_s']:.1f}", f"{r['speedup']:.2f}x",
              f"{r['mean_accepted_length']:.2f}", _rate(r["acceptance_rate"])]
             for r in sorted(rows, key=lambda r: -r["tokens_per_s"])]
    head = ["configuration", "tokens/s", "vs no MTP", "mean accepted length", "acceptance rate"]
    lines = [common.format_table(head, table), f"fastest: {_name(best)}, {best['tokens_per_s']:.1f} tokens/s, "
             f"{best['speedup']:.2f}x over no MTP"]
    fixed = [r for r in rows if r["mtp"] and not r["adaptive"]]
    if rows[0]["mtp"] and rows[0]["adaptive"] and fixed:
        f = max(fixed, key=lambda r: r["tokens_per_s"])
        lines.append(f"adaptive vs the best fixed shape ({_name(f)}): "
                     f"{rows[0]['tokens_per_s'] / max(f['tokens_per_s'], 1e-12):.2f}x")
    return "\n".join(lines)


def plot_formats() -> tuple[str, ...]:
    """The image formats matplotlib can write (ValueError when it is not installed)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ValueError("--plot needs matplotlib: pip install 'specdec[plot]'") from None
    fig = plt.figure()
    try:
        return tuple(fig.canvas.get_supported_filetypes())
    finally:
        plt.close(fig)


def plot(rows: list[dict], out: str, title: str) -> None:
    """Acceptance rate per draft position, one line per MTP configuration, written to `out` (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
        if r["mtp"]:
            y = r["acceptance_rate_per_position"]
            ax.plot(range(1, len(y) + 1), y, marker="o", label=_name(r))
    ax.set(xlabel="draft position", ylabel="share of verify steps accepted", ylim=(0, 1), title=title)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    common.check_output(args.json, "--json")
    if args.plot:
        common.check_output(args.plot, "--plot", plot_formats())
    prompts = common.load_prompts(args)
    spec = common.spec_config(args)
    params = common.request_params(prompts, args, spec)
    llm = common.load_llm(args, spec)
    common.check_prompts(prompts, llm)
    specs = [spec, None, *(s for s in SWEEP_GRID if spec_dict(s) != spec_dict(spec))] if args.sweep else [spec]
    mode = "greedy" if args.temperature == 0 else f"temperature {args.temperature:g}"
    print(f"bench acceptance: {len(prompts)} requests ({args.input_file or 'built-in held-out prompts'}), "
          f"{args.max_tokens} tokens each, {mode}, {common.describe(spec)}"
          + (f"; sweeping {len(specs)} configurations" if args.sweep else ""), flush=True)
    rows = sweep(llm, specs, [p.prompt for p in prompts], params, args.seed, args.batch_size)
    main = rows[0]
    print(format_positions(main))
    print(format_histogram(main))
    print(f"mean accepted length {main['mean_accepted_length']:.2f} | acceptance rate "
          f"{_rate(main['acceptance_rate'])} | {main['tokens_per_s']:.1f} tokens/s")
    result = {"mean_accepted_length": main["mean_accepted_length"],
              "acceptance_rate_per_position": main["acceptance_rate_per_position"], "config": spec_dict(spec),
              **{k: v for k, v in main.items() if k not in ("mtp", "num_speculative_tokens", "topk",
                                                              "num_draft_tokens")},
              "max_tokens": args.max_tokens, "temperature": args.temperature}
    if args.sweep:
        plain = rows[1]["tokens_per_s"]
        for r in rows:
            r["speedup"] = r["tokens_per_s"] / max(plain, 1e-12)
        best = max((r for r in rows if r["mtp"]), key=lambda r: r["tokens_per_s"])
        print(format_sweep(rows, best))
        result |= {"sweep": rows, "best": best}
    drafting = llm.engine_stats().drafting  # the configuration's own engine (sweep's first)
    if drafting is not None:
        print(format_costs(drafting))
        result["cost_model"] = dataclasses.asdict(drafting)
    if args.json:
        common.write_output(args.json, json.dumps(result, indent=1) + "\n", "--json")
    if args.plot:
        plot(rows, args.plot, f"MTP acceptance, {len(prompts)} requests, {mode}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("acceptance", help="acceptance per draft position, accepted lengths, --sweep of draft shapes",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_bench_args(p)
    p.add_argument("--sweep", action="store_true",
                   help=f"also measure no MTP and {len(SWEEP_GRID)} fixed draft shapes (chains k=1..4, trees of "
                        "topk 2); report the fastest, and adaptive vs the best fixed shape")
    p.add_argument("--json", default=None, metavar="OUT",
                   help="write the results as JSON: mean_accepted_length, acceptance_rate_per_position, ...")
    p.add_argument("--plot", default=None, metavar="OUT.png", help="draw acceptance per draft position (matplotlib)")
    p.set_defaults(func=run)
