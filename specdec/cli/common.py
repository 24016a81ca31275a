"""What the `generate`, `bench` and `demo` subcommands share: flags (named as vLLM/SGLang name them), building the
LLM and its parameters from them, reading JSONL requests, and plain-text tables.

Every user error raises ValueError (or FileNotFoundError) with a one-line message; cli.main prints it."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .api import BUNDLED_MODEL, DTYPES, LLM
from .kernels.backend import BACKENDS
from .params import SamplingParams, SpecConfig
from .prompts import HELD_OUT, held_out_prompts


def add_model_args(p: argparse.ArgumentParser, threads: int | None = None) -> None:
    p.add_argument("--model", default=str(BUNDLED_MODEL),
                   help="checkpoint directory in the released layout (default: the bundled demo model)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="compute dtype (auto: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=int, default=1, metavar="N",
                   help="tensor-parallel ranks (default 1)")
    p.add_argument("--backend", default="auto", choices=["auto", *BACKENDS],
                   help="kernel backend (default auto)")
    p.add_argument("--threads", type=int, default=threads, metavar="N",
                   help=f"CPU threads for torch (default: {threads or 'torch decides'}; a small model on a busy CPU "
                        "runs fastest on 1)")


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int, ignore_eos: bool = False) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens, help=f"tokens to generate (default {max_tokens})")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0: all (default)")
    p.add_argument("--seed", type=int, default=0, help="seed of the per-request sampling streams (default 0)")
    if ignore_eos:  # benchmarks generate exactly --max-tokens, as vLLM's bench latency does
        p.set_defaults(ignore_eos=True)
    else:
        p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")


def add_spec_args(p: argparse.ArgumentParser, no_mtp: bool = True) -> None:
    d = SpecConfig()
    if no_mtp:
        p.add_argument("--no-mtp", action="store_true", help="plain decoding, no MTP drafts")
    p.add_argument("--num-speculative-tokens", type=int, default=d.num_speculative_tokens, metavar="K",
                   help=f"MTP draft steps (tree depth) per verify step (default {d.num_speculative_tokens})")
    p.add_argument("--topk", type=int, default=d.topk,
                   help=f"children per expanded draft node; 1 drafts a chain (default {d.topk})")
    p.add_argument("--num-draft-tokens", type=int, default=None, metavar="N",
                   help="draft nodes verified per step, the root not counted (default K for a chain, K*topk for a "
                        "tree)")


def add_input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-file", default=None, metavar="F",
                   help='JSONL requests, one a line: {"prompt": "..."} or {"prompt_token_ids": [...]} '
                        f"(default: the built-in held-out prompts, chunks of {len(HELD_OUT)} stdlib modules)")
    p.add_argument("--num-prompts", type=int, default=len(HELD_OUT), metavar="N",
                   help=f"how many built-in held-out prompts (default {len(HELD_OUT)})")


def spec_config(args: argparse.Namespace) -> SpecConfig | None:
    """The SpecConfig the flags ask for (None with --no-mtp); raises ValueError for impossible values."""
    if getattr(args, "no_mtp", False):
        return None
    return SpecConfig(num_speculative_tokens=args.num_speculative_tokens, topk=args.topk,
                      num_draft_tokens=args.num_draft_tokens)


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                          top_k=args.top_k, ignore_eos=args.ignore_eos)


def describe(spec: SpecConfig | None) -> str:
    """'MTP k=3 topk=1 budget=3' or 'no MTP'."""
    if spec is None:
        return "no MTP"
    return f"MTP k={spec.num_speculative_tokens} topk={spec.topk} budget={spec.budget}"


def load_llm(args: argparse.Namespace, spec: SpecConfig | None) -> LLM:
    """The LLM the flags ask for; a missing checkpoint is a one-line FileNotFoundError."""
    path = Path(args.model)
    if not (path / "config.json").is_file():
        hint = " (the bundled model is not built yet: see bench/train_tiny.py)" if path == BUNDLED_MODEL else ""
        raise FileNotFoundError(f"{path}: no checkpoint here (no config.json){hint}")
    if args.tp < 1:
        raise ValueError(f"--tp {args.tp}: must be a positive integer")
    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads {args.threads}: must be a positive integer")
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = args.dtype if args.dtype != "auto" else ("float32" if device.type == "cpu" else "bfloat16")
    return LLM(path, dtype=dtype, device=device, speculative=spec, backend=args.backend,
               tensor_parallel_size=args.tp, seed=args.seed)


@dataclass(frozen=True)
class Prompt:
    """One request: text or token ids, and where it came from (for error messages)."""

    prompt: str | list[int]
    source: str


def _parse_request(obj: object, where: str) -> Prompt:
    if not isinstance(obj, dict) or ("prompt" in obj) == ("prompt_token_ids" in obj):
        raise ValueError(f'{where}: expected an object with exactly one of "prompt" or "prompt_token_ids"')
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"]:
            raise ValueError(f'{where}: "prompt" must be a non-empty string')
        return Prompt(obj["prompt"], where)
    ids = obj["prompt_token_ids"]
    if not isinstance(ids, list) or not ids or not all(type(t) is int and t >= 0 for t in ids):
        raise ValueError(f'{where}: "prompt_token_ids" must be a non-empty list of non-negative integers')
    return Prompt(ids, where)


def read_requests(path: str | Path) -> list[Prompt]:
    """The requests of a JSONL file (blank lines skipped); errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such input file")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {n}: not valid JSON ({e.msg})") from None
        out.append(_parse_request(obj, f"{path} line {n}"))
    if not out:
        raise ValueError(f"{path}: no requests in the file")
    return out


def load_prompts(args: argparse.Namespace) -> list[Prompt]:
    """--input-file's requests, else --num-prompts built-in held-out prompts."""
    if args.input_file is not None:
        return read_requests(args.input_file)
    if args.num_prompts < 1:
        raise ValueError(f"--num-prompts {args.num_prompts}: must be a positive integer")
    return [Prompt(p, f"held-out prompt {i} ({HELD_OUT[i % len(HELD_OUT)]})")
            for i, p in enumerate(held_out_prompts(args.num_prompts))]


def check_prompts(prompts: list[Prompt], llm: LLM) -> None:
    """Raise ValueError naming the request when the model cannot take it: text without a tokenizer, or token ids
    outside the vocabulary."""
    vocab = llm.config.vocab_size
    for p in prompts:
        if isinstance(p.prompt, str) and llm.tokenizer is None:
            raise ValueError(f"{p.source}: {llm.path} has no tokenizer.json, so prompts must be token ids "
                             '(--input-file with {"prompt_token_ids": [...]} lines)')
        if isinstance(p.prompt, list) and max(p.prompt) >= vocab:
            raise ValueError(f"{p.source}: token id {max(p.prompt)} is outside the vocabulary [0, {vocab})")


def format_table(headers: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """An aligned text table with a rule under the header; align has one 'l' or 'r' per column (default: the first
    column left, the others right)."""
    cols = list(zip(headers, *rows))
    widths = [max(len(c) for c in col) for col in cols]
    align = align or "l" + "r" * (len(headers) - 1)

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, align)).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def check_output(path: str | None, flag: str) -> None:
    """Fail before a long benchmark, not after, when its output file cannot be written."""
    if path is not None and not Path(path).resolve().parent.is_dir():
        raise FileNotFoundError(f"{flag} {path}: the directory {Path(path).parent} does not exist")
