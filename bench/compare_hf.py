"""The same checkpoint and prompt token ids through HF transformers and through specdec, batch 1, greedy, float32:
tokens/s of each, with and without MTP, the ratios, and whether all four produce the same greedy tokens.

transformers (a test extra) decodes with `DeepseekV3ForCausalLM.generate`, plain and with `use_mtp=True` (its
MTPCandidateGenerator drafts one token per MTP layer per step, and rebuilds its MtpModel, loading the MTP weights,
on every generate call; that is part of what it costs). An FP8 checkpoint is dequantized to a float32 copy first
(tests/oracle.py), as transformers' own FP8 loader mis-sizes partial blocks. EOS is ignored on both sides so every
run generates exactly --max-tokens.

    .venv/bin/python bench/compare_hf.py                      # the bundled model, a held-out prompt
    .venv/bin/python bench/compare_hf.py --model CKPT --max-tokens 32 --runs 1
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from specdec import BUNDLED_MODEL, LLM
from specdec.params import SamplingParams, SpecConfig
from specdec.prompts import HELD_OUT, held_out_prompts

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from oracle import dequantized_copy  # noqa: E402


def load_hf(ckpt: Path, work: Path, device: torch.device) -> Any:
    """DeepseekV3ForCausalLM in float32 from a dequantized copy; MTP weights left for MtpModel to find."""
    import transformers
    from transformers import DeepseekV3ForCausalLM

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    plain = dequantized_copy(ckpt, work)
    n = json.loads((plain / "config.json").read_text())["num_hidden_layers"]
    # transformers expects the MTP layer at index 61 (DeepSeek-V3's); point it at this model's first MTP layer, which
    # both keeps it out of the main model and tells MtpModel where to load it from
    DeepseekV3ForCausalLM._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{n}.*"]
    model = DeepseekV3ForCausalLM.from_pretrained(str(plain), dtype=torch.float32, attn_implementation="eager")
    model.generation_config.eos_token_id = None  # generate exactly max_new_tokens, as ignore_eos does
    model.generation_config.pad_token_id = 0
    return model.to(device).eval()


@torch.inference_mode()
def hf_generate(model: Any, ids: list[int], n: int, use_mtp: bool) -> list[int]:
    x = torch.tensor([ids], device=model.device)
    out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                         do_sample=False, use_mtp=use_mtp)
    return out[0, len(ids):].tolist()


def timed(fn: Any, runs: int) -> tuple[list[int], float]:
    """fn() once to warm up, then the best of `runs` timed calls: (tokens, seconds)."""
    fn()
    best, toks = float("inf"), []
    for _ in range(runs):
        t0 = time.perf_counter()
        toks = fn()
        best = min(best, time.perf_counter() - t0)
    return toks, best


def first_mismatch(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=str(BUNDLED_MODEL), help="checkpoint directory (default: the bundled model)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--num-speculative-tokens", type=int, default=1, metavar="K",
                   help="specdec's MTP draft depth (default 1: what transformers drafts with one MTP layer)")
    p.add_argument("--prompt-index", type=int, default=HELD_OUT.index("textwrap.py"),
                   help="which held-out prompt (needs tokenizer.json; else 48 seeded random ids)")
    p.add_argument("--runs", type=int, default=3, help="timed runs per configuration, best taken (default 3)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch decides)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dev = torch.device(args.device)
    n = args.max_tokens

    llm = LLM(args.model, dtype="float32", device=dev, backend="torch",
              speculative=SpecConfig(args.num_speculative_tokens))
    plain = llm.with_speculative(None)
    if llm.tokenizer is not None:
        text = held_out_prompts(args.prompt_index + 1)[args.prompt_index]
        ids = [llm.config.bos_token_id, *llm.tokenizer.encode(text, add_special_tokens=False).ids]
    else:
        ids = torch.randint(2, llm.config.vocab_size, (48,), generator=torch.Generator().manual_seed(0)).tolist()
    params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)

    with tempfile.TemporaryDirectory() as work:
        hf = load_hf(Path(args.model), Path(work) / "hf", dev)
        results = {
            "hf plain": timed(lambda: hf_generate(hf, ids, n, False), args.runs),
            "hf use_mtp": timed(lambda: hf_generate(hf, ids, n, True), args.runs),
        }
    results["specdec plain"] = timed(lambda: plain.generate([ids], params)[0].token_ids, args.runs)
    results["specdec MTP"] = timed(lambda: llm.generate([ids], params)[0].token_ids, args.runs)

    print(f"{args.model}: {len(ids)} prompt tokens, {n} new tokens, batch 1, greedy, float32 on {dev}, "
          f"best of {args.runs}; specdec MTP k={args.num_speculative_tokens}")
    tps = {k: len(t) / s for k, (t, s) in results.items()}
    width = max(map(len, tps))
    for k, v in tps.items():
        print(f"  {k:<{width}}  {v:9.1f} tokens/s")
    print(f"  MTP speedup: hf {tps['hf use_mtp'] / tps['hf plain']:.2f}x, "
          f"specdec {tps['specdec MTP'] / tps['specdec plain']:.2f}x")
    print(f"  specdec / hf: plain {tps['specdec plain'] / tps['hf plain']:.2f}x, "
          f"MTP {tps['specdec MTP'] / tps['hf use_mtp']:.2f}x")
    ref = results["hf plain"][0]
    ok = True
    for k, (toks, _) in results.items():
        i = first_mismatch(toks, ref)
        if i is not None:
            ok = False
            print(f"  DISAGREE: {k} differs from hf plain at new token {i} ({toks[i:i + 4]} vs {ref[i:i + 4]})")
    if ok:
        print(f"  greedy tokens agree: all four produced the same {len(ref)} tokens")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
