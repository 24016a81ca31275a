"""`specdec demo` (what `make demo` runs): the bundled model continues a held-out stdlib module greedily, streamed
with MTP drafting and then without; the two outputs must agree token for token (greedy speculative decoding is
lossless). Then a short interleaved latency comparison on a few more held-out prompts gives the speedup and the
acceptance per draft position.
"""

from __future__ import annotations

import argparse

from ..benchmark import latency_ab, timed
from ..params import SamplingParams, SpecConfig
from ..prompts import HELD_OUT, held_out_prompts
from . import common
from .bench_latency import format_report
from .generate import stats_line, stream_text

STREAMED = "glob.py"  # the module whose held-out chunk is streamed


def rule(title: str) -> None:
    print(f"\n── {title} " + "─" * max(0, 76 - len(title)))


def run(args: argparse.Namespace) -> int:
    spec = SpecConfig(args.num_speculative_tokens)
    llm = common.load_llm(args, spec)
    plain = llm.with_speculative(None, args.seed)
    prompts = held_out_prompts(max(len(HELD_OUT), args.num_prompts + 1))
    prompt = prompts[HELD_OUT.index(STREAMED)]
    common.check_prompts([common.Prompt(prompt, f"held-out prompt ({STREAMED})")], llm)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0.0, ignore_eos=True)
    cfg = llm.config
    print(f"specdec demo: {llm.path}: {cfg.num_hidden_layers} layers + {cfg.num_nextn_predict_layers} MTP, "
          f"vocab {cfg.vocab_size}, {llm.device.type} {str(llm.dtype).removeprefix('torch.')}")
    for x in (llm, plain):  # warm-up, so the streamed timings compare like with like
        timed(x, [prompt], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    rule(f"prompt: a chunk of {STREAMED} (held out from training)")
    print(prompt, end="" if prompt.endswith("\n") else "\n")
    outs = []
    for x in (llm, plain):
        rule(f"greedy continuation, {common.describe(x.speculative)}")
        ids, metrics, seconds = stream_text(x, prompt, params)
        print()
        print(stats_line(common.describe(x.speculative), [metrics], seconds))
        outs.append(ids)
    same = outs[0] == outs[1]
    print(f"identical tokens with and without MTP: {'yes' if same else 'NO (a bug: greedy MTP must be lossless)'}")
    bench = [p for p in prompts if p != prompt][:args.num_prompts]
    rule(f"latency: {len(bench)} other held-out prompts, batch 1, {args.max_tokens} tokens each, greedy")
    r = latency_ab(llm, plain, bench, params, runs=1, warmup=0)
    print(format_report(r))
    per = " ".join(f"{x:.0%}" for x in r["with_mtp"]["acceptance_rate_per_position"])
    print(f"acceptance: mean accepted length {r['mean_accepted_length']:.2f} | acceptance rate "
          f"{r['with_mtp']['acceptance_rate']:.1%} | accepted per draft position {per}")
    return 0 if same else 1


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="stream a held-out prompt with and without MTP, then the speedup",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(p)
    p.add_argument("--max-tokens", type=common.positive_int, default=96,
                   help="tokens to generate per prompt (default 96)")
    p.add_argument("--num-speculative-tokens", type=int, default=SpecConfig().num_speculative_tokens, metavar="K",
                   help=f"MTP draft steps per verify step (default {SpecConfig().num_speculative_tokens})")
    p.add_argument("--num-prompts", type=common.positive_int, default=4, metavar="N",
                   help="held-out prompts in the latency comparison (default 4)")
    p.set_defaults(func=run, seed=0)
