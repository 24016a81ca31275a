"""Building blocks: the build context, RMSNorm, (FP8-capable, shardable) Linear, vocab-parallel embedding and head,
YaRN RoPE."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from specdec.kernels import cpu_fused
from specdec.kernels.backend import Backend
from specdec.kernels.cpu_ops import dequant_ref
from specdec.kernels.triton_util import cdiv

from .config import ModelConfig
from .parallel import DistInfo


class RMSNorm(nn.Module):
    """fused: one cpu_fused.rms_norm op (the backend's C++ CPU kernels) instead of the torch ops below."""

    def __init__(self, dim: int, eps: float, dtype: torch.dtype, fused: bool = False):
        super().__init__()
        self.eps, self.fused = eps, fused
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype), requires_grad=False)
        # 0-dim float32 constants: an op with a Python float pays a scalar conversion on every call
        self.register_buffer("_inv_dim", torch.tensor(1.0 / dim), persistent=False)
        self.register_buffer("_eps", torch.tensor(float(eps)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fused:
            return cpu_fused.rms_norm(x, self.weight, self.eps)
        xf = x.float()
        r = torch.rsqrt((xf * xf).sum(-1, keepdim=True).mul_(self._inv_dim).add_(self._eps))
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return xf * r * self.weight
        return self.weight * (xf * r).to(x.dtype)


class Linear(nn.Module):
    """y = x @ W.T. W is [out, in] in the compute dtype, FP8 e4m3 with `weight_scale_inv` per block, or BF16 as
    released (a BF16 checkpoint tensor kept BF16 on a CPU: `Build.released_cpu`).

    `shard_dim` tells the loader how tensor parallelism splits the checkpoint tensor (0: column-parallel, output
    features; 1: row-parallel, input features; None: replicated). `in_features`/`out_features` are this rank's.
    `fp8_offset`: where this rank's FP8 share starts inside its first scale block (rows, cols); its scale grid then
    covers the cut blocks whole, each cut block's scale copied from the checkpoint.
    """

    def __init__(self, in_features: int, out_features: int, *, dtype: torch.dtype, backend: Backend,
                 fp8_block: tuple[int, int] | None = None, shard_dim: int | None = None,
                 fp8_offset: tuple[int, int] = (0, 0)):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.backend, self.shard_dim = backend, shard_dim
        self.fp8_block, self.fp8_offset = fp8_block, fp8_offset  # the block set when the weight stays FP8
        wdtype = torch.float8_e4m3fn if fp8_block else dtype
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=wdtype), requires_grad=False)
        if fp8_block:
            (bn, bk), (n0, k0) = fp8_block, fp8_offset
            self.weight_scale_inv = nn.Parameter(
                torch.empty(cdiv(n0 + out_features, bn), cdiv(k0 + in_features, bk), dtype=torch.float32),
                requires_grad=False)
        else:
            self.weight_scale_inv = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight_scale_inv is not None:
            return self.backend.fp8_linear(x, self.weight, self.weight_scale_inv, self.fp8_block, self.fp8_offset)
        if self.weight.dtype != x.dtype:  # a BF16 weight kept as released, float32 activations
            return self.backend.bf16_linear(x, self.weight)
        return x @ self.weight.t() if self.weight.t().is_contiguous() else F.linear(x, self.weight)

    def lay_out_for_cpu(self) -> None:
        """Store W as [in, out] in memory (self.weight stays its [out, in] view): a small-M GEMM x @ W.T then
        reads W row by row and costs about what its bytes cost, where the [out, in] layout costs ~linearly in M.
        Weights kept as released stay as they are (cpu_ops reads them [out, in])."""
        if self.weight_scale_inv is None and self.weight.dtype not in (torch.bfloat16, torch.float8_e4m3fn):
            transposed_storage(self.weight)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W [out, in] in `dtype` (dequantized when it stays FP8)."""
        if self.weight_scale_inv is None:
            return self.weight.to(dtype)
        return dequant_ref(self.weight, self.weight_scale_inv, self.fp8_block, self.fp8_offset).to(dtype)


@dataclass(frozen=True)
class Build:
    """What every layer is built with: the config, the compute dtype, the kernels, whether FP8 checkpoint weights
    stay FP8 at run time, this rank's place in a tensor-parallel group, and the MLA mode."""

    cfg: ModelConfig
    dtype: torch.dtype = torch.bfloat16
    backend: Backend = field(default_factory=Backend)
    keep_fp8: bool = False
    dist: DistInfo = field(default_factory=DistInfo)
    mla_mode: str = "auto"

    @property
    def released_cpu(self) -> bool:
        """Weights kept as released on a CPU: FP8 linears FP8, BF16 tensors (embedding, head, eh_proj) BF16."""
        return self.keep_fp8 and self.backend.cpu_kernels and self.cfg.fp8 is not None

    def linear(self, in_f: int, out_f: int, *, shard_dim: int | None = None, quantized: bool = True,
               what: str = "linear") -> Linear:
        """A Linear sized for this rank: splits out_f (shard_dim=0) or in_f (shard_dim=1) evenly over ranks.
        quantized: the checkpoint stores it FP8 when the config is FP8 (eh_proj, for one, never is; it stays BF16
        when released_cpu). A share may start inside an FP8 scale block where the weight is dequantized at load (the
        loader slices after dequantizing) or read by cpu_ops (the share keeps a copy of the cut block's scale).
        Raises ValueError naming `what` when the split is uneven, or would cut a block the GPU kernels read."""
        cfg, dist = self.cfg, self.dist
        kept = bool(cfg.fp8 and quantized and self.keep_fp8)
        offset = (0, 0)
        if shard_dim is not None and dist.world_size > 1:
            block = (cfg.fp8.block_n if shard_dim == 0 else cfg.fp8.block_k) if (cfg.fp8 and quantized) else 1
            n = out_f if shard_dim == 0 else in_f
            start, end = dist.shard(n, what)
            if kept and not self.backend.fp8_partial_blocks and (end - start) % block:  # the same test on every rank
                raise ValueError(f"{what}: a {dist.world_size}-way split of {n} into parts of {end - start} cuts "
                                 f"FP8 {block}-blocks, which the {self.backend.name} backend's FP8 kernels cannot "
                                 "read (the torch backend can)")
            if shard_dim == 0:
                out_f, offset = end - start, (start % block, 0)
            else:
                in_f, offset = end - start, (0, start % block)
        fp8_block = (cfg.fp8.block_n, cfg.fp8.block_k) if kept else None
        dtype = torch.bfloat16 if (self.released_cpu and not quantized) else self.dtype
        return Linear(in_f, out_f, dtype=dtype, backend=self.backend, fp8_block=fp8_block, shard_dim=shard_dim,
                      fp8_offset=offset if kept else (0, 0))

    def norm(self, dim: int) -> RMSNorm:
        return RMSNorm(dim, self.cfg.rms_norm_eps, self.dtype, fused=self.backend.cpu_kernels)


