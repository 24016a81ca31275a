"""What the subcommands share: flag groups (named as vLLM/SGLang name them), building the LLM and its parameters from
them, reading JSONL requests, checking output paths before a run, and plain-text tables.

Every user error raises ValueError (or FileNotFoundError) with a one-line message; cli.main prints it."""

from __future__ import annotations

import argparse
import json
import stat
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from ..api import BUNDLED_MODEL, DTYPES, LLM
from ..inputs import check_text, check_token_ids
from ..kernels.backend import BACKENDS
from ..model.parallel import shutdown_distributed
from ..params import ACCEPTANCE, GREEDY_EPS, SamplingParams, SpecConfig
from ..prompts import HELD_OUT, held_out_prompts

SPEC_DEFAULTS = SpecConfig()


def _int_at_least(lo: int, want: str) -> Callable[[str], int]:
    """An argparse type: an integer >= lo, so that a bad count is refused before anything loads."""
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be {want}, got {v}")
        return v

    return parse


positive_int = _int_at_least(1, "a positive integer")
non_negative_int = _int_at_least(0, "an integer >= 0")


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=str(BUNDLED_MODEL),
                   help="checkpoint directory in the released layout (default: the bundled demo model)")
    p.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                   help="compute dtype (auto: float32 on CPU, bfloat16 on GPU)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    p.add_argument("--tp", "--tensor-parallel-size", dest="tp", type=positive_int, default=1, metavar="N",
                   help="tensor-parallel ranks (default 1)")
    p.add_argument("--backend", default="auto", choices=["auto", *BACKENDS], help="kernel backend (default auto)")
    p.add_argument("--dequantize-fp8", action="store_true",
                   help="dequantize an FP8 checkpoint's weights to --dtype at load (the reference path); by default "
                        "they stay as released where kernels read them (GPUs with FP8; CPUs, with our C++ kernels)")
    p.add_argument("--enforce-eager", action="store_true",
                   help="run a GPU's decode steps eagerly, without CUDA graphs (a CPU always runs eager)")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="CPU threads for torch (default: 1 for models under 1B parameters on CPU, where more only "
                        "wait at barriers; else torch's default); more than the cores this process may use are "
                        "capped at that count, with a warning")


def add_sampling_args(p: argparse.ArgumentParser, max_tokens: int, ignore_eos: bool = False) -> None:
    p.add_argument("--max-tokens", type=positive_int, default=max_tokens,
                   help=f"tokens to generate (default {max_tokens})")
    p.add_argument("--temperature", type=float, default=0.0, help="0 is greedy (default 0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely tokens; 0: all (default)")
    p.add_argument("--seed", type=non_negative_int, default=0,
                   help="seed of the per-request sampling streams (default 0)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop when the text contains TEXT (repeatable); the text ends before it")
    p.add_argument("--stop-token-ids", type=int, nargs="+", default=None, metavar="ID",
                   help="stop at any of these token ids")
    if ignore_eos:  # benchmarks generate exactly --max-tokens, as vLLM's bench latency does
        p.set_defaults(ignore_eos=True)
    else:
        p.add_argument("--ignore-eos", action="store_true", help="keep generating past the end-of-sequence token")


