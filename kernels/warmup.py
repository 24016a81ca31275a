"""Kernel cases: the Triton launches a model makes, as shapes; and a warm-up that compiles and tunes them once.

A case is one backend call at one shape: an FP8 linear (act_quant + fp8_gemm), the routed experts of one MoE layer,
MLA over the latent cache (and, for the compile check, a weight dequantization). `model_cases` lists the cases a
DeepSeek-V3-shaped model makes for a list of steps; `run_case` makes one call with placeholder inputs (on the meta
device under triton_util.compile_only, which is how kernels/aot.py compiles them for a GPU it does not have);
`warmup` runs each case once, so that compiling and autotuning happen at load and not inside the first request.
Triton keeps both in its cache directory, so a second process pays neither.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from .attn_meta import AttnMeta, causal_tree_mask
from .backend import Backend
from .fp8 import FP8, weight_dequant


@dataclass(frozen=True)
class Gemm:
    """An FP8 linear: x [m, k] @ dequant(w [n, k]).T with block-scaled weights, run W8A8."""

    m: int
    n: int
    k: int
    block: tuple[int, int] = (128, 128)

    def __str__(self) -> str:
        return f"fp8_linear M={self.m} N={self.n} K={self.k}"


@dataclass(frozen=True)
class Moe:
    """The routed experts of one MoE layer on one rank: `tokens` x top-`topk` of `experts_total` experts, of which
    `experts` live on this rank. block: FP8 weights with these scale blocks, or None for weights in x's dtype."""

    tokens: int
    experts: int
    experts_total: int
    topk: int
    hidden: int
    inter: int
    block: tuple[int, int] | None = (128, 128)

    def __str__(self) -> str:
        w = "fp8" if self.block else "plain"
        return f"moe T={self.tokens} E={self.experts}/{self.experts_total} top{self.topk} {w} D={self.hidden}"


@dataclass(frozen=True)
class Mla:
    """MLA over the latent cache: `batch` sequences with `ctx` cached keys and `new` query tokens each (1: decode);
    tree: a token tree's ancestor mask among the new tokens, else causal (decode, chains). width: a captured step's
    (AttnMeta.captured: a block table this wide, whose width bounds the lengths the kernel sizes its splits from)."""

    batch: int
    ctx: int
    new: int
    heads: int
    c: int = 512
    r: int = 64
    tree: bool = False
    width: int | None = None

    def __str__(self) -> str:
        return (f"mla B={self.batch} ctx={self.ctx} new={self.new} H={self.heads}{' tree' if self.tree else ''}"
                + (f" captured W={self.width}" if self.width else ""))


@dataclass(frozen=True)
class Dequant:
    """FP8 weight [n, k] with block scales to the compute dtype (weight_dequant: a load-time conversion, not part
    of a forward, so model_cases leaves it out)."""

    n: int
    k: int
    block: tuple[int, int] = (128, 128)

    def __str__(self) -> str:
        return f"weight_dequant N={self.n} K={self.k}"


