"""What one engine step dispatches: a deterministic count of its aten calls, and the weight bytes those calls read.

`OpCounter` is a TorchDispatchMode: around any code it counts every call that reaches torch's dispatcher, by
overload packet ("aten.mm", "aten.view", "specdec.fp8_linear"). A custom op (torch.ops.specdec.*) counts once, its
kernel running below the mode. Counts depend on the code and the data, never on timing or load, so a test can hold
a step to an op budget. A torch.compile'd function runs eagerly under a dispatch mode, so what is counted is always
the eager step (the reference a compiled step is made from).

Given a model's weights (roofline.weight_tensors) it also sums the weight bytes each call reads: a view or a call
that returns its input reads nothing; a gather (embedding, index) reads the rows it returns; a routed-expert op
(EXPERT_OPS) reads the chosen experts' slabs of each stacked weight; any other call reads every element of each
weight it is given. Triton kernels launch outside the dispatcher, so their reads go unseen: bytes are for the
torch backend.

`profile_steps` runs one plain decode step and one speculative step of an LLM, its verify and draft parts apart.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .api import LLM
from .params import SamplingParams, SpecConfig
from .roofline import storage_key, weight_tensors

GATHERS = frozenset({"aten.embedding", "aten.index", "aten.index_select", "aten.gather"})
EXPERT_OPS = {"specdec.fp8_moe": 1}  # op -> position of its topk_ids [T, K] (-1: not on this rank)


def _elements(t: torch.Tensor) -> int:
    """Elements t reads: its numel, or less when strides overlap (an expanded view)."""
    if t.numel() == 0:
        return 0
    return min(t.numel(), 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride())))


class OpCounter(TorchDispatchMode):
    """`with OpCounter() as c: ...` counts the region's dispatcher calls in c.ops (overload packet -> calls); given
    `weights` (roofline.weight_tensors of the model), c.weight_bytes sums what those calls read of them (see the
    module docstring). Counters nest: an inner one sees its region, the outer one everything."""

    def __init__(self, weights: dict[int, torch.Tensor] | None = None):
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.weight_bytes = 0
        self.weights = weights

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        name = str(func.overloadpacket)
        self.ops[name] += 1
        out = func(*args, **kwargs)
        if self.weights:
            self.weight_bytes += self._reads(name, args, kwargs, out)
        return out

    def _reads(self, name: str, args: tuple, kwargs: dict, out: Any) -> int:
        used = [t for t in tree_leaves((args, kwargs))
                if isinstance(t, torch.Tensor) and storage_key(t) in self.weights]
        if not used:
            return 0
        outs = {storage_key(t) for t in tree_leaves(out) if isinstance(t, torch.Tensor)}
        used = [t for t in used if storage_key(t) not in outs]  # views and no-op conversions read nothing
        if not used:
            return 0
        if name in GATHERS:
            return out.numel() * out.element_size()
        if name in EXPERT_OPS:
            ids = args[EXPERT_OPS[name]]
            chosen = torch.unique(ids[ids >= 0]).numel()
            return sum(chosen * t[0].numel() * t.element_size() for t in used)
        return sum(_elements(t) * t.element_size() for t in used)

    @property
    def num_ops(self) -> int:
        return sum(self.ops.values())


@dataclass(frozen=True)
class StepProfile:
    """One step, or one phase of it: ops by overload packet, the weight bytes they read, the layer runs it made
    (main layers for a plain or verify step, MTP-layer runs for the draft) and the tokens each run processed (None
    where runs differ: the draft's MTP extend takes the accepted tokens)."""

    ops: Counter[str]
    weight_bytes: int
    layers: int
    tokens: int | None

    @property
    def num_ops(self) -> int:
        return sum(self.ops.values())

    @property
    def per_layer(self) -> float:
        return self.num_ops / self.layers

    @property
    def per_token_layer(self) -> float | None:
        return None if self.tokens is None else self.num_ops / (self.layers * self.tokens)

    def as_dict(self, top: int = 15) -> dict:
        return {"ops": self.num_ops, "layers": self.layers, "tokens": self.tokens, "ops_per_layer": self.per_layer,
                "ops_per_token_layer": self.per_token_layer, "weight_bytes": self.weight_bytes,
                "top_ops": dict(self.ops.most_common(top))}


@contextmanager
def _decoding(x: LLM, prompt: str | list[int], warm: int) -> Iterator[Callable[[], None]]:
    """x's engine, idle before, with one greedy request `warm` decode steps in; yields a function that runs one more
    engine step and checks that it decoded. The request is aborted after."""
    e = x.engine
    if e.has_unfinished:
        raise RuntimeError("profile_steps needs an idle engine: requests are running")
    ids = x.encode(prompt) if isinstance(prompt, str) else list(prompt)
    r = e.add(ids, SamplingParams(max_tokens=(warm + 2) * e.step_rows, temperature=0, ignore_eos=True),
              "profile prompt")

    def step() -> None:
        n = r.metrics.num_steps
        e.step()
        if r.metrics.num_steps != n + 1:
            raise RuntimeError("profile_steps: the counted engine step did not decode the profile prompt")

    try:
        while r.metrics.num_decode_steps < warm:
            if r.finished:
                raise RuntimeError(f"profile_steps: the profile prompt ended early ({r.error or r.finish_reason})")
            e.step()
        yield step
    finally:
        e.abort(r)


@contextmanager
def _wrapped(obj: object, name: str, wrap: Callable[[Callable], Callable]) -> Iterator[None]:
    """obj.name replaced by wrap(obj.name) on the instance while inside; what the instance held before comes back."""
    had, old = name in vars(obj), vars(obj).get(name)
    setattr(obj, name, wrap(getattr(obj, name)))
    try:
        yield
    finally:
        if had:
            setattr(obj, name, old)
        else:
            delattr(obj, name)


def profile_steps(llm: LLM, prompt: str | list[int], spec: SpecConfig = SpecConfig(3),
                  warm: int = 2) -> dict[str, StepProfile]:
    """One greedy request (prompt: text or token ids) decoded `warm` steps, then one step counted, on llm's weights:
    "plain" a plain decode step; "verify" a speculative step with `spec`'s shape drafted whole (adaptive
    speculation off, so that the step drafts) less its drafting; "draft" the drafting (Drafter.draft and .extend:
    the MTP runs, the heads, the draft sampling). The engines must be idle."""
    weights = weight_tensors(llm.model)
    cfg = llm.config
    with _decoding(llm.with_speculative(None), prompt, warm) as step, OpCounter(weights) as c:
        step()
    plain = StepProfile(c.ops, c.weight_bytes, cfg.num_hidden_layers, 1)
    mtp = llm.with_speculative(dataclasses.replace(spec, adaptive=False))
    draft, runs = OpCounter(weights), [0]

    def in_draft(f: Callable) -> Callable:
        @functools.wraps(f)
        def counted(*args: Any, **kwargs: Any) -> Any:
            with draft:
                return f(*args, **kwargs)
        return counted

    def run_counted(f: Callable) -> Callable:
        @functools.wraps(f)
        def counted(*args: Any, **kwargs: Any) -> Any:
            runs[0] += 1
            return f(*args, **kwargs)
        return counted

    with _decoding(mtp, prompt, warm) as step, ExitStack() as patches:
        for obj, name, wrap in ((mtp.engine.drafter, "draft", in_draft), (mtp.engine.drafter, "extend", in_draft),
                                (llm.model, "mtp_forward", run_counted)):
            patches.enter_context(_wrapped(obj, name, wrap))
        with OpCounter(weights) as c:
            step()
    if not runs[0]:
        raise RuntimeError("profile_steps: the speculative step ran no MTP layer (Drafter.draft / .extend unused?)")
    return {"plain": plain,
            "verify": StepProfile(c.ops - draft.ops, c.weight_bytes - draft.weight_bytes, cfg.num_hidden_layers,
                                  1 + spec.budget),
            "draft": StepProfile(draft.ops, draft.weight_bytes, runs[0], None)}


def kernels_ran(backend: str, profiles: dict[str, StepProfile]) -> dict[str, Any]:
    """Which kernels the profiled steps ran: the backend, our custom ops (torch.ops.specdec.*) that ran, and, when
    any did, the CPU code path they take (kernels/cpu_ops.py's best ISA)."""
    ops = sorted({op for p in profiles.values() for op in p.ops if op.startswith("specdec.")})
    isa = None
    if ops:
        from .kernels import cpu_ops

        isa = cpu_ops.isas()[0]
    return {"backend": backend, "custom_ops": ops, "isa": isa}
