"""The runner: one rank's side of an engine step. It runs a StepPlan's forward passes over this rank's shard of the
model and its KV caches: the prefill chunks as one causal forward, then for the decode batch propose (the MTP
drafts a chain or tree), verify (one tree-masked main forward) and commit (the accepted path's rows moved to
consecutive slots, the MTP cache extended). Without a drafter a decode step is one forward per request.

Every rank of a tensor-parallel group runs the same plans with the same code; rank 0 (the Leader: its engine) also
decides where a phase decides tokens (a prompt's first token, acceptance), and the others receive that phase's
Commit. The runner keeps, per request that the plans gave rows, only its block table and the drafter's last
outputs; which requests run, with which rows, and what they accepted come from rank 0.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .cuda_graphs import GraphedModel, StepGraphs
from .drafter import Draft, Drafter
from .kernels.attn_meta import AttnMeta
from .kv_pool import BlockTable, Rows
from .model.cache import LatentCache
from .model.transformer import DeepseekV3
from .sampling import SamplingBatch
from .step_clock import StepClock
from .step_plan import Channel, Chunk, Decode, DraftShape, Sampling, Score, StepPlan
from .step_result import Commit


class Leader(Protocol):
    """Rank 0's engine, as the runner asks it where a phase decides. Each call returns what it committed."""

    def prefilled(self, chunks: list[Chunk], scores: list[torch.Tensor | None],
                  logits: torch.Tensor | None) -> Commit | None:
        """scores: per chunk, the logits of its scored rows; logits [F, V]: the last rows of the F chunks that
        sample a first token. A Commit over the chunks when some sample one."""

    def decoded(self, reqs: list[int], logits: torch.Tensor, sb: SamplingBatch) -> None:
        """Plain decoding: logits [B, V] of each request's root."""

    def verified(self, reqs: list[int], draft: Draft, logits: torch.Tensor, sb: SamplingBatch) -> Commit:
        """logits [B * N, V] at every node of the draft's trees."""


@dataclass
class Seq:
    """What a rank keeps of one request between steps: its rows, and the drafter's state (MTP layer 0's output at
    its last committed row, which seeds the next draft; each MTP layer's last output; the main model's hidden
    states and roots of the rows that plain steps of an MTP engine decoded, whose MTP rows wait for its next
    drafting step)."""

    table: BlockTable = field(default_factory=BlockTable)
    mtp_hidden: torch.Tensor | None = None
    carry: list[torch.Tensor | None] = field(default_factory=list)
    lag: list[torch.Tensor] = field(default_factory=list)
    lag_roots: list[int] = field(default_factory=list)


@dataclass
class StepTimes:
    """When a step's phases ran, for rank 0's metrics: prefill (perf_counter before the forward, after the
    first tokens were decided, after the MTP extend); decode (StepClock marks at its start, after catching up the
    MTP rows of earlier plain steps, after the first head's draft, after propose, after commit, after the MTP
    extend; plain decoding: start and end only) and its batch (request ids)."""

    prefill: tuple[float, float, float] | None = None
    decode: tuple[Any, ...] | None = None
    batch: list[int] = field(default_factory=list)


