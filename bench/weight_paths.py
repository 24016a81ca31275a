"""Weights as released (FP8 blocks and BF16, read by our C++ kernels) against the float32-dequantized reference
path, plain and with MTP, in one interleaved run on one thread: issue 22's targets as ratios of this run.

    python bench/weight_paths.py                  # bundled model, 15 held-out prompts, 64 tokens, 3 runs
    python bench/weight_paths.py --runs 5 --max-tokens 128 --json out.json

Each run times every prompt on all four arms (released / float32, plain / MTP k=3), the order rotating prompt by
prompt; the table gives each arm's best and median run in tokens/s, then the ratios the issue names, each computed
within a run (best and median over runs). Also the resident weight bytes of both loads and the logits' relative
difference on the first prompt.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from specdec import LLM, SamplingParams, SpecConfig
from specdec.prompts import HELD_OUT
from specdec.roofline import resident_weight_bytes

ARMS = ("released plain", "released MTP", "float32 plain", "float32 MTP")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--num-speculative-tokens", type=int, default=3)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    spec = SpecConfig(args.num_speculative_tokens)
    released = LLM(dtype="float32", speculative=spec, threads=1)
    reference = LLM(dtype="float32", speculative=spec, threads=1, dequantize_fp8=True)
    if not released.backend.cpu_kernels:
        raise SystemExit("our C++ CPU kernels are unavailable here: nothing to compare")
    llms = dict(zip(ARMS, (released.with_speculative(None), released, reference.with_speculative(None), reference)))
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    prompts = [released.encode(t) for t in HELD_OUT]
    first = prompts[0]
    logits_rel = float((released.logits(first) - reference.logits(first)).norm() / reference.logits(first).norm())
    same = [o.token_ids for o in llms[ARMS[0]].generate(prompts, params)] == \
        [o.token_ids for o in llms[ARMS[2]].generate(prompts, params)]
    for llm in llms.values():  # warm
        llm.generate(prompts[:1], params)
    runs: list[dict[str, float]] = []
    for r in range(args.runs):
        seconds = dict.fromkeys(ARMS, 0.0)
        tokens = dict.fromkeys(ARMS, 0)
        for i, prompt in enumerate(prompts):
            order = ARMS[i % 4:] + ARMS[:i % 4]
            for arm in order:
                t = time.perf_counter()
                out = llms[arm].generate([prompt], params)[0]
                seconds[arm] += time.perf_counter() - t
                tokens[arm] += len(out.token_ids)
        runs.append({arm: tokens[arm] / seconds[arm] for arm in ARMS})
        print(f"run {r + 1}/{args.runs}: " + ", ".join(f"{a} {runs[-1][a]:.1f}" for a in ARMS) + " tokens/s",
              flush=True)
    ratios = {"plain: released / float32": ("released plain", "float32 plain"),
              "MTP: released / float32": ("released MTP", "float32 MTP"),
              "MTP speedup, released": ("released MTP", "released plain"),
              "MTP speedup, float32": ("float32 MTP", "float32 plain")}
    per_run = {name: [run[a] / run[b] for run in runs] for name, (a, b) in ratios.items()}
    mem = {name: sum(resident_weight_bytes(llm.model).values()) for name, llm in (("released", released),
                                                                                  ("float32", reference))}
    k = spec.num_speculative_tokens
    print(f"\n{len(prompts)} prompts x {args.max_tokens} tokens, greedy, one thread, MTP k={k}")
    for arm in ARMS:
        v = [run[arm] for run in runs]
        print(f"  {arm:15s} best {max(v):7.1f}  median {statistics.median(v):7.1f} tokens/s")
    for name, v in per_run.items():
        print(f"  {name:27s} best {max(v):.2f}x  median {statistics.median(v):.2f}x")
    print(f"  resident weights: released {mem['released'] / 1e6:.1f} MB, float32 {mem['float32'] / 1e6:.1f} MB "
          f"({mem['released'] / mem['float32']:.2f}x)")
    print(f"  logits, first prompt: relative difference {logits_rel:.1e}; greedy tokens identical: {same}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"runs": runs, "ratios_per_run": per_run, "resident_bytes": mem, "logits_rel": logits_rel,
                       "greedy_identical": same}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
