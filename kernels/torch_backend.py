"""The torch backend's paths (plain torch, on any device): the same functions as the references, in fewer, larger
ops.

On a CPU a small model's step is dominated by per-op overhead and by small-M GEMMs, so these batch what the
references loop over and read weights in the layout a small-M GEMM wants. Each is tested against its reference
(tests/test_kernels_torch_backend.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attn_meta import AttnMeta


def mla_attention_mqa(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, meta: AttnMeta,
                      scale: float) -> torch.Tensor:
    """Same contract as mla_attention_ref (see mqa_attention)."""
    return mqa_attention(torch.cat([q_lat, q_pe], dim=-1), kv_cache, meta, scale, q_lat.shape[-1])


def mqa_attention(q: torch.Tensor, kv_cache: torch.Tensor, meta: AttnMeta, scale: float, c: int) -> torch.Tensor:
    """q [T, H, C+R] = [absorbed q_lat | rotated q_pe], kv_cache [slots, C+R] -> [T, H, C] float32.

    Every head shares the one latent row per key (MQA), so each sequence is two matmuls: scores [n*H, S] =
    q [n*H, C+R] @ rows.T, out = softmax(scores) @ rows[:, :C]; rows are a view of the cache when the sequence's
    slots are consecutive (meta.host_base), else gathered."""
    t, h, _ = q.shape
    q = q.to(kv_cache.dtype)
    if meta.num_seqs == 1 and t == 1:  # decode at batch 1: one query row per head, every key visible
        rows = meta.seq_rows(kv_cache, 0)
        scores = (q.view(h, -1) @ rows.T).float().mul_(scale).softmax(-1)
        return (scores.to(rows.dtype) @ rows[:, :c]).view(1, h, c).float()
    out = torch.empty(t, h, c, dtype=torch.float32, device=q.device)
    for b, s, e in meta.sequences():
        rows = meta.seq_rows(kv_cache, b)  # [S, C+R]
        scores = (q[s:e].reshape((e - s) * h, -1) @ rows.T).view(e - s, h, -1).float().mul_(scale)
        if e - s > 1:  # one query sees every key; several see the prefix plus their tree ancestors
            scores = scores.masked_fill(~meta.seq_mask(b)[:, None, :], float("-inf"))
        out[s:e] = (scores.softmax(-1).to(rows.dtype).view((e - s) * h, -1) @ rows[:, :c]).view(e - s, h, c)
    return out


def moe_sparse(x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor, w13: torch.Tensor,
               w2: torch.Tensor) -> torch.Tensor:
    """Same contract as moe_ref for plain (not FP8) weights: only the experts the tokens chose run, each once on
    all of its tokens (the union of a verify step's choices, never every expert densely).

    One token (decode) loops over its K experts directly; more tokens sort their (token, expert) pairs by expert,
    gather once and scatter the weighted results back in one index_add. The weights are used as w13[e].T /
    w2[e].T: laid out [E, D, 2I] / [E, I, D] in memory (model.lay_out_for_cpu) these are contiguous, and a
    small-M GEMM then costs about what its weights cost to read. Differentiable (training runs it)."""
    t, k = topk_ids.shape
    i = w2.shape[2]
    if t == 1:
        y = torch.zeros(1, x.shape[1], dtype=torch.float32, device=x.device)
        for j, e in enumerate(topk_ids[0].tolist()):  # the one host sync
            if e >= 0:
                h = x @ w13[e].t()  # [1, 2I]
                y = y + (F.silu(h[:, :i]) * h[:, i:]) @ w2[e].t() * topk_w[:, j:j + 1]
        return y.to(x.dtype)
    e_count = w13.shape[0]
    flat = topk_ids.reshape(-1)
    order = torch.argsort(torch.where(flat >= 0, flat, e_count), stable=True)  # pairs grouped by expert, -1 last
    counts = torch.bincount(flat[flat >= 0], minlength=e_count).tolist()  # the one host sync
    pairs = order[:sum(counts)]
    tok = pairs // k
    xs = x[tok]  # [n, D]
    outs = []
    start = 0
    for e, c in enumerate(counts):
        if c:
            h = xs[start:start + c] @ w13[e].t()
            outs.append((F.silu(h[:, :i]) * h[:, i:]) @ w2[e].t())
            start += c
    out = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device)
    if outs:
        out = out.index_add(0, tok, torch.cat(outs).float() * topk_w.reshape(-1)[pairs, None].float())
    return out.to(x.dtype)


def moe_runs(x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor, w13: torch.Tensor,
             w2: torch.Tensor) -> torch.Tensor:
    """Same contract as moe_ref for plain weights, for a few tokens (a verify step); fastest on the CPU layout,
    where w13[e].T / w2[e].T are contiguous.

    The union of the tokens' chosen experts splits into runs of consecutive expert ids; each run is one batched
    GEMM into every expert of the run for every token, SiLU * up, the routing weights (zero where a token did
    not choose the expert), one batched GEMM back down and a sum over the run. So each chosen expert's weights are
    read once (never an unchosen one's), in a few ops per run instead of a handful per expert; the extra
    multiply-adds for unchosen (token, expert) pairs are free at small M."""
    t, k = topk_ids.shape
    e, i = w13.shape[0], w2.shape[2]
    valid = topk_ids >= 0
    route = torch.zeros(t, e + 1, dtype=x.dtype, device=x.device)
    route.scatter_add_(1, torch.where(valid, topk_ids, e), topk_w.to(x.dtype) * valid)
    route = route.t()  # [E+1, T]
    chosen = sorted({j for row in topk_ids.tolist() for j in row if j >= 0})  # the one host sync
    out = torch.zeros(t, x.shape[1], dtype=x.dtype, device=x.device)
    for a, b in _runs(chosen):
        h = torch.bmm(x.expand(b - a, t, -1), w13[a:b].transpose(1, 2))  # [run, T, 2I]
        act = F.silu(h[..., :i]) * h[..., i:] * route[a:b, :, None]
        out += torch.bmm(act, w2[a:b].transpose(1, 2)).sum(0)
    return out


def _runs(ids: list[int]) -> list[tuple[int, int]]:
    """Sorted ids -> [start, end) of each run of consecutive ids."""
    runs: list[tuple[int, int]] = []
    for j in ids:
        if runs and runs[-1][1] == j:
            runs[-1] = (runs[-1][0], j + 1)
        else:
            runs.append((j, j + 1))
    return runs