def add_spec_args(p: argparse.ArgumentParser, no_mtp: bool = True) -> None:
    d = SPEC_DEFAULTS
    if no_mtp:
        p.add_argument("--no-mtp", action="store_true", help="plain decoding, no MTP drafts")
    p.add_argument("--num-speculative-tokens", type=int, default=None, metavar="K",
                   help=f"MTP draft steps (tree depth) per verify step (default {d.num_speculative_tokens})")
    p.add_argument("--topk", type=int, default=None,
                   help=f"children per expanded draft node; 1 drafts a chain (default {d.topk})")
    p.add_argument("--num-draft-tokens", type=int, default=None, metavar="N",
                   help="draft nodes verified per step, the root not counted (default K for a chain, K*topk for a "
                        "tree)")
    p.add_argument("--acceptance", default=None, choices=ACCEPTANCE,
                   help="exact (lossless, default) or relaxed (TensorRT-LLM's: a greedy draft among the target's "
                        "top --relaxed-topk within --relaxed-delta of its best log-prob is accepted; lossy; greedy "
                        "decoding only, so sampled requests are refused)")
    p.add_argument("--relaxed-topk", type=int, default=None, metavar="N",
                   help=f"relaxed acceptance: candidates among the target's top N (default {d.relaxed_topk})")
    p.add_argument("--relaxed-delta", type=float, default=None, metavar="D",
                   help=f"relaxed acceptance: log-prob margin to the top-1 (default {d.relaxed_delta})")
    p.add_argument("--speculative-adaptive", dest="adaptive", action=argparse.BooleanOptionalAction, default=None,
                   help="the draft shape is a cap: each step drafts, per request, only the tokens whose estimated "
                        "acceptance outweighs their measured cost, and none where verifying more does not pay "
                        "(default on; --no-speculative-adaptive drafts the whole shape at every step)")


SPEC_FLAGS = {"num_speculative_tokens": "--num-speculative-tokens", "topk": "--topk",
              "num_draft_tokens": "--num-draft-tokens", "acceptance": "--acceptance",
              "relaxed_topk": "--relaxed-topk", "relaxed_delta": "--relaxed-delta",
              "adaptive": "--speculative-adaptive"}


def add_input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-file", default=None, metavar="F",
                   help=f"JSONL requests, one a line (see {EXAMPLE}); default: the built-in held-out prompts, "
                        f"chunks of {len(HELD_OUT)} stdlib modules")
    p.add_argument("--num-prompts", type=positive_int, default=len(HELD_OUT), metavar="N",
                   help=f"how many built-in held-out prompts (default {len(HELD_OUT)})")


def add_bench_args(p: argparse.ArgumentParser) -> None:
    """The flags every benchmark takes: model, requests, sampling (exactly --max-tokens each, EOS ignored, as
    vLLM's benchmarks do), the draft shape, the batch size."""
    add_model_args(p)
    add_input_args(p)
    add_sampling_args(p, max_tokens=128, ignore_eos=True)
    add_spec_args(p, no_mtp=False)
    p.add_argument("--batch-size", type=positive_int, default=1, help="requests per generate call (default 1)")


def spec_config(args: argparse.Namespace) -> SpecConfig | None:
    """The SpecConfig the flags ask for (None with --no-mtp); raises ValueError for impossible values, for draft
    flags given together with --no-mtp, and for --acceptance relaxed with a --temperature that samples."""
    given = {k: getattr(args, k) for k in SPEC_FLAGS if getattr(args, k, None) is not None}
    if getattr(args, "no_mtp", False):
        if given:
            raise ValueError(f"--no-mtp decodes without drafts: drop {', '.join(SPEC_FLAGS[k] for k in given)}")
        return None
    spec = SpecConfig(**given)
    if spec.acceptance == "relaxed" and getattr(args, "temperature", 0) >= GREEDY_EPS:
        raise ValueError(f"--acceptance relaxed applies to greedy decoding only: drop --temperature "
                         f"{args.temperature:g} or the relaxed acceptance")
    return spec


def request_params(prompts: list[Prompt], args: argparse.Namespace, spec: SpecConfig | None) -> list[SamplingParams]:
    """Each request's SamplingParams (the flags, then its own JSONL keys), checked against `spec` before anything
    loads; errors name the request."""
    out = [p.params(args) for p in prompts]
    if spec is not None:
        for p, sp in zip(prompts, out):
            spec.check_request(sp, p.source)
    return out


def sampling_params(args: argparse.Namespace, **overrides: Any) -> SamplingParams:
    kw = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
              stop=args.stop, stop_token_ids=args.stop_token_ids, ignore_eos=args.ignore_eos)
    return SamplingParams(**(kw | overrides))


