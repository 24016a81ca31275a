"""The KV pool: the main model's and the MTP layers' latent caches, allocated once, handed out in blocks.

Every request owns a list of blocks (its block table). Row i of a request (token i in the main cache; MTP row i in
each MTP layer's cache) lives at slot table[i // B] * B + i % B of the corresponding cache: the two caches share the
slot space, so one table addresses both. A request's slot map (`slots`, one slot per row it may use) is kept as a
tensor and extended when it grows, so a step's attention metadata is a slice of it, not a rebuild.

Blocks are taken lowest-first, and right after a request's last block when that one is free, so a request's slots
are usually one consecutive run: CPU attention then reads its rows as a view of the cache (AttnMeta.host_base).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import torch

from .kernels.attn_meta import AttnMeta, causal_tree_mask
from .model import KVPoolError, LatentCache
from .model.config import ModelConfig

BLOCK_SIZE = 64  # tokens per block, as FlashMLA pages its cache


@dataclass
class BlockTable:
    """One request's blocks and the slot of each of its rows."""

    blocks: list[int] = field(default_factory=list)
    slots: torch.Tensor | None = None  # [len(blocks) * B] int64 on the pool's device

    @property
    def capacity(self) -> int:
        return 0 if self.slots is None else self.slots.numel()

    def slot(self, row: int, block_size: int) -> int:
        """The slot of one of its rows (host side)."""
        return self.blocks[row // block_size] * block_size + row % block_size

    def consecutive(self) -> bool:
        """Whether every row's slot follows the previous one (the blocks are one run)."""
        return all(b == a + 1 for a, b in zip(self.blocks, self.blocks[1:]))


class KVPool:
    """num_blocks blocks of BLOCK_SIZE slots in the main cache (num_hidden_layers layers) and in the MTP cache
    (num_nextn_predict_layers layers, when `mtp`)."""

    def __init__(self, cfg: ModelConfig, num_tokens: int, dtype: torch.dtype, device: torch.device, mtp: bool,
                 block_size: int = BLOCK_SIZE):
        if num_tokens < block_size:
            raise KVPoolError(f"kv_cache_tokens={num_tokens}: the pool needs at least one block of {block_size}")
        self.block_size = block_size
        self.num_blocks = num_tokens // block_size
        slots = self.num_blocks * block_size
        self.device = device
        self.main = LatentCache(cfg.num_hidden_layers, slots, cfg.kv_cache_dim, dtype, device)
        self.mtp = LatentCache(cfg.num_nextn_predict_layers, slots, cfg.kv_cache_dim, dtype, device) if mtp else None
        self._free = list(range(self.num_blocks))  # a heap: lowest block first
        self._is_free = [True] * self.num_blocks
        self._offsets = torch.arange(block_size, device=device)

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    def usage(self) -> float:
        """Share of blocks in use, 0..1."""
        return 1 - self.num_free_blocks / self.num_blocks

    def blocks_for(self, rows: int) -> int:
        return -(-rows // self.block_size)

    def grow(self, table: BlockTable, rows: int) -> bool:
        """Give `table` room for `rows` rows; False (and no change) when the pool has too few free blocks."""
        need = self.blocks_for(rows) - len(table.blocks)
        if need <= 0:
            return True
        if need > len(self._free):
            return False
        new = []
        for _ in range(need):
            last = (new or table.blocks or [None])[-1]
            if last is not None and last + 1 < self.num_blocks and self._is_free[last + 1]:
                b = last + 1
                self._free.remove(b)
                heapq.heapify(self._free)
            else:
                b = heapq.heappop(self._free)
            self._is_free[b] = False
            new.append(b)
        table.blocks += new
        added = (torch.tensor(new, device=self.device)[:, None] * self.block_size + self._offsets).reshape(-1)
        table.slots = added if table.slots is None else torch.cat([table.slots, added])
        return True

    def release(self, table: BlockTable) -> None:
        """Return every block of `table` to the pool."""
        for b in table.blocks:
            self._is_free[b] = True
            heapq.heappush(self._free, b)
        table.blocks, table.slots = [], None


@dataclass(frozen=True)
class Rows:
    """Where a batch's rows live: maps[b, i] is the slot of request b's row i (width covers every row the step
    touches); base[b] the slot of its row 0 when its slots are consecutive, else None."""

    maps: torch.Tensor  # [B, W] int64
    base: tuple[int | None, ...]

    @classmethod
    def of(cls, tables: list[BlockTable], width: int, block_size: int) -> Rows:
        if len(tables) == 1:
            maps = tables[0].slots[None, :width]
        else:
            maps = torch.stack([t.slots[:width] if t.capacity >= width else
                                torch.cat([t.slots, t.slots.new_zeros(width - t.capacity)]) for t in tables])
        base = tuple(t.blocks[0] * block_size if t.consecutive() else None for t in tables)
        return cls(maps, base)

    def meta(self, ctx: list[int], n_new: list[int], tree_mask: torch.Tensor | None = None,
             keep: list[int] | None = None) -> AttnMeta:
        """AttnMeta for requests `keep` (default all) whose new rows follow ctx[b] committed ones."""
        maps = self.maps if keep is None else self.maps[keep]
        base = self.base if keep is None else tuple(self.base[b] for b in keep)
        mask = causal_tree_mask(n_new, maps.device) if tree_mask is None else tree_mask
        host = None if any(b is None for b in base) else base
        return AttnMeta.build(maps[:, :max(c + n for c, n in zip(ctx, n_new))], ctx, n_new, mask, host)