class Runner:
    """Runs step plans on `model` (this rank's shard) with the main and MTP caches `main` and `mtp` (None without a
    drafter), in blocks of block_size slots. shape: the largest draft a step may ask for (None: plain decoding),
    which fixes step_rows, the rows a decode step may write past a request's committed ones. A decode step's
    forwards run eager, or from CUDA graphs once `use_graphs` was called."""

    def __init__(self, model: DeepseekV3, main: LatentCache, mtp: LatentCache | None, block_size: int,
                 shape: DraftShape | None, device: torch.device):
        self.model, self.main, self.mtp, self.device = model, main, mtp, device
        self.block_size = block_size
        self.step_rows = shape.rows if shape is not None else 1
        self.draft_width = shape.topk if shape is not None else 1
        self.clock = StepClock(device)
        self.drafter = Drafter(model, self.clock) if mtp is not None else None
        self.dist = model.dist
        self.seqs: dict[int, Seq] = {}
        self.channel: Channel | None = None  # to (rank 0) or from the other ranks of a group; None on one rank
        self.broken = False  # rank 0: a step failed midway, leaving the other ranks waiting in it
        self.graphs: StepGraphs | None = None

    def use_graphs(self, max_num_seqs: int) -> None:
        """Run the decode step's forwards (plain, verify, each draft step) from graphs per batch bucket, up to
        max_num_seqs requests (cuda_graphs.py): captured on a CUDA device; elsewhere run eagerly on the same padded
        buffers under the host-read guard (what the CPU tests check). Every rank of a group calls it alike."""
        width = min(self.model.cfg.max_position_embeddings, self.main.num_slots)  # the most rows a request holds
        self.graphs = StepGraphs(self.model, self.main, self.mtp, max_num_seqs, self.step_rows, self.draft_width,
                                 width, self.device)
        if self.drafter is not None:
            self.drafter = Drafter(GraphedModel(self.model, self.graphs), self.clock)

    # --- plans from rank 0 ------------------------------------------------------------------------------------

    def send(self, msg: StepPlan | Score | None) -> None:
        """Rank 0: ship msg to the other ranks (nothing on one rank), before running it."""
        if self.channel is not None:
            with self._breaks():
                self.channel.send(msg)

    def follow(self) -> None:
        """A rank other than 0: run each plan rank 0 ships, until it ships None (it closed its LLM)."""
        while (msg := self.channel.recv()) is not None:
            if isinstance(msg, Score):
                self.score(msg)
            else:
                self.run(msg)

    def run(self, plan: StepPlan, leader: Leader | None = None) -> StepTimes:
        """The plan's forwards (leader: rank 0's engine; None on the other ranks)."""
        with self._breaks():
            return self._run(plan, leader)

    @contextmanager
    def _breaks(self) -> Iterator[None]:
        """An error in here leaves the other ranks in the middle of a step: the group is broken (rank 0 stops it)."""
        try:
            yield
        except BaseException:
            self.broken = True
            raise

    def _run(self, plan: StepPlan, leader: Leader | None) -> StepTimes:
        for i in plan.freed:
            self.seqs.pop(i, None)
        for i, new in plan.blocks.items():
            seq = self.seqs.setdefault(i, Seq(carry=[None] * self.model.cfg.num_nextn_predict_layers))
            seq.table.add(new, self.block_size, self.device)
        if len(self.seqs) != plan.held:
            raise RuntimeError(f"rank {self.dist.rank} holds rows of {len(self.seqs)} requests but rank 0 of "
                               f"{plan.held}: a step plan was lost or misapplied")
        times = StepTimes()
        first = None
        if plan.prefill:
            first, times.prefill = self._prefill(plan.prefill, leader)
        if plan.decode is not None:
            self._decode(plan.decode, plan.prefill, first, leader, times)
        return times

    def _rows(self, reqs: list[int], width: int) -> Rows:
        return Rows.of([self.seqs[r].table for r in reqs], width, self.block_size)

    # --- prefill ----------------------------------------------------------------------------------------------

    def _prefill(self, chunks: list[Chunk], leader: Leader | None
                 ) -> tuple[Commit | None, tuple[float, float, float]]:
        """One causal forward over every chunk; the logits prompt logprobs score and (chunks that end a new
        prompt) the last rows' logits, whose first tokens rank 0 decides; then the MTP rows of every chunk whose
        request goes on."""
        dev = self.device
        t0 = time.perf_counter()
        reqs, starts, lens = [c.req for c in chunks], [c.start for c in chunks], [len(c.tokens) for c in chunks]
        rows = self._rows(reqs, max(c.end for c in chunks) + self.step_rows)
        ids = torch.tensor([t for c in chunks for t in c.tokens], device=dev)
        pos = torch.cat([torch.arange(c.start, c.end, device=dev) for c in chunks])
        hidden = self.model(ids, pos, rows.meta(starts, lens), self.main)
        parts = list(hidden.split(lens))
        scores = [self.model.logits(p[c.scored[0]:c.scored[1]]) if c.scored else None for c, p in zip(chunks, parts)]
        firsts = [i for i, c in enumerate(chunks) if c.next is None]
        logits = self.model.logits(torch.stack([parts[i][-1] for i in firsts])) if firsts else None
        decided = leader.prefilled(chunks, scores, logits) if leader is not None else None
        commit = Commit.share(self.channel, decided) if firsts else None
        t1 = time.perf_counter()
        keep = [i for i in range(len(chunks)) if commit is None or commit.keep[i]]
        if self.drafter is not None and keep:
            nexts = [chunks[i].tokens[1:] + [commit.tokens[i][0] if chunks[i].next is None else chunks[i].next]
                     for i in keep]
            self._extend([reqs[i] for i in keep], nexts, [starts[i] for i in keep], [parts[i] for i in keep],
                         rows.maps.shape[1])
        return commit, (t0, t1, time.perf_counter())

    def _extend(self, reqs: list[int], nexts: list[list[int]], n_before: list[int], hidden: list[torch.Tensor],
                width: int) -> None:
        seqs = [self.seqs[r] for r in reqs]
        g = self.drafter.extend(nexts, n_before, hidden, [s.carry for s in seqs], self._rows(reqs, width), self.mtp)
        for s, gi in zip(seqs, g):
            s.mtp_hidden = gi

    # --- decode -----------------------------------------------------------------------------------------------

    def _decode(self, d: Decode, chunks: list[Chunk], first: Commit | None, leader: Leader | None,
                times: StepTimes) -> None:
        """Propose, verify, commit for the decode batch: d's requests, less those whose first token (sampled by
        this step's prefill: their root) ended them."""
        chunk_of = {c.req: i for i, c in enumerate(chunks) if c.next is None}
        pick, roots = [], []
        for b, (req, root) in enumerate(zip(d.reqs, d.roots)):
            if root is None:
                if not first.keep[chunk_of[req]]:
                    continue
                root = first.tokens[chunk_of[req]][0]
            pick.append(b)
            roots.append(root)
        if not pick:
            return
        dev = self.device
        t0 = self.clock.mark()
        reqs, n_main = [d.reqs[b] for b in pick], [d.n_main[b] for b in pick]
        times.batch = reqs
        rows = self._rows(reqs, max(n_main) + self.step_rows)
        root = torch.tensor(roots, device=dev)
        draws = d.draft.draws(self.model.cfg.vocab_size) if d.draft is not None else 1
        sb = sampling_batch(d.sampling.take(pick) if d.sampling is not None else None, len(reqs), draws, dev)
        if self.drafter is None or d.draft is None:
            meta = rows.meta(n_main, [1] * len(reqs), _ones(len(reqs), dev))
            hidden, logits = self._forward(root, meta.ctx_lens, meta)  # a root's position is its request's length
            if leader is not None:
                leader.decoded(reqs, logits, sb)
            if self.drafter is not None:  # adaptive speculation decoded plainly: the MTP rows wait (_catch_up)
                hidden = hidden.clone()
                for i, r in enumerate(reqs):
                    self.seqs[r].lag.append(hidden[i])
                    self.seqs[r].lag_roots.append(roots[i])
            times.decode = (t0, self.clock.mark())
            return
        self._catch_up(reqs, n_main, roots, rows.maps.shape[1])
        tc = self.clock.mark()
        g = torch.stack([self.seqs[r].mtp_hidden for r in reqs])
        take = (lambda xs: None if xs is None else [xs[b] for b in pick])
        draft = self.drafter.draft(root, g, n_main, rows, self.mtp, sb, d.draft, take(d.depth), take(d.floor))
        t1 = self.clock.mark()
        tree = draft.tree
        b, n = tree.tokens.shape
        meta = rows.meta(n_main, draft.num_nodes, draft.attn_mask())  # a ragged batch: its real nodes only
        hidden, logits = self._forward(draft.pack(tree.tokens), draft.pack(meta.ctx_lens[:, None] + tree.depth), meta)
        hidden, logits = draft.unpack(hidden).view(b, n, -1), draft.unpack(logits)
        decided = leader.verified(reqs, draft, logits, sb) if leader is not None else None
        commit = Commit.share(self.channel, decided)
        keep = [i for i in range(b) if commit.keep[i]]
        self._move_accepted(reqs, n_main, commit, keep)
        t2 = self.clock.mark()
        if keep:  # the MTP cache gets the accepted tokens' rows; their last output seeds the next draft
            self._extend([reqs[i] for i in keep], [commit.tokens[i] for i in keep], [n_main[i] for i in keep],
                         [hidden[i, commit.path[i]] for i in keep], rows.maps.shape[1])
        times.decode = (t0, tc, self.drafter.head_mark, t1, t2, self.clock.mark())

    def _catch_up(self, reqs: list[int], n_main: list[int], roots: list[int], width: int) -> None:
        """Extend the MTP cache with the rows plain steps decoded (each paired with the next root), so that a
        request's draft starts from its last committed row."""
        behind = [i for i, r in enumerate(reqs) if self.seqs[r].lag]
        if not behind:
            return
        seqs = [self.seqs[reqs[i]] for i in behind]
        self._extend([reqs[i] for i in behind], [s.lag_roots[1:] + [roots[i]] for s, i in zip(seqs, behind)],
                     [n_main[i] - len(s.lag) for s, i in zip(seqs, behind)], [torch.stack(s.lag) for s in seqs], width)
        for s in seqs:
            s.lag, s.lag_roots = [], []

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor,
                 meta: AttnMeta) -> tuple[torch.Tensor, torch.Tensor]:
        """A decode or verify step's main forward: final hidden states [T, D] and logits [T, V] at every token, from
        a graph where one fits, else eager."""
        out = self.graphs.main(tokens, positions, meta) if self.graphs is not None else None
        if out is not None:
            return out
        hidden = self.model(tokens, positions, meta, self.main)
        return hidden, self.model.logits(hidden)

    def _move_accepted(self, reqs: list[int], n_main: list[int], commit: Commit, keep: list[int]) -> None:
        """Move each kept request's accepted path's main-cache rows to the rows right after its prefix."""
        src, dst, bs = [], [], self.block_size
        for i in keep:
            table, start = self.seqs[reqs[i]].table, n_main[i]
            for j, node in enumerate(commit.path[i]):
                if node != j:
                    src.append(table.slot(start + node, bs))
                    dst.append(table.slot(start + j, bs))
        if src:
            self.main.copy_slots(torch.tensor(src, device=self.device), torch.tensor(dst, device=self.device))

    # --- one sequence outside the engine ----------------------------------------------------------------------

    def score(self, s: Score) -> torch.Tensor:
        """The Score's logits, float32 on the host: [T, vocab] for the main model; [T-1-depth, vocab] for MTP layer
        `depth`, chaining layers 0..depth teacher-forced (layer j sees token i+1+j and layer j-1's hidden state;
        layer 0: the main model's hidden state at i)."""
        with self._breaks():
            return self._score(s)

    def _score(self, s: Score) -> torch.Tensor:
        cfg, dev = self.model.cfg, self.device
        ids = torch.tensor(s.ids, device=dev)
        t = ids.numel()
        cache = LatentCache(cfg.num_hidden_layers, t, cfg.kv_cache_dim, self.model.dtype, dev)
        meta = AttnMeta.contiguous(torch.zeros(1, dtype=torch.long, device=dev), [0], [t])
        hidden = self.model(ids, torch.arange(t, device=dev), meta, cache)
        if s.mtp_depth is not None:
            cache = LatentCache(cfg.num_nextn_predict_layers, t, cfg.kv_cache_dim, self.model.dtype, dev)
            for j in range(s.mtp_depth + 1):
                n = t - 1 - j
                meta = AttnMeta.contiguous(torch.zeros(1, dtype=torch.long, device=dev), [0], [n])
                pos = torch.arange(1 + j, 1 + j + n, device=dev)
                hidden = self.model.mtp_forward(j, ids[1 + j:], hidden[:n], pos, meta, cache)
        return self.model.logits(hidden).cpu()


def sampling_batch(s: Sampling | None, rows: int, draws: int, device: torch.device) -> SamplingBatch:
    """The SamplingBatch of a plan's Sampling (None: every row greedy): each sampled row's `draws` uniforms come
    from a generator seeded with its step seed, so every rank draws the same."""
    if s is None:
        return SamplingBatch(torch.ones(rows, dtype=torch.bool, device=device), False)
    params = [_Row(seed is None, t, k, p) for t, k, p, seed in zip(s.temperature, s.top_k, s.top_p, s.seeds)]
    gens = [torch.Generator(device).manual_seed(seed or 0) for seed in s.seeds]
    return SamplingBatch.build(params, gens, draws, device)


@dataclass(frozen=True)
class _Row:
    """One row's sampling settings, as SamplingBatch.build reads a request's SamplingParams."""

    greedy: bool
    temperature: float
    top_k: int
    top_p: float


@functools.lru_cache(maxsize=64)
def _ones(b: int, device: torch.device) -> torch.Tensor:
    """[b, 1] True: one new token per sequence that sees itself."""
    return torch.ones(b, 1, dtype=torch.bool, device=device)