def describe(spec: SpecConfig | None) -> str:
    """'adaptive MTP k=3 topk=1 budget=3', 'fixed MTP k=3 ...' or 'no MTP'."""
    if spec is None:
        return "no MTP"
    relaxed = " relaxed" if spec.acceptance == "relaxed" else ""
    return (f"{'adaptive' if spec.adaptive else 'fixed'} MTP k={spec.num_speculative_tokens} topk={spec.topk} "
            f"budget={spec.budget}{relaxed}")


def load_llm(args: argparse.Namespace, spec: SpecConfig | None, **engine: Any) -> LLM:
    """The LLM the flags ask for (engine: more LLM keyword arguments, e.g. kv_cache_tokens, max_num_seqs); a missing
    checkpoint is a one-line FileNotFoundError. Under torchrun only rank 0 returns: the other ranks run its step
    plans until it is done, then exit (SystemExit 0)."""
    path = Path(args.model)
    if not (path / "config.json").is_file():
        hint = " (the bundled model is not built yet: see bench/train_tiny.py)" if path == BUNDLED_MODEL else ""
        raise FileNotFoundError(f"{path}: no checkpoint here (no config.json){hint}")
    on_gpu = args.device.startswith("cuda") if args.device else _cuda()
    dtype = args.dtype if args.dtype != "auto" else ("bfloat16" if on_gpu else "float32")
    llm = LLM(path, dtype=dtype, device=args.device, speculative=spec, backend=args.backend,
              tensor_parallel_size=args.tp, seed=args.seed, threads=args.threads,
              dequantize_fp8=args.dequantize_fp8, enforce_eager=args.enforce_eager, **engine)
    if not llm.tp.leads:
        llm.follow()
        shutdown_distributed()
        raise SystemExit(0)
    return llm


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# --- requests ------------------------------------------------------------------------------------------------------

EXAMPLE = "examples/requests.jsonl"
PER_REQUEST = frozenset(f.name for f in fields(SamplingParams))  # JSONL keys that override the flags per request


@dataclass(frozen=True)
class Prompt:
    """One request: text or token ids, its own sampling overrides, where it came from (for error messages) and its
    line in the input file (None for other sources)."""

    prompt: str | list[int]
    source: str
    overrides: tuple[tuple[str, Any], ...] = ()
    line: int | None = None

    def params(self, args: argparse.Namespace) -> SamplingParams:
        try:
            return sampling_params(args, **dict(self.overrides))
        except ValueError as e:
            raise ValueError(f"{self.source}: {e}") from None


def _parse_request(obj: object, where: str, line: int) -> Prompt:
    if not isinstance(obj, dict) or ("prompt" in obj) == ("prompt_token_ids" in obj):
        raise ValueError(f'{where}: expected an object with exactly one of "prompt" or "prompt_token_ids"')
    unknown = set(obj) - {"prompt", "prompt_token_ids"} - PER_REQUEST
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {', '.join(sorted(unknown))} (allowed: prompt or "
                         f"prompt_token_ids, and {', '.join(sorted(PER_REQUEST))})")
    bias = obj.get("logit_bias")
    if isinstance(bias, dict):  # JSON object keys are strings: token ids as OpenAI writes them
        obj = obj | {"logit_bias": {int(k) if isinstance(k, str) and k.isdigit() else k: v for k, v in bias.items()}}
    overrides = tuple((k, v) for k, v in obj.items() if k in PER_REQUEST)
    if "prompt" in obj:
        if not isinstance(obj["prompt"], str) or not obj["prompt"]:
            raise ValueError(f'{where}: "prompt" must be a non-empty string')
        check_text(obj["prompt"], where)
        return Prompt(obj["prompt"], where, overrides, line)
    ids = obj["prompt_token_ids"]
    if not isinstance(ids, list) or not ids or not all(type(t) is int and t >= 0 for t in ids):
        raise ValueError(f'{where}: "prompt_token_ids" must be a non-empty list of non-negative integers')
    return Prompt(ids, where, overrides, line)


