"""KVPool on its own: block hand-out (the adjacent block first), the free count, reference counts of shared blocks,
and which cached blocks an eviction takes (a chain's tail first, so what stays indexed stays reachable)."""

from __future__ import annotations

import time

import pytest
import torch

from specdec.kv_pool import BlockTable, KVPool
from specdec.model.checkpoint import tiny_config
from specdec.model.config import ModelConfig

BS = 4  # rows per block: short token lists fill blocks
CFG = ModelConfig.from_dict(tiny_config())


def make_pool(blocks: int, lookahead: int | None = 0, cfg: ModelConfig = CFG, block_size: int = BS) -> KVPool:
    return KVPool(cfg, blocks * block_size, torch.float32, torch.device("cpu"), mtp=True, block_size=block_size,
                  lookahead=lookahead)


def written(pool: KVPool, tokens: list[int]) -> BlockTable:
    """A request that wrote a row for every token and indexed its full blocks."""
    t = BlockTable()
    assert pool.grow(t, len(tokens))
    pool.cache_prefix(t, tokens, len(tokens))
    return t


def shared(pool: KVPool, tokens: list[int]) -> int:
    """Rows a new request whose prompt is `tokens` + one more gets from the cache (then released)."""
    t = BlockTable()
    rows = pool.share_prefix(t, tokens + [0], len(tokens) + 1)
    pool.release(t)
    return rows


@pytest.mark.parametrize("evicted", [0, 1, 2, 3])
def test_eviction_takes_a_chains_tail_first(evicted: int) -> None:
    """A released 3-block chain loses its last blocks first, so each eviction costs the next request one block of
    its hit; evicting the head first (release front to back) would leave 0 rows shared after one eviction and
    the rest indexed but unreachable."""
    pool = make_pool(4)
    chain = list(range(100, 112))
    pool.release(written(pool, chain))
    other = BlockTable()
    assert pool.grow(other, (1 + evicted) * BS)  # the never-indexed block first, then `evicted` cached ones
    assert shared(pool, chain) == (3 - evicted) * BS


def test_eviction_is_least_recently_used_first() -> None:
    pool = make_pool(6)
    old, new = list(range(10, 18)), list(range(50, 58))
    pool.release(written(pool, old))
    pool.release(written(pool, new))
    assert shared(pool, old) == 2 * BS  # touching `old` makes `new` the least recently used
    other = BlockTable()
    assert pool.grow(other, 4 * BS)  # the 2 never-indexed blocks, then `new`'s 2
    assert shared(pool, new) == 0 and shared(pool, old) == 2 * BS


def test_shared_blocks_are_reference_counted() -> None:
    pool = make_pool(6)
    tokens = list(range(20, 28))
    a = written(pool, tokens)
    b = BlockTable()
    assert pool.share_prefix(b, tokens + [0], len(tokens) + 1) == 2 * BS and b.blocks == a.blocks
    assert pool.num_free_blocks == 4
    pool.release(a)
    assert pool.num_free_blocks == 4, "b still holds the shared blocks"
    c = BlockTable()
    assert pool.grow(c, 4 * BS) and not set(c.blocks) & set(b.blocks), "a held block was handed out"
    pool.release(c)
    pool.release(b)
    assert pool.num_free_blocks == 6 and pool.usage() == 0
    assert shared(pool, tokens) == 2 * BS, "unreferenced blocks stay indexed"


def test_the_free_count() -> None:
    pool = make_pool(5, lookahead=None)
    a, b = BlockTable(), BlockTable()
    assert pool.grow(a, 2 * BS + 1) and len(a.blocks) == 3 and a.capacity == 3 * BS
    assert pool.num_free_blocks == 2 and pool.usage() == pytest.approx(0.6)
    assert pool.grow(a, 3 * BS) and len(a.blocks) == 3, "room it has already costs nothing"
    assert not pool.grow(b, 3 * BS) and b.blocks == [] and b.slots is None and pool.num_free_blocks == 2
    assert pool.grow(b, 2 * BS) and pool.num_free_blocks == 0
    pool.release(a)
    assert pool.num_free_blocks == 3 and a.blocks == [] and a.capacity == 0
    pool.release(b)
    assert pool.num_free_blocks == 5 and pool.usage() == 0


def test_a_request_grows_into_the_block_after_its_last() -> None:
    pool = make_pool(8, lookahead=None)
    t1, t2, t3 = BlockTable(), BlockTable(), BlockTable()
    for t in (t1, t2, t3):
        assert pool.grow(t, BS)
    assert [t1.blocks, t2.blocks, t3.blocks] == [[0], [1], [2]]
    pool.release(t3)
    pool.release(t1)  # queue: 0, 2, 3, ...
    assert pool.grow(t2, 3 * BS) and t2.blocks == [1, 2, 3] and t2.consecutive()
    slots = t2.slots.tolist()
    assert slots == list(range(BS, 4 * BS))
    t4 = BlockTable()
    assert pool.grow(t4, BS) and t4.blocks == [0]


def test_released_blocks_come_back_as_one_run() -> None:
    pool = make_pool(8, lookahead=None)
    a, b = BlockTable(), BlockTable()
    assert pool.grow(a, 3 * BS) and pool.grow(b, BS)
    pool.release(a)
    c = BlockTable()
    assert pool.grow(c, 3 * BS) and c.blocks == [0, 1, 2] and c.consecutive()


def test_handing_out_blocks_costs_the_same_in_a_large_pool() -> None:
    """Taking a block (the adjacent one, or the first free) is O(1): a request growing one block at a time to
    2,000 blocks in a 150,000-block pool takes milliseconds (a heap rebuilt per adjacent block took seconds)."""
    cfg = ModelConfig.from_dict(tiny_config(num_hidden_layers=1, kv_lora_rank=4, qk_rope_head_dim=2))
    pool = make_pool(150_000, lookahead=None, cfg=cfg, block_size=1)
    t = BlockTable()
    assert pool.grow(t, 1) and t.blocks == [0]
    t0 = time.perf_counter()
    for n in range(2, 2001):
        assert pool.grow(t, n)
    assert time.perf_counter() - t0 < 1.0
    assert t.consecutive() and pool.num_free_blocks == 148_000
