"""`specdec generate`: stream one prompt's text as the engine accepts tokens, or run a JSONL file of requests as one
batch, writing each request's result as it finishes (finish order, each tagged with its request id and line). Text
output ends with a line of speculative-decoding statistics; with --json each object carries its request's metrics
instead.

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
    steps = llm.stream_steps(prompt, params)
    with common.interrupts_into(steps):
        for step in steps:
            metrics = step.metrics
            ids += step.token_ids
            text = step.text if llm.tokenizer is not None else "".join(f" {t}" for t in step.token_ids)
            if text:
                out.write(text)
                out.flush()
    return ids, metrics, time.perf_counter() - t0


def stats_line(spec_desc: str, metrics: list[Metrics], seconds: float) -> str:
    """'[adaptive MTP k=3 topk=1 budget=3] 64 tokens in 0.52 s, 123.1 tokens/s | mean accepted length 2.46 | ...'."""
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
    spec = common.spec_config(args)
    params = common.request_params(prompts, args, spec)
    llm = common.load_llm(args, spec)
    common.check_prompts(prompts, llm)
    if args.prompt is not None and not args.json:
        ids, metrics, seconds = stream_text(llm, args.prompt, params[0])
        print()
        print(stats_line(common.describe(spec), [metrics], seconds))
        return 0
    t0 = time.perf_counter()
    metrics = []
    done = llm.as_completed([p.prompt for p in prompts], params)
    with common.interrupts_into(done):
        for o in done:  # each result is written as its request finishes, so that Ctrl-C keeps what finished
            p = prompts[o.request_id]
            if args.json:
                print(json.dumps(output_json(o) | ({"line": p.line} if p.line is not None else {})), flush=True)
            else:
                print(f"=== request {o.request_id} ({p.source}, {o.finish_reason})")
                print(o.text if o.text is not None else " ".join(map(str, o.token_ids)), flush=True)
            metrics.append(o.metrics)
    if not args.json:
        print(stats_line(common.describe(spec), metrics, time.perf_counter() - t0))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text, speculatively with the MTP drafter unless --no-mtp",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", default=None, metavar="TEXT", help="one prompt, streamed as it is generated")
    src.add_argument("--input-file", default=None, metavar="F",
                     help='JSONL, one request a line: {"prompt": "..."} or {"prompt_token_ids": [...]}, optionally '
                          "with its own max_tokens, temperature, top_p, top_k, seed, stop, stop_token_ids, ignore_eos "
                          f"(see {common.EXAMPLE}); run as one batch, each result written as its request finishes")
    common.add_model_args(p)
    common.add_sampling_args(p, max_tokens=64)
    common.add_spec_args(p)
    p.add_argument("--json", action="store_true",
                   help="one JSON object a line per request, as it finishes: request_id, line (--input-file), text, "
                        "token_ids, finish_reason, metrics (no statistics line)")
    p.set_defaults(func=run)
