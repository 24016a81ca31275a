"""The KV pool: the main model's and the MTP layers' latent caches, allocated once, handed out in blocks.

Every request owns a list of blocks (its block table). Row i of a request (token i in the main cache; MTP row i in
each MTP layer's cache) lives at slot table[i // B] * B + i % B of the corresponding cache: the two caches share the
slot space, so one table addresses both. A request's slot map (`slots`, one slot per row it may use) is kept as a
tensor and extended when it grows, so a step's row map (`Rows`) slices it, or stacks the batch's slices, and never
recomputes slots from blocks.

Free blocks wait in a queue (an insertion-ordered dict: O(1) to take the first, to take any one, to put one back).
A request takes the block right after its last one when that one is free, else the first in the queue; a fresh
pool queues blocks in order, and a released request's blocks go back to the front in table order. So a request's
slots are usually one consecutive run: CPU attention then reads its rows as a view of the cache (AttnMeta.host_base).
Only rank 0 of a tensor-parallel group hands out blocks (its scheduler's decisions, step_plan.py): every rank
allocates the same caches (`latent_caches`, sized alike on every rank: api.py) and builds each request's table from
the blocks the step plans ship (runner.py).

Prefix caching (as vLLM's): a full block whose rows are final is indexed by a chained hash of every token up to its
end, plus the `lookahead` tokens after it (MTP row i pairs token i+1 with the main model's state at i, so with one
MTP layer a block's MTP rows also depend on the next block's first token). A later request whose tokens hash alike
shares the block (reference counted) instead of recomputing it; nobody writes a shared block, since requests only
write rows past their committed ones. Unreferenced indexed blocks count as free and are evicted least recently used
first, after the never-indexed free ones; a request releases its blocks last first (as vLLM), so a chain loses its
tail before its head, and what stays indexed stays reachable.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .kernels.attn_meta import AttnMeta
from .model.cache import KVPoolError, LatentCache
from .model.config import ModelConfig

BLOCK_SIZE = 64  # tokens per block, as FlashMLA pages its cache
CPU_KV_SHARE = 0.10  # of the available memory, for the default pool on a CPU
GPU_KV_SHARE = 0.90  # of the free memory after the weights, on a GPU
# A test hook: "N0,N1,...", the bytes of free memory rank r reports when the default pool is sized (tests give a
# tensor-parallel group's ranks different memory, as a real node does); read nowhere else
FREE_MEMORY_ENV = "SPECDEC_TEST_FREE_MEMORY"


def kv_bytes_per_token(cfg: ModelConfig, dtype: torch.dtype, mtp: bool) -> int:
    layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if mtp else 0)
    return layers * cfg.kv_cache_dim * torch.empty((), dtype=dtype).element_size()


def default_kv_tokens(cfg: ModelConfig, dtype: torch.dtype, device: torch.device, mtp: bool,
                      max_num_seqs: int, rank: int = 0) -> int:
    """This rank's pool when the caller names none: GPU_KV_SHARE of the GPU's free memory, or CPU_KV_SHARE of the
    memory the OS reports available, never more than max_num_seqs full contexts. Ranks differ (a tensor-parallel
    group takes the smallest: api.py)."""
    cuda = device.type == "cuda"
    hook = os.environ.get(FREE_MEMORY_ENV)
    if hook is not None:
        free = int(float(hook.split(",")[rank]))
    else:
        free = torch.cuda.mem_get_info(device)[0] if cuda else _available_memory()
    cap = max_num_seqs * cfg.max_position_embeddings
    share = GPU_KV_SHARE if cuda else CPU_KV_SHARE
    return int(max(64, min(cap, free * share // kv_bytes_per_token(cfg, dtype, mtp))))


def latent_caches(cfg: ModelConfig, num_tokens: int, dtype: torch.dtype, device: torch.device, mtp: bool,
                  block_size: int = BLOCK_SIZE) -> tuple[LatentCache, LatentCache | None]:
    """The main model's and (mtp) the MTP layers' latent caches of a pool of num_tokens rows, whole blocks only."""
    if num_tokens < block_size:
        raise KVPoolError(f"kv_cache_tokens={num_tokens}: the pool needs at least one block of {block_size}")
    slots = num_tokens // block_size * block_size
    return (LatentCache(cfg.num_hidden_layers, slots, cfg.kv_cache_dim, dtype, device),
            LatentCache(cfg.num_nextn_predict_layers, slots, cfg.kv_cache_dim, dtype, device) if mtp else None)


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


@dataclass
class BlockTable:
    """One request's blocks and the slot of each of its rows."""

    blocks: list[int] = field(default_factory=list)
    slots: torch.Tensor | None = None  # [len(blocks) * B] int64 on the pool's device
    hashes: list[bytes] = field(default_factory=list)  # chained hashes of its first len(hashes) full blocks

    @property
    def capacity(self) -> int:
        return 0 if self.slots is None else self.slots.numel()

    def slot(self, row: int, block_size: int) -> int:
        """The slot of one of its rows (host side)."""
        return self.blocks[row // block_size] * block_size + row % block_size

    def consecutive(self) -> bool:
        """Whether every row's slot follows the previous one (the blocks are one run)."""
        return all(b == a + 1 for a, b in zip(self.blocks, self.blocks[1:]))

    def add(self, new: list[int], block_size: int, device: torch.device) -> None:
        """Append blocks `new` and their slots."""
        self.blocks += new
        added = (torch.tensor(new, device=device)[:, None] * block_size + torch.arange(block_size, device=device))
        self.slots = added.reshape(-1) if self.slots is None else torch.cat([self.slots, added.reshape(-1)])


class KVPool:
    """num_blocks blocks of BLOCK_SIZE slots in the main cache (num_hidden_layers layers) and in the MTP cache
    (num_nextn_predict_layers layers, when `mtp`). `lookahead` (tokens after a block that its rows depend on) turns
    on prefix caching; None leaves it off."""

    def __init__(self, cfg: ModelConfig, num_tokens: int, dtype: torch.dtype, device: torch.device, mtp: bool,
                 block_size: int = BLOCK_SIZE, lookahead: int | None = None):
        self.main, self.mtp = latent_caches(cfg, num_tokens, dtype, device, mtp, block_size)
        self.block_size = block_size
        self.num_blocks = num_tokens // block_size
        self.device = device
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(self.num_blocks))  # never indexed: a queue
        self.lookahead = lookahead  # None: no prefix caching
        self._refs = [0] * self.num_blocks
        self._index: dict[tuple[bytes, tuple[int, ...]], int] = {}  # (chained hash, lookahead tokens) -> block
        self._key: dict[int, tuple[bytes, tuple[int, ...]]] = {}  # block -> its index key
        self._evictable: OrderedDict[int, None] = OrderedDict()  # indexed, unreferenced: least recently used first

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def num_free_blocks(self) -> int:
        """Blocks no request holds: never indexed, or cached and evictable."""
        return len(self._free) + len(self._evictable)

    def usage(self) -> float:
        """Share of blocks held by requests, 0..1 (cached blocks nobody holds count as free)."""
        return 1 - self.num_free_blocks / self.num_blocks

    def blocks_for(self, rows: int) -> int:
        return -(-rows // self.block_size)

    def grow(self, table: BlockTable, rows: int) -> bool:
        """Give `table` room for `rows` rows; False (and no change) when the pool has too few free blocks."""
        need = self.blocks_for(rows) - len(table.blocks)
        if need <= 0:
            return True
        if need > self.num_free_blocks:
            return False
        new = []
        for _ in range(need):
            last = (new or table.blocks or [None])[-1]
            if last is not None and last + 1 in self._free:  # right after the request's last block: one run
                b = last + 1
                del self._free[b]
            elif self._free:
                b, _ = self._free.popitem(last=False)
            else:  # evict the least recently used cached block
                b, _ = self._evictable.popitem(last=False)
                del self._index[self._key.pop(b)]
            self._refs[b] = 1
            new.append(b)
        table.add(new, self.block_size, self.device)
        return True

    def release(self, table: BlockTable) -> None:
        """Drop `table`'s hold on its blocks, last first; a block nobody holds is free again: evictable when indexed
        (its chain's tail then goes before its head), else back at the front of the queue (in table order)."""
        for b in reversed(table.blocks):
            self._refs[b] -= 1
            if self._refs[b]:
                continue
            if b in self._key:
                self._evictable[b] = None
            else:
                self._free[b] = None
                self._free.move_to_end(b, last=False)
        table.blocks, table.slots, table.hashes = [], None, []

    # --- prefix caching ----------------------------------------------------------------------------------------

    def share_prefix(self, table: BlockTable, tokens: list[int], rows: int) -> int:
        """Give an empty `table` the cached blocks that hold the longest indexed prefix of the `rows` rows a
        prefill must write (the last row is always recomputed: its output seeds the next token and draft);
        returns the rows it got, a multiple of the block size."""
        if self.lookahead is None or table.blocks:
            return 0
        bs, la, h, found = self.block_size, self.lookahead, b"", []
        for k in range((rows - 1) // bs):
            end = (k + 1) * bs
            if end + la > len(tokens):
                break
            h = _chain(h, tokens[end - bs:end])
            b = self._index.get((h, tuple(tokens[end:end + la])))
            if b is None:
                break
            found.append(b)
            table.hashes.append(h)
        for b in found:
            if self._refs[b] == 0:
                del self._evictable[b]
            self._refs[b] += 1
        if found:
            table.add(found, self.block_size, self.device)
        return len(found) * bs

    def cache_prefix(self, table: BlockTable, tokens: list[int], final_rows: int) -> None:
        """Index `table`'s full blocks among its first `final_rows` rows (rows nobody will write again)."""
        if self.lookahead is None:
            return
        bs, la = self.block_size, self.lookahead
        while (len(table.hashes) + 1) * bs <= final_rows:
            k = len(table.hashes)
            end = (k + 1) * bs
            if end + la > len(tokens):
                return
            h = _chain(table.hashes[-1] if k else b"", tokens[end - bs:end])
            table.hashes.append(h)
            key, b = (h, tuple(tokens[end:end + la])), table.blocks[k]
            if key not in self._index and b not in self._key:
                self._index[key], self._key[b] = b, key


def _chain(prev: bytes, tokens: list[int]) -> bytes:
    """The prefix cache's key of a block: its tokens hashed onto the previous block's key."""
    return hashlib.blake2b(prev + array("q", tokens).tobytes(), digest_size=16).digest()


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
        """AttnMeta for requests `keep` (default all) whose new rows follow ctx[b] committed ones; tree_mask as
        AttnMeta.build takes it (None: causal)."""
        maps = self.maps if keep is None else self.maps[keep]
        base = self.base if keep is None else tuple(self.base[b] for b in keep)
        host = None if any(b is None for b in base) else base
        return AttnMeta.build(maps[:, :max(c + n for c, n in zip(ctx, n_new))], ctx, n_new, tree_mask, host)