def transposed_storage(p: torch.Tensor) -> None:
    """Re-store the last two dims of p's data transposed in memory; p keeps its shape and values."""
    p.data = p.data.transpose(-1, -2).contiguous().transpose(-1, -2)


def fuse_columns(*linears: Linear) -> torch.Tensor:
    """One [in, sum(out)] tensor whose column blocks are the linears' weights (each linear's weight becomes a
    [out, in] view of its block): x @ fused computes every linear of the same input in one GEMM."""
    fused = torch.cat([lin.weight.data.t() for lin in linears], dim=1).contiguous()
    start = 0
    for lin in linears:
        lin.weight.data = fused[:, start:start + lin.out_features].t()
        start += lin.out_features
    return fused


def fuse_fp8_rows(*linears: Linear) -> tuple[torch.Tensor, torch.Tensor] | None:
    """FP8 linears of the same input as one: their weights stacked by rows [sum(out), in] and their scale grids
    likewise (each linear's weight and scale become views of their block), so one fp8_linear computes them all. None
    when a linear but the last ends inside a scale block, or one starts inside one (a cut tensor-parallel share):
    then the stacked rows would not meet their scales."""
    bn = linears[0].fp8_block[0]
    if any(lin.fp8_offset != (0, 0) for lin in linears) or any(lin.out_features % bn for lin in linears[:-1]):
        return None
    w = torch.cat([lin.weight.data for lin in linears])
    s = torch.cat([lin.weight_scale_inv.data for lin in linears])
    row = block = 0
    for lin in linears:
        n, nb = lin.out_features, lin.weight_scale_inv.shape[0]
        lin.weight.data, lin.weight_scale_inv.data = w[row:row + n], s[block:block + nb]
        row, block = row + n, block + nb
    return w, s