def read_requests(path: str | Path) -> list[Prompt]:
    """The requests of a JSONL file (blank lines skipped); errors name the file and line."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{path}: is a directory, not a JSONL file")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such input file")
    out = []
    for n, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path} line {n}: not valid UTF-8 (byte {e.start})") from None
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} line {n}: not valid JSON ({e.msg})") from None
        out.append(_parse_request(obj, f"{path} line {n}", n))
    if not out:
        raise ValueError(f"{path}: no requests in the file")
    return out


def load_prompts(args: argparse.Namespace) -> list[Prompt]:
    """--input-file's requests, else --num-prompts built-in held-out prompts."""
    if args.input_file is not None:
        return read_requests(args.input_file)
    return [Prompt(p, f"held-out prompt {i} ({HELD_OUT[i % len(HELD_OUT)]})")
            for i, p in enumerate(held_out_prompts(args.num_prompts))]


def check_prompts(prompts: list[Prompt], llm: LLM) -> None:
    """Raise ValueError naming the request when the model cannot take it: text without a tokenizer, or token ids
    outside the vocabulary."""
    for p in prompts:
        if isinstance(p.prompt, str) and llm.tokenizer is None:
            raise ValueError(f"{p.source}: {llm.path} has no tokenizer.json, so prompts must be token ids "
                             '(--input-file with {"prompt_token_ids": [...]} lines)')
        if isinstance(p.prompt, list):
            check_token_ids(p.prompt, llm.config.vocab_size, p.source)


# --- output --------------------------------------------------------------------------------------------------------

@contextmanager
def interrupts_into(gen: Generator) -> Iterator[None]:
    """Around a loop over `gen` (an LLM stream): a Ctrl-C that lands in the loop's body, between items, is thrown
    into gen, so that gen stops as it does for one raised inside it (its requests aborted)."""
    try:
        yield
    except KeyboardInterrupt:
        gen.throw(KeyboardInterrupt)  # raises at once if gen already ended (the interrupt landed inside it)
        raise


def check_output(path: str | None, flag: str, formats: tuple[str, ...] | None = None) -> None:
    """Fail before a long run, not after, when its output cannot be written: a directory, a missing directory, an
    unknown format, a file that cannot be created or opened for writing (read-only, /proc), a device that refuses
    writes (/dev/full). The check opens the file as the run will (creating it, then removing it again)."""
    if path is None:
        return
    p = Path(path)
    if formats is not None and p.suffix.lower().lstrip(".") not in formats:
        raise ValueError(f"{flag} {path}: unknown format {p.suffix or '(no extension)'!r}; use one of "
                         f"{', '.join('.' + f for f in formats)}")
    if p.is_dir():
        raise ValueError(f"{flag} {path}: is a directory")
    if not p.resolve().parent.is_dir():
        raise FileNotFoundError(f"{flag} {path}: the directory {p.parent} does not exist")
    existed = p.exists()
    mode = p.stat().st_mode if existed else 0
    if stat.S_ISFIFO(mode):  # opening it would wait for a reader; the run writes to whoever reads it
        return
    device = stat.S_ISCHR(mode)
    try:
        with open(p, "w" if device else "a") as f:
            if device:  # find out now whether it takes data
                f.write("\n")
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot be written ({e.strerror})") from None
    if not existed:
        p.unlink(missing_ok=True)


def write_output(path: str, text: str, flag: str) -> None:
    try:
        Path(path).write_text(text)
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot be written ({e.strerror})") from None


def format_table(headers: list[str], rows: list[list[str]], align: str | None = None) -> str:
    """An aligned text table with a rule under the header; align has one 'l' or 'r' per column (default: the first
    column left, the others right)."""
    cols = list(zip(headers, *rows))
    widths = [max(len(c) for c in col) for col in cols]
    align = align or "l" + "r" * (len(headers) - 1)

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) if a == "l" else c.rjust(w) for c, w, a in zip(cells, widths, align)).rstrip()

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])
