"""Who runs each engine step, on rank 0 alone: requests wait first come first served for a running slot and the KV
rows a step writes; prompts are prefilled a chunk at a time; under memory pressure the newest running request is
preempted (its blocks freed, recomputed later). The engine ships these decisions to every rank in its step plan."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .kv_pool import KVPool
from .request import Request, Status

if TYPE_CHECKING:
    from .draft_policy import DraftingStats


@dataclass(frozen=True)
class EngineStats:
    """The engine's load: requests running (prefilling or decoding), waiting for a slot, and the share of the KV
    pool's blocks they hold; with MTP, its drafting (costs, choices by batch size: draft_policy.py)."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    drafting: DraftingStats | None = None


class Scheduler:
    """`waiting` (new or preempted, no blocks) and `running` (prefilling or decoding, in admission order) over one
    KV pool: at most max_num_seqs run, each holding room for its committed rows plus the step_rows a step writes;
    a step prefills at most prefill_chunk prompt tokens. `freed` collects the ids of requests whose blocks were
    released (finished, aborted, preempted) until the engine ships them. Not thread-safe: the engine calls it under
    its lock."""

    def __init__(self, pool: KVPool, max_num_seqs: int, step_rows: int, prefill_chunk: int):
        self.pool, self.max_num_seqs, self.step_rows, self.prefill_chunk = pool, max_num_seqs, step_rows, prefill_chunk
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.freed: list[int] = []

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def stats(self) -> EngineStats:
        return EngineStats(len(self.running), len(self.waiting), self.pool.usage())

    def schedule(self) -> list[tuple[Request, int, int]]:
        """Admit waiting requests (their cached prefix shared, room for their prefill) while slots and blocks
        allow; give every decoding request room for this step's rows, preempting the newest running ones. Returns
        this step's prefill chunks (request, first row, end row): up to prefill_chunk tokens of prefilling
        requests, oldest first."""
        pool = self.pool
        while self.waiting and len(self.running) < self.max_num_seqs:
            r = self.waiting[0]
            # prompt logprobs need every prompt row's logits: such a request prefills its whole prompt (as vLLM)
            cached = 0 if r.params.prompt_logprobs is not None else pool.share_prefix(r.table, r.tokens, r.n_prefill)
            if not pool.grow(r.table, r.n_prefill + self.step_rows):
                pool.release(r.table)
                break
            if r.n_prefill == len(r.prompt):
                r.metrics.num_cached_tokens = cached
            r.n_main = cached
            self.waiting.popleft()
            r.status = Status.PREFILL
            self.running.append(r)
        for r in [r for r in self.running if r.status is Status.RUNNING]:
            while r.status is Status.RUNNING and not pool.grow(r.table, r.n_main + self.step_rows):
                self.preempt(self.running[-1])
        budget, chunks = self.prefill_chunk, []
        for r in self.running:
            if r.status is Status.PREFILL and budget > 0:
                n = min(r.n_prefill - r.n_main, budget)
                chunks.append((r, r.n_main, r.n_main + n))
                budget -= n
        return chunks

    def preempt(self, r: Request) -> None:
        """Free r's blocks and queue it first, to be recomputed from its committed tokens."""
        self._release(r)
        self.running.remove(r)
        # a request preempted before its first token prefills its prompt again and samples that token then (with
        # the same draws as unpreempted); later ones recompute every committed token but the root
        r.status, r.n_main = Status.WAITING, 0
        r.n_prefill = len(r.tokens) - 1 if r.generated else len(r.tokens)
        r.metrics.num_preemptions += 1
        self.waiting.appendleft(r)

    def _release(self, r: Request) -> None:
        if r.table.blocks:
            self.freed.append(r.id)
        self.pool.release(r.table)

    def finish(self, r: Request) -> None:
        """r leaves (its finish_reason set): its blocks return to the pool; its time not spent in a phase is
        other_time."""
        r.status = Status.FINISHED
        self._release(r)
        if r in self.running:
            self.running.remove(r)
        elif r in self.waiting:
            self.waiting.remove(r)
        m = r.metrics
        m.other_time = max(0.0, time.perf_counter() - r.arrival - m.prefill_time - m.draft_time - m.verify_time)
