"""torch.compile of the CPU decode step against eager: the measurement behind "a CPU decodes eagerly" (issue 21).

Compiles the bundled model's plain decode forward (embedding to logits, batch 1) at a fixed shape with inductor in
the variants the issue's probe named, then times each against eager, interleaved, on one thread. The step is made
compilable the way a compiled path would need it: a static block table, the new row written by a mutating custom op
at a tensor slot (without one, inductor functionalizes the cache write and copies the whole cache every call), and
host lengths fixed at a bound (the C++ attention reads the lengths tensor). Prints the compile time, the step time
(best and median), the ratio to eager in the same round, and the logits' relative error.

    python bench/compile_step.py
    python bench/compile_step.py --variants default cpp_wrapper

The default CPU path only (weights as released, on our C++ ops): the float32 reference path (--dequantize-fp8)
slices the cache by host lengths and picks experts on the host, so it does not compile as one graph.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

VARIANTS = {  # inductor settings per variant
    "default": {},
    "cpp_wrapper": {"cpp_wrapper": True},
    "autotune_freezing": {"max_autotune": True, "freezing": True},
}


@torch.library.custom_op("specdec_bench::write_rows", mutates_args=("kv",))
def write_rows(kv: torch.Tensor, slots: torch.Tensor, rows: torch.Tensor) -> None:
    kv.index_copy_(0, slots, rows)


class _Cache:
    """The latent cache as the model reads it: layer i's rows."""

    def __init__(self, kv: torch.Tensor):
        self.kv = kv

    def layer(self, i: int) -> torch.Tensor:
        return self.kv[i]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    ap.add_argument("--steps", type=int, default=200, help="timed steps per variant and round")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    import torch._inductor.config as inductor_config

    from specdec import LLM
    from specdec.kernels.attn_meta import AttnMeta

    AttnMeta.write = lambda self, kv, rows: write_rows(kv, self.slots, rows)
    torch.set_num_threads(1)
    llm = LLM(dtype="float32", speculative=None, threads=1)
    model, cfg = llm.model, llm.model.cfg
    width = 4096  # the static block table: slots 0..width-1
    row = cfg.kv_lora_rank + cfg.qk_rope_head_dim
    cache = _Cache(torch.zeros(cfg.num_hidden_layers, width + 1, row))
    table = torch.arange(width)[None]

    def step(token: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor, kv: torch.Tensor) -> torch.Tensor:
        # host lengths are constants (a bound), so one graph serves every position; the CPU attention reads ctx_lens
        meta = AttnMeta(table, pos, torch.tensor([0, 1]), mask, pos, (width - 1,), (0, 1), is_causal=True)
        return model.logits(model(token, pos, meta, _Cache(kv)))

    def inputs(n: int) -> tuple[torch.Tensor, ...]:
        return torch.tensor([5 + n % 97]), torch.tensor([n]), torch.ones(1, 1, dtype=torch.bool), cache.kv

    def timed(fn) -> list[float]:
        out = []
        for i in range(args.steps):
            a = inputs(200 + i)
            t = time.perf_counter()
            fn(*a)
            out.append(time.perf_counter() - t)
        return out

    with torch.inference_mode():
        ref = step(*inputs(100))
        compiled = {}
        for name in args.variants:
            torch._dynamo.reset()
            with inductor_config.patch(VARIANTS[name]):
                fn = torch.compile(step, fullgraph=True, dynamic=False)
                t = time.perf_counter()
                out = fn(*inputs(100))
                secs = time.perf_counter() - t
            err = float((out - ref).norm() / ref.norm())
            print(f"{name}: compiled in {secs:.1f} s, logits rel. error {err:.1e}, argmax equal "
                  f"{bool(out.argmax() == ref.argmax())}", flush=True)
            compiled[name] = fn
        times: dict[str, list[float]] = {"eager": []} | {n: [] for n in compiled}
        ratios: dict[str, list[float]] = {n: [] for n in compiled}
        for _ in range(args.rounds):  # interleaved: eager, then each variant, every round
            eager = timed(step)
            times["eager"] += eager
            for name, fn in compiled.items():
                t = timed(fn)
                times[name] += t
                ratios[name].append(statistics.median(eager) / statistics.median(t))
    print(f"\n{'path':<20}{'best ms':>9}{'median ms':>11}{'speedup (median of rounds)':>28}")
    for name, ts in times.items():
        r = f"{statistics.median(ratios[name]):.2f}x" if name in ratios else "1.00x"
        print(f"{name:<20}{min(ts) * 1e3:>9.2f}{statistics.median(ts) * 1e3:>11.2f}{r:>28}")


if __name__ == "__main__":
    main()