Case = Gemm | Moe | Mla | Dequant


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a DeepSeek-V3-style model that set its kernels' shapes (ModelConfig's fields, renamed)."""

    hidden: int
    heads: int
    q_lora: int | None
    kv_lora: int
    nope: int
    rope: int
    v_head: int
    inter: int
    moe_inter: int
    experts: int
    shared: int
    topk: int
    fp8_block: tuple[int, int] | None

    @classmethod
    def of(cls, cfg: Any) -> ModelShape:
        """From a specdec.model.ModelConfig (read by attribute: kernels/ does not import the model)."""
        fp8 = cfg.fp8
        return cls(cfg.hidden_size, cfg.num_attention_heads, cfg.q_lora_rank, cfg.kv_lora_rank, cfg.qk_nope_head_dim,
                   cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.intermediate_size, cfg.moe_intermediate_size,
                   cfg.n_routed_experts, cfg.n_shared_experts, cfg.num_experts_per_tok,
                   (fp8.block_n, fp8.block_k) if fp8 is not None else None)


def model_cases(shape: ModelShape, tp: int, steps: Iterable[tuple[int, int, int]], *, fp8: bool) -> list[Case]:
    """The distinct kernel calls of one rank of a tp-way split for each step (batch, new tokens per sequence, cached
    context per sequence): every FP8 linear (fp8=False: the weights were dequantized, F.linear runs them), the MoE,
    and MLA over the cache when there is a context (fresh prompts attend with torch's fused causal attention), for
    several new tokens both as a chain and as a tree.
    Splits as the model does: heads, intermediate sizes and the shared expert by tp, routed experts whole."""
    s = shape
    h, blk = s.heads // tp, s.fp8_block
    linears = [(s.kv_lora + s.rope, s.hidden), (s.hidden, h * s.v_head),  # kv_a (replicated), o_proj (rows split)
               (s.inter // tp, s.hidden), (s.hidden, s.inter // tp)]  # dense MLP: gate and up, down
    if s.q_lora is None:
        linears.append((h * (s.nope + s.rope), s.hidden))
    else:
        linears += [(s.q_lora, s.hidden), (h * (s.nope + s.rope), s.q_lora)]
    if s.shared:
        linears += [(s.moe_inter * s.shared // tp, s.hidden), (s.hidden, s.moe_inter * s.shared // tp)]
    out: list[Case] = []
    for batch, new, ctx in steps:
        t = batch * new
        if fp8 and blk is not None:
            kv_b = [(h * (s.nope + s.v_head), s.kv_lora)] if ctx == 0 else []  # prefill's expanded K/V
            out += [Gemm(t, n, k, blk) for n, k in linears + kv_b]
        if s.experts:
            out.append(Moe(t, s.experts // tp, s.experts, s.topk, s.hidden, s.moe_inter, blk if fp8 else None))
        if ctx:  # several new tokens: a chain (causal: flashinfer's kernel) or a tree (the Triton kernel)
            out += [Mla(batch, ctx, new, h, s.kv_lora, s.rope, tree=tree) for tree in (False, True)[:1 + (new > 1)]]
    return list(dict.fromkeys(out))


def _fp8_codes(shape: tuple[int, ...], device: torch.device, g: torch.Generator | None) -> torch.Tensor:
    """Placeholder FP8 weights: random positive e4m3 codes (0x7f, NaN, excluded)."""
    return torch.empty(shape, dtype=torch.uint8, device=device).random_(0, 0x7F, generator=g).view(FP8)


def _tree_mask(n: int) -> torch.Tensor:
    """[n, n] ancestor mask of a binary tree (node i's parent is (i - 1) // 2)."""
    m = torch.eye(n, dtype=torch.bool)
    for i in range(1, n):
        m[i] |= m[(i - 1) // 2]
    return m


def mla_meta(case: Mla, device: torch.device) -> AttnMeta:
    """Each sequence's keys at consecutive slots. Built on the host and moved: AttnMeta.build needs real tensors,
    the meta device has none (a captured step's metadata needs none, and is built in place)."""
    mask = torch.cat([_tree_mask(case.new)] * case.batch) if case.tree else None  # None: causal (AttnMeta.build)
    if case.width:
        n, rows = case.new, case.ctx + case.new
        table = torch.zeros(case.batch, case.width, dtype=torch.long, device=device)
        table[:, :rows] = torch.arange(case.batch * rows, device=device).view(case.batch, rows)
        mask = (mask if mask is not None else causal_tree_mask([n] * case.batch)).to(device)
        ctx = torch.full((case.batch,), case.ctx, device=device)
        return AttnMeta.captured(table, ctx, mask, table[:, case.ctx:rows].reshape(-1), n)
    base = torch.arange(case.batch) * (case.ctx + case.new)
    meta = AttnMeta.contiguous(base, [case.ctx] * case.batch, [case.new] * case.batch, mask)
    moved = {f.name: getattr(meta, f.name) for f in fields(meta)}
    return AttnMeta(**{k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in moved.items()})


def run_case(backend: Backend, case: Case, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """One backend call at the case's shape on placeholder inputs (random, or shapes only on the meta device)."""
    g = torch.Generator(device).manual_seed(0) if device.type != "meta" else None
    randn = lambda *shape: torch.randn(*shape, device=device, generator=g).to(dtype)
    if isinstance(case, Gemm):
        bn, bk = case.block
        w = _fp8_codes((case.n, case.k), device, g)
        s = torch.full((-(-case.n // bn), -(-case.k // bk)), 1e-3, device=device)
        return backend.fp8_linear(randn(case.m, case.k), w, s, case.block)
    if isinstance(case, Dequant):
        bn, bk = case.block
        s = torch.full((-(-case.n // bn), -(-case.k // bk)), 1e-3, device=device)
        return weight_dequant(_fp8_codes((case.n, case.k), device, g), s, bn, bk, dtype=dtype)
    if isinstance(case, Moe):
        e, d, i, t = case.experts, case.hidden, case.inter, case.tokens
        ids = torch.rand(t, case.experts_total, device=device, generator=g).topk(case.topk, dim=-1).indices
        ids = torch.where(ids < e, ids, -1)  # this rank holds experts [0, e)
        w = torch.rand(t, case.topk, device=device, generator=g)
        if case.block is None:
            return backend.moe(randn(t, d), ids, w, randn(e, 2 * i, d), randn(e, d, i), None, None, (128, 128))
        bn, bk = case.block
        s13 = torch.full((e, 2 * -(-i // bn), -(-d // bk)), 1e-3, device=device)
        s2 = torch.full((e, -(-d // bn), -(-i // bk)), 1e-3, device=device)
        return backend.moe(randn(t, d), ids, w, _fp8_codes((e, 2 * i, d), device, g), _fp8_codes((e, d, i), device, g),
                           s13, s2, case.block)
    t = case.batch * case.new
    kv = randn(case.batch * (case.ctx + case.new), case.c + case.r)
    return backend.mla_attention(randn(t, case.heads, case.c), randn(t, case.heads, case.r), kv,
                                 mla_meta(case, device), 0.1)


def warmup(backend: Backend, cases: Sequence[Case], device: torch.device, dtype: torch.dtype) -> float:
    """Run each case once on `device` (a CUDA device, Triton backends) so its kernels compile and autotune now;
    returns the seconds taken. Memory: one case's placeholder weights at a time (a TP=8 DeepSeek-V3 MoE layer's
    32 experts are 1.4 GB)."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        for case in cases:
            run_case(backend, case, device, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - t0
