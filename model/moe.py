"""DeepSeekMoE: sigmoid router with group-limited, bias-corrected top-k; routed + shared experts; dense MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from specdec.kernels import cpu_fused
from specdec.kernels.torch_backend import moe_runs

from .config import ModelConfig
from .layers import Build, fuse_columns, fuse_fp8_rows, transposed_storage

RUNS_MAX_TOKENS = 8  # up to this many tokens, runs of chosen experts over every token (moe_runs) beat grouping
# each expert's tokens (moe_sparse); beyond it the multiply-adds for unchosen pairs cost more than they save:
# batched decoding of 8-16 requests lost a quarter of its throughput to them


class MLP(nn.Module):
    """SiLU-gated MLP, tensor-parallel (gate/up column, down row). Returns this rank's partial sum (no reduce)."""

    def __init__(self, build: Build, inter: int, what: str):
        super().__init__()
        self.dist, self.backend, self.fused = build.dist, build.backend, build.backend.cpu_kernels
        d = build.cfg.hidden_size
        self.gate_proj = build.linear(d, inter, shard_dim=0, what=f"{what}.gate_proj")
        self.up_proj = build.linear(d, inter, shard_dim=0, what=f"{what}.up_proj")
        self.down_proj = build.linear(inter, d, shard_dim=1, what=f"{what}.down_proj")
        self.w_gate_up: torch.Tensor | None = None  # [D, 2I]: gate and up in one GEMM (lay_out_for_cpu)
        self.w_gate_up8: tuple[torch.Tensor, torch.Tensor] | None = None  # FP8 kept: their rows stacked, + scales

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.w_gate_up8 is not None:
            h = self.backend.fp8_linear(x, *self.w_gate_up8, self.gate_proj.fp8_block)
        elif self.w_gate_up is not None:
            h = x @ self.w_gate_up
        else:
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        if self.fused:
            return self.down_proj.forward(cpu_fused.silu_mul(h))
        i = self.gate_proj.out_features
        return self.down_proj(F.silu(h[:, :i]) * h[:, i:])

    def lay_out_for_cpu(self) -> None:
        if self.gate_proj.weight_scale_inv is None:
            self.w_gate_up = fuse_columns(self.gate_proj, self.up_proj)
            self.down_proj.lay_out_for_cpu()
        elif self.fused:
            self.w_gate_up8 = fuse_fp8_rows(self.gate_proj, self.up_proj)


class DenseMLP(MLP):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dist.all_reduce(super().forward(x))


class Gate(nn.Module):
    """Router. Scores are sigmoids; `e_score_correction_bias` only chooses experts, never weighs them."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # routing runs in float32 whatever the model dtype (the checkpoint stores the weight in BF16)
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.hidden_size), requires_grad=False)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(cfg.n_routed_experts), requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (weights [T, K] float32, expert ids [T, K] int64)."""
        cfg = self.cfg
        scores = (x.float() @ self.weight.t()).sigmoid()  # [T, E]
        choice = scores + self.e_score_correction_bias
        if cfg.n_group > 1:
            t = x.shape[0]
            grouped = choice.view(t, cfg.n_group, -1)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [T, G]: sum of each group's top-2
            keep = torch.zeros_like(group_scores, dtype=torch.bool)
            keep.scatter_(1, group_scores.topk(cfg.topk_group, dim=-1).indices, True)
            choice = grouped.masked_fill(~keep[..., None], float("-inf")).view(t, -1)
        ids = choice.topk(cfg.num_experts_per_tok, dim=-1).indices
        w = scores.gather(1, ids)
        if cfg.norm_topk_prob:
            w = w / (w.sum(-1, keepdim=True) + 1e-20)
        return w * cfg.routed_scaling_factor, ids


class Expert(nn.Module):
    """One routed expert as the checkpoint stores it (MoE.finalize stacks them); whole on one rank."""

    def __init__(self, build: Build):
        super().__init__()
        d, i = build.cfg.hidden_size, build.cfg.moe_intermediate_size
        self.gate_proj = build.linear(d, i)
        self.up_proj = build.linear(d, i)
        self.down_proj = build.linear(i, d)