class VocabEmbedding(nn.Module):
    """Embedding whose rows are split across ranks; each rank looks up its rows and the results are summed. The
    table is stored in the compute dtype, or BF16 as released (Build.released_cpu); rows come out in the compute
    dtype."""

    def __init__(self, build: Build):
        super().__init__()
        cfg, dist = build.cfg, build.dist
        self.start, self.end = dist.shard(cfg.vocab_size, "embed_tokens (vocab_size)")
        self.dist, self.dtype = dist, build.dtype
        stored = torch.bfloat16 if build.released_cpu else build.dtype
        self.weight = nn.Parameter(torch.empty(self.end - self.start, cfg.hidden_size, dtype=stored),
                                   requires_grad=False)
        self.weight.shard_dim = 0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.dist.world_size == 1:
            return F.embedding(ids, self.weight).to(self.dtype)
        local = ids - self.start
        outside = (local < 0) | (local >= self.weight.shape[0])
        y = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight).to(self.dtype)
        y = y.masked_fill(outside[..., None], 0)
        return self.dist.all_reduce(y)


class VocabHead(nn.Module):
    """Output projection split by vocabulary rows; logits are gathered in float32. The weight is stored in the
    compute dtype, or BF16 as released (Build.released_cpu: the backend's BF16 kernel reads it)."""

    def __init__(self, build: Build):
        super().__init__()
        cfg, dist = build.cfg, build.dist
        start, end = dist.shard(cfg.vocab_size, "lm_head (vocab_size)")
        self.dist, self.backend = dist, build.backend
        stored = torch.bfloat16 if build.released_cpu else build.dtype
        self.weight = nn.Parameter(torch.empty(end - start, cfg.hidden_size, dtype=stored), requires_grad=False)
        self.weight.shard_dim = 0

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if w.dtype != h.dtype:
            logits = self.backend.bf16_linear(h, w)
        else:
            logits = h @ w.t() if w.t().is_contiguous() else F.linear(h, w)
        return self.dist.all_gather_last(logits.float())


class Rope(nn.Module):
    """YaRN rotary embedding for the rope part of q/k (DeepSeek's interleaved pairs). A forward looks up
    `cos_sin(positions)` once and hands the pair to every layer; the tables for every position are built at
    construction (with the same float32 ops per position as computing them on the fly) and never change."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        inv_freq = yarn_inv_freq(cfg)
        freqs = torch.arange(cfg.max_position_embeddings).float()[:, None] * inv_freq[None, :]  # [P, R/2]
        f = cfg.rope_attention_factor
        self.register_buffer("cos_table", freqs.cos() * f, persistent=False)
        self.register_buffer("sin_table", freqs.sin() * f, persistent=False)

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> (cos, sin) [T, R/2] float32, YaRN's attention factor folded in."""
        return self.cos_table[positions], self.sin_table[positions]


def apply_rope(x: torch.Tensor, cos_sin: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """x [T, ..., R] with interleaved pairs (x0, x1), (x2, x3)...; cos/sin [T, R/2]. Returns the rotated x with the
    pairs de-interleaved as [real parts | imaginary parts]; q and k go through the same map, so dot products equal
    those of the interleaved form."""
    cos, sin = cos_sin
    shape = (cos.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[1],)
    cos, sin = cos.view(shape), sin.view(shape)
    x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)


def yarn_inv_freq(cfg: ModelConfig) -> torch.Tensor:
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    y = cfg.yarn
    if y is None:
        return inv

    def corr_dim(rot: float) -> float:
        return dim * math.log(y.original_max_position_embeddings / (rot * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(corr_dim(y.beta_fast)), 0)
    high = min(math.ceil(corr_dim(y.beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1: keep the original frequency, 0: interpolate by `factor`
    return inv / y.factor * (1 - extrapolate) + inv * extrapolate
