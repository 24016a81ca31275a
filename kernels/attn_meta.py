"""Attention metadata: which cached keys each query token sees (decode, chains, token trees), addressed by slot.

Every attention implementation (kernels/mla.py, kernels/torch_backend.py, kernels/flashinfer_mla.py, model/mla.py)
reads it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttnMeta:
    """Which cached keys each query sees, for a batch of B sequences packed into T query tokens.

    Sequence b owns queries cu_q[b]:cu_q[b+1]; they are also its new keys, written at the slots right after its
    ctx_lens[b] cached ones: key i of sequence b lives at slot block_table[b, i]. Query t of sequence b sees every
    key i < ctx_lens[b] (the prefix) and new key ctx_lens[b] + j iff tree_mask[t, j] (causal, chain or tree).
    What the host needs to choose a kernel (lengths, is_causal) is host fields, set by the builder: reading them
    never syncs with the device.
    """

    block_table: torch.Tensor  # [B, S] int64 slots
    ctx_lens: torch.Tensor  # [B] int64
    cu_q: torch.Tensor  # [B+1] int64
    tree_mask: torch.Tensor  # [T, N] bool, N = max new tokens of a sequence
    slots: torch.Tensor  # [T] int64 slot where each query token's own key is written
    host_ctx_lens: tuple[int, ...]
    host_cu_q: tuple[int, ...]
    host_base: tuple[int, ...] | None = None  # set when sequence b's keys sit at slots base[b], base[b] + 1, ...
    is_causal: bool = False  # every sequence's new tokens attend causally (decode, chains, prefill)

    @classmethod
    def build(cls, block_table: torch.Tensor, ctx_lens: list[int], n_new: list[int],
              tree_mask: torch.Tensor | None = None, host_base: tuple[int, ...] | None = None) -> AttnMeta:
        """tree_mask None: causal (a chain, a prompt); a mask given is a tree's, causal only when every sequence
        has one new token (the mask is never read back to find out). host_base: pass it when sequence b's keys
        sit at slots host_base[b], host_base[b] + 1, ... (CPU attention then slices the cache)."""
        dev = block_table.device
        causal = tree_mask is None or max(n_new, default=0) <= 1
        if tree_mask is None:
            tree_mask = causal_tree_mask(n_new, dev)
        cu = [0]
        for n in n_new:
            cu.append(cu[-1] + n)
        b = len(n_new)
        ints = torch.tensor(list(ctx_lens) + cu + list(n_new), dtype=torch.long).to(dev, non_blocking=True)
        ctx, cu_t, n_t = ints[:b], ints[b:2 * b + 1], ints[2 * b + 1:]  # one host-to-device copy
        if b == 1:  # one sequence (decode at batch 1): its new keys' slots are a slice of its row map
            slots = block_table[0, ctx_lens[0]:ctx_lens[0] + n_new[0]]
        else:
            seq = torch.repeat_interleave(torch.arange(b, device=dev), n_t, output_size=cu[-1])  # no sync
            idx = ctx[seq] + torch.arange(cu[-1], device=dev) - cu_t[seq]
            slots = block_table[seq, idx]
        return cls(block_table, ctx, cu_t, tree_mask.to(dev), slots, tuple(ctx_lens), tuple(cu), host_base, causal)

    @classmethod
    def contiguous(cls, base: torch.Tensor, ctx_lens: list[int], n_new: list[int],
                   tree_mask: torch.Tensor | None = None) -> AttnMeta:
        """Sequence b's keys at consecutive slots base[b], base[b] + 1, ...; tree_mask as in build (None: causal).
        A CPU base also fills host_base, so CPU attention can slice the cache instead of gathering it."""
        width = max(c + n for c, n in zip(ctx_lens, n_new))
        block_table = base[:, None] + torch.arange(width, device=base.device)[None, :]
        return cls.build(block_table, ctx_lens, n_new, tree_mask,
                         tuple(base.tolist()) if base.device.type == "cpu" else None)

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

    def sequences(self) -> Iterator[tuple[int, int, int]]:
        """(b, start, end) of every sequence with new tokens: its queries are rows start:end."""
        for b in range(self.num_seqs):
            s, e = self.host_cu_q[b], self.host_cu_q[b + 1]
            if e > s:
                yield b, s, e

    def seq_slots(self, b: int) -> torch.Tensor:
        return self.block_table[b, : self.host_ctx_lens[b] + self.host_cu_q[b + 1] - self.host_cu_q[b]]

    def write(self, kv_cache: torch.Tensor, rows: torch.Tensor) -> None:
        """kv_cache[slots] = rows: the step's new keys (a slice copy for one sequence at consecutive slots)."""
        if self.host_base is not None and self.num_seqs == 1:
            start = self.host_base[0] + self.host_ctx_lens[0]
            kv_cache[start:start + rows.shape[0]] = rows
        else:
            kv_cache[self.slots] = rows

    def seq_rows(self, kv_cache: torch.Tensor, b: int) -> torch.Tensor:
        """kv_cache's rows of sequence b's keys [S, row], in key order: a view when the slots are consecutive."""
        if self.host_base is None:
            return kv_cache[self.seq_slots(b)]
        start = self.host_base[b]
        return kv_cache[start:start + self.host_ctx_lens[b] + self.host_cu_q[b + 1] - self.host_cu_q[b]]

    @property
    def max_new(self) -> int:
        return max((e - s for s, e in zip(self.host_cu_q, self.host_cu_q[1:])), default=0)

    @property
    def from_scratch(self) -> bool:
        """Every sequence starts at row 0 and attends causally (prompts prefilled from the start): attention can
        run on this step's own keys, without the cache."""
        return self.is_causal and not any(self.host_ctx_lens)


def causal_tree_mask(n_new: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """[sum(n_new), max(n_new)] lower-triangular masks: plain causal attention among each sequence's new tokens."""
    n = max(n_new) if n_new else 0
    tri = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return torch.cat([tri[:k] for k in n_new]) if n_new else tri
