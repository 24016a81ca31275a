"""`specdec generate`: stream one prompt's text as the engine accepts tokens, or run a JSONL file of requests as one
batch; either ends with a line of speculative-decoding statistics.

    specdec generate --prompt "def fib(n):" --max-tokens 64
    specdec generate --input-file requests.jsonl --json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TextIO

from ..api import LLM
from ..inputs import check_text
from ..outputs import Metrics, RequestOutput
from ..params import SamplingParams
from . import common


def stream_text(llm: LLM, prompt: str | list[int], params: SamplingParams,
                out: TextIO | None = None) -> tuple[list[int], Metrics, float]:
    """Write the generated text to `out` (default: sys.stdout) as it is accepted (token ids without a tokenizer);
    returns (token ids, metrics, seconds)."""
    out = out or sys.stdout
    ids: list[int] = []
    metrics = Metrics()
    t0 = time.perf_counter()
    for step in llm.stream_steps(prompt, params):
        metrics = step.metrics
        ids += step.token_ids
        text = step.text if llm.tokenizer is not None else "".join(f" {t}" for t in step.token_ids)
        if text:
            out.write(text)
            out.flush()
    return ids, metrics, time.perf_counter() - t0


def stats_line(spec_desc: str, metrics: list[Metrics], seconds: float) -> str:
    """'[MTP k=3 topk=1 budget=3] 64 tokens in 0.52 s, 123.1 tokens/s | mean accepted length 2.46 | ...'."""
    tokens = sum(m.num_generated for m in metrics)
    steps = sum(m.num_steps for m in metrics)
    drafted, accepted = sum(m.num_drafted for m in metrics), sum(m.num_accepted for m in metrics)
    parts = [f"[{spec_desc}] {tokens} tokens in {seconds:.2f} s, {tokens / max(seconds, 1e-9):.1f} tokens/s",
             f"mean accepted length {tokens / max(steps, 1):.2f}"]
    if drafted:
        parts.append(f"acceptance rate {accepted / drafted:.1%}")
    if len(metrics) > 1:
        parts.append(f"{len(metrics)} requests")
    return " | ".join(parts)


def output_json(o: RequestOutput) -> dict:
    out = {"request_id": o.request_id, "text": o.text, "token_ids": o.token_ids, "finish_reason": o.finish_reason,
           "stop_reason": o.stop_reason, "prompt_token_ids": o.prompt_token_ids, "metrics": o.metrics.as_dict()}
    for name in ("logprobs", "prompt_logprobs"):  # when a request asked: [{token id: log-prob}] (JSON keys)
        if getattr(o, name) is not None:
            out[name] = getattr(o, name)
    return out


def run(args: argparse.Namespace) -> int:
    if (args.prompt is None) == (args.input_file is None):
        raise ValueError("give exactly one of --prompt TEXT or --input-file F")
    if args.prompt is not None:
        check_text(args.prompt, "--prompt")
        prompts = [common.Prompt(args.prompt, "--prompt")]
    else:
        prompts = common.read_requests(args.input_file)
    params = [p.params(args) for p in prompts]
    spec = common.spec_config(args)
    llm = common.load_llm(args, spec)
    common.check_prompts(prompts, llm)
    if args.prompt is not None and not args.json:
        ids, metrics, seconds = stream_text(llm, args.prompt, params[0])
        print()
        print(stats_line(common.describe(spec), [metrics], seconds))
        return 0
    t0 = time.perf_counter()
    outs = llm.generate([p.prompt for p in prompts], params)
    seconds = time.perf_counter() - t0
    if args.json:
        for o in outs:
            print(json.dumps(output_json(o)))
        return 0
    for o, p in zip(outs, prompts):
        print(f"=== request {o.request_id} ({p.source}, {o.finish_reason})")
        print(o.text if o.text is not None else " ".join(map(str, o.token_ids)))
    print(stats_line(common.describe(spec), [o.metrics for o in outs], seconds))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text, speculatively with the MTP drafter unless --no-mtp",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, metavar="TEXT", help="one prompt, streamed as it is generated")
    src.add_argument("--input-file", default=None, metavar="F",
                     help='JSONL, one request a line: {"prompt": "..."} or {"prompt_token_ids": [...]}, optionally '
                          "with its own max_tokens, temperature, top_p, top_k, seed, stop, stop_token_ids, ignore_eos "
                          f"(see {common.EXAMPLE}); run as one batch")
    common.add_model_args(p)
    common.add_sampling_args(p, max_tokens=64)
    common.add_spec_args(p)
    p.add_argument("--json", action="store_true",
                   help="one JSON object a line per request: text, token_ids, finish_reason, metrics")
    p.set_defaults(func=run)
