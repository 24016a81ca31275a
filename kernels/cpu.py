"""Fast plain-torch paths for the CPU backend: the same functions as the references, in fewer, larger ops.

On a CPU a tiny model's step is dominated by per-op overhead, so these batch what the references loop over.
Each is tested against its reference (tests/test_kernels_cpu.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attn_meta import AttnMeta
from .moe import moe_ref

DENSE_LIMIT = 1 << 26  # multiply-adds up to which running every local expert on every token beats the loop


def mla_attention_mqa(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, meta: AttnMeta,
                      scale: float) -> torch.Tensor:
    """Same contract as mla_attention_ref. Every head shares the one latent row per key (MQA), so each sequence
    is two matmuls: scores [n*H, S] = q [n*H, C+R] @ rows.T, out = softmax(scores) @ rows[:, :C]."""
    t, h, c = q_lat.shape
    q = torch.cat([q_lat, q_pe], dim=-1).to(kv_cache.dtype)  # [T, H, C+R]
    out = torch.empty(q_lat.shape, dtype=torch.float32, device=q_lat.device)
    for b, s, e in meta.sequences():
        rows = kv_cache[meta.seq_slots(b)]  # [S, C+R]
        scores = (q[s:e].reshape((e - s) * h, -1) @ rows.T).float().view(e - s, h, -1) * scale
        if e - s > 1:  # one query sees every key; several see the prefix plus their tree ancestors
            scores = scores.masked_fill(~meta.seq_mask(b)[:, None, :], float("-inf"))
        out[s:e] = (scores.softmax(-1).to(rows.dtype).view((e - s) * h, -1) @ rows[:, :c]).view(e - s, h, c)
    return out


def moe_dense(x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              s13: torch.Tensor | None = None, s2: torch.Tensor | None = None,
              block: tuple[int, int] = (128, 128)) -> torch.Tensor:
    """Same contract as moe_ref. When the tokens choose about as many (token, expert) pairs as there are local
    experts, it runs every expert on every token in three large ops and zero-weights the unchosen ones (no host
    sync, no per-expert loop). With fewer pairs (decode), beyond DENSE_LIMIT multiply-adds, or with FP8 weights,
    it calls moe_ref, which reads only the chosen experts' weights."""
    t, k = topk_ids.shape
    e, two_i, d = w13.shape
    if s13 is not None:
        return moe_ref(x, topk_ids, topk_w, w13, w2, s13, s2, block)
    if t * k < e or t * e * (two_i * d + w2[0].numel()) > DENSE_LIMIT:
        return moe_grouped(x, topk_ids, topk_w, w13, w2)
    gate, up = F.linear(x, w13.reshape(e * two_i, d)).view(t, e, two_i).chunk(2, dim=-1)  # [T, E, I] each
    h = (F.silu(gate) * up).transpose(0, 1)  # [E, T, I]
    y = torch.bmm(h, w2.transpose(1, 2))  # [E, T, D]
    valid = topk_ids >= 0
    route = torch.zeros(t, e + 1, dtype=torch.float32, device=x.device)
    route.scatter_add_(1, torch.where(valid, topk_ids, e), topk_w.float() * valid)  # [T, E+1]
    return torch.einsum("etd,te->td", y.float(), route[:, :e]).to(x.dtype)


def moe_grouped(x: torch.Tensor, topk_ids: torch.Tensor, topk_w: torch.Tensor, w13: torch.Tensor,
                w2: torch.Tensor) -> torch.Tensor:
    """Same contract as moe_ref (plain weights): the (token, expert) pairs sorted by expert, gathered once, each
    chosen expert run on its contiguous run of rows, the weighted results summed back per token in one scatter.
    Reads only the chosen experts' weights; differentiable (training uses it)."""
    t, k = topk_ids.shape
    e = w13.shape[0]
    flat = topk_ids.reshape(-1)
    order = torch.argsort(torch.where(flat >= 0, flat, e), stable=True)  # pairs grouped by expert, -1 last
    counts = torch.bincount(flat[flat >= 0], minlength=e).tolist()  # the one host sync
    n = sum(counts)
    pairs = order[:n]
    tok = pairs // k
    xs = x[tok]  # [n, D]
    outs = []
    start = 0
    for j, c in enumerate(counts):
        if c:
            gate, up = F.linear(xs[start:start + c], w13[j]).chunk(2, dim=-1)
            outs.append(F.linear(F.silu(gate) * up, w2[j]))
            start += c
    out = torch.zeros(t, x.shape[1], dtype=torch.float32, device=x.device)
    if outs:
        y = torch.cat(outs).float() * topk_w.reshape(-1)[pairs, None].float()
        out = out.index_add(0, tok, y)
    return out.to(x.dtype)