class MoE(nn.Module):
    """Routed experts are split across ranks (expert parallel); shared experts are tensor-parallel.

    Experts load as `experts.{global id}` modules (the checkpoint's names); `finalize()` then stacks them into
    w13 [E_local, 2I, D] and w2 [E_local, D, I] (+ block scales when FP8) for the grouped kernels.
    """

    def __init__(self, build: Build):
        super().__init__()
        cfg, dist = build.cfg, build.dist
        self.cfg, self.backend, self.dist = cfg, build.backend, dist
        self.fused = build.backend.cpu_kernels  # the router as one C++ op (kernels/cpu_fused.py)
        self.e0, e1 = dist.shard(cfg.n_routed_experts, "n_routed_experts (expert parallel)")
        self.n_local = e1 - self.e0
        self.gate = Gate(cfg)
        self.experts = nn.ModuleDict({str(e): Expert(build) for e in range(self.e0, e1)})
        self.shared_experts = (MLP(build, cfg.moe_intermediate_size * cfg.n_shared_experts, "shared_experts")
                               if cfg.n_shared_experts else None)
        self.block = (cfg.fp8.block_n, cfg.fp8.block_k) if (cfg.fp8 and build.keep_fp8) else (128, 128)
        self.w13 = self.w2 = self.s13 = self.s2 = None
        self.cpu_layout = False  # experts stored [E, D, 2I] / [E, I, D] (lay_out_for_cpu)

    def finalize(self) -> None:
        """Stack the loaded per-expert weights; drops the per-expert modules (once: later calls do nothing)."""
        if not hasattr(self, "experts"):
            return
        ex = [self.experts[str(e)] for e in range(self.e0, self.e0 + self.n_local)]
        p = lambda t: nn.Parameter(t, requires_grad=False)  # parameters, so training can unfreeze them
        self.w13 = p(torch.stack([torch.cat([m.gate_proj.weight, m.up_proj.weight]) for m in ex]))
        self.w2 = p(torch.stack([m.down_proj.weight for m in ex]))
        if ex[0].gate_proj.weight_scale_inv is not None:
            self.s13 = p(torch.stack([torch.cat([m.gate_proj.weight_scale_inv, m.up_proj.weight_scale_inv])
                                      for m in ex]))
            self.s2 = p(torch.stack([m.down_proj.weight_scale_inv for m in ex]))
        del self.experts

    def lay_out_for_cpu(self) -> None:
        """Experts stored as [E, D, 2I] / [E, I, D] in memory (w13/w2 keep their shapes), the router as [D, E]: what
        kernels/torch_backend.py's small-M GEMMs read fastest (moe_sparse for one token, moe_runs for several). Not
        for FP8 weights kept FP8."""
        if self.s13 is None:
            transposed_storage(self.w13)
            transposed_storage(self.w2)
            self.cpu_layout = True
        transposed_storage(self.gate.weight)
        if self.shared_experts is not None:
            self.shared_experts.lay_out_for_cpu()

    def forward(self, x: torch.Tensor, static: bool = False) -> torch.Tensor:
        """x [T, D] -> [T, D], routed and shared experts summed and reduced over the ranks. static: a captured
        step's (the routed experts at fixed shapes, nothing read back on the host: Backend.moe)."""
        if self.fused:
            cfg, gate = self.cfg, self.gate
            w, ids = cpu_fused.moe_route(x, gate.weight, gate.e_score_correction_bias, cfg.n_group, cfg.topk_group,
                                         cfg.num_experts_per_tok, cfg.norm_topk_prob, cfg.routed_scaling_factor)
        else:
            w, ids = self.gate(x)
        if self.n_local == self.cfg.n_routed_experts:  # every expert on this rank
            local = ids
        else:
            local = ids - self.e0
            local = torch.where((local >= 0) & (local < self.n_local), local, -1)
        if self.cpu_layout and not static and 1 < x.shape[0] <= RUNS_MAX_TOKENS:  # a verify step's few tokens
            y = moe_runs(x, local, w, self.w13, self.w2)
        else:
            y = self.backend.moe(x, local, w, self.w13, self.w2, self.s13, self.s2, self.block, static)
        if self.shared_experts is not None:
            y = y + self.shared_experts.forward(x)
        return self.dist.all_reduce(y)  # the one all-reduce of the layer: routed and shared together
