"""MLA attention over the latent cache (absorbed form), for decode, chains and token trees.

Queries are already absorbed: q_lat = q_nope @ W_UK lives in the latent space [.., kv_lora_rank]. Every cached row
is [latent (C) | rotated k_pe (R)]; the latent is both the key (with q_lat) and the value. The caller applies W_UV.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttnMeta:
    """Which cached keys each query sees, for a batch of B sequences packed into T query tokens.

    Sequence b owns queries cu_q[b]:cu_q[b+1]; they are also its new keys, written at the slots right after its
    ctx_lens[b] cached ones: key i of sequence b lives at slot block_table[b, i]. Query t of sequence b sees every
    key i < ctx_lens[b] (the prefix) and new key ctx_lens[b] + j iff tree_mask[t, j] (causal, chain or tree).
    """

    block_table: torch.Tensor  # [B, S] int64 slots
    ctx_lens: torch.Tensor  # [B] int64
    cu_q: torch.Tensor  # [B+1] int64
    tree_mask: torch.Tensor  # [T, N] bool, N = max new tokens of a sequence
    slots: torch.Tensor  # [T] int64 slot where each query token's own key is written
    host_ctx_lens: tuple[int, ...]
    host_cu_q: tuple[int, ...]

    @classmethod
    def build(cls, block_table: torch.Tensor, ctx_lens: list[int], n_new: list[int],
              tree_mask: torch.Tensor) -> AttnMeta:
        dev = block_table.device
        cu = [0]
        for n in n_new:
            cu.append(cu[-1] + n)
        seq = torch.repeat_interleave(torch.arange(len(n_new), device=dev), torch.tensor(n_new, device=dev))
        ctx = torch.tensor(ctx_lens, dtype=torch.long, device=dev)
        cu_t = torch.tensor(cu, dtype=torch.long, device=dev)
        idx = ctx[seq] + torch.arange(cu[-1], device=dev) - cu_t[seq]
        slots = block_table[seq, idx]
        return cls(block_table, ctx, cu_t, tree_mask.to(dev), slots, tuple(ctx_lens), tuple(cu))

    @property
    def num_seqs(self) -> int:
        return len(self.host_ctx_lens)

    def seq_mask(self, b: int) -> torch.Tensor:
        """[n_b, ctx_b + n_b] bool: which of sequence b's keys each of its queries sees."""
        s, e = self.host_cu_q[b], self.host_cu_q[b + 1]
        ctx = self.host_ctx_lens[b]
        m = torch.ones(e - s, ctx + e - s, dtype=torch.bool, device=self.tree_mask.device)
        m[:, ctx:] = self.tree_mask[s:e, : e - s]
        return m

    def seq_slots(self, b: int) -> torch.Tensor:
        return self.block_table[b, : self.host_ctx_lens[b] + self.host_cu_q[b + 1] - self.host_cu_q[b]]


def causal_tree_mask(n_new: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """[sum(n_new), max(n_new)] lower-triangular masks: plain causal attention among each sequence's new tokens."""
    n = max(n_new) if n_new else 0
    tri = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return torch.cat([tri[:k] for k in n_new]) if n_new else tri


def mla_attention_ref(q_lat: torch.Tensor, q_pe: torch.Tensor, kv_cache: torch.Tensor, meta: AttnMeta,
                      scale: float) -> torch.Tensor:
    """q_lat [T, H, C], q_pe [T, H, R], kv_cache [slots, C + R] -> [T, H, C] (float32)."""
    c = q_lat.shape[-1]
    out = torch.empty(q_lat.shape, dtype=torch.float32, device=q_lat.device)
    for b in range(meta.num_seqs):
        s, e = meta.host_cu_q[b], meta.host_cu_q[b + 1]
        if s == e:
            continue
        kv = kv_cache[meta.seq_slots(b)].float()  # [S, C+R]
        scores = torch.einsum("thc,sc->ths", q_lat[s:e].float(), kv[:, :c])
        scores += torch.einsum("thr,sr->ths", q_pe[s:e].float(), kv[:, c:])
        scores = (scores * scale).masked_fill(~meta.seq_mask(b)[:, None, :], float("-inf"))
        out[s:e] = torch.einsum("ths,sc->thc", scores.softmax(-1), kv[:, :c])
    return out
