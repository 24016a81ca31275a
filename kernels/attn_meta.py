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

    A captured step's metadata (`static`, built by `AttnMeta.captured`) lives in preallocated tensors that every
    replay refills: its lengths are on the device only, and host_ctx_lens hold upper bounds (the block table's
    width less the new tokens), from which kernels size their launches (`longest`). What needs the lengths on the
    host (seq_slots, seq_mask, seq_rows, from_scratch, flashinfer's plan) does not take it: the first three raise.
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
    static: bool = False  # a captured step's: host_ctx_lens are bounds, not lengths (see above)

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

    @classmethod
    def captured(cls, block_table: torch.Tensor, ctx_lens: torch.Tensor, tree_mask: torch.Tensor,
                 slots: torch.Tensor, n_new: int) -> AttnMeta:
        """A captured step's metadata over preallocated tensors: B = block_table.shape[0] sequences of n_new new
        tokens each (cu_q follows, built here once), ctx_lens [B], tree_mask [B * n_new, n_new] and slots
        [B * n_new] refilled before each replay (`fill_slots` derives slots from the other two on the device)."""
        b, width = block_table.shape
        cu = tuple(range(0, (b + 1) * n_new, n_new))
        cu_t = torch.tensor(cu, dtype=torch.long, device=block_table.device)
        return cls(block_table, ctx_lens, cu_t, tree_mask, slots, (width - n_new,) * b, cu, static=True)

    def fill_slots(self, nodes: torch.Tensor | None = None, spare: int = 0) -> None:
        """slots[b * n + j] = block_table[b, ctx_lens[b] + j] for a static meta's n new tokens per sequence, on
        the device (no host read: it runs inside the captured region). nodes [B]: sequence b's real tokens; the
        padding ones past them (j >= nodes[b]) write slot `spare` instead."""
        b, n = self.num_seqs, self.host_cu_q[1]
        j = torch.arange(n, device=self.ctx_lens.device)
        out = self.slots.view(b, n)
        torch.gather(self.block_table, 1, self.ctx_lens[:, None] + j, out=out)
        if nodes is not None:
            out.masked_fill_(j >= nodes[:, None], spare)

    @property
    def num_seqs(self) -> int:
        return len(self.host_ctx_lens)

    @property
    def longest(self) -> int:
        """The most keys a sequence attends to, its cached and new ones (a static meta's: the bound)."""
        return max((c + e - s for c, s, e in zip(self.host_ctx_lens, self.host_cu_q, self.host_cu_q[1:])), default=0)

    def _host_lengths(self, what: str) -> None:
        if self.static:
            raise ValueError(f"AttnMeta.{what}: a captured step's metadata has no host lengths (attend with a kernel "
                             "that reads ctx_lens on the device)")

    def seq_mask(self, b: int) -> torch.Tensor:
        """[n_b, ctx_b + n_b] bool: which of sequence b's keys each of its queries sees."""
        self._host_lengths("seq_mask")
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
        self._host_lengths("seq_slots")
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
            self._host_lengths("seq_rows")
            return kv_cache[self.seq_slots(b)]
        start = self.host_base[b]
        return kv_cache[start:start + self.host_ctx_lens[b] + self.host_cu_q[b + 1] - self.host_cu_q[b]]

    @property
    def max_new(self) -> int:
        return max((e - s for s, e in zip(self.host_cu_q, self.host_cu_q[1:])), default=0)

    @property
    def from_scratch(self) -> bool:
        """Every sequence starts at row 0 and attends causally (prompts prefilled from the start): attention can
        run on this step's own keys, without the cache. Never a static meta's (its lengths are not on the host)."""
        return self.is_causal and not self.static and not any(self.host_ctx_lens)


def causal_tree_mask(n_new: list[int], device: torch.device | str = "cpu") -> torch.Tensor:
    """[sum(n_new), max(n_new)] lower-triangular masks: plain causal attention among each sequence's new tokens."""
    n = max(n_new) if n_new else 0
    tri = torch.ones(n, n, dtype=torch.bool, device=device).tril()
    return torch.cat([tri[:k] for k in n_new]) if n_new else tri
