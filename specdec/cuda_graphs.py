"""CUDA graphs for a decode step's forwards: the main model's forward and logits (a plain step, a verify step) and
each MTP draft step's forward, captured once per batch bucket and replayed.

Buckets are vLLM's capture sizes (1, 2, 4, then every multiple of 8) over the number of sequences. A forward of S
sequences with at most n new tokens each runs in the graph of (layer, the smallest bucket >= S, n): sequence b's
tokens sit at rows b * n + j, and every other row is padding. A sequence with fewer than n tokens (a verify step's
ragged batch: adaptive speculation drafts each request its own number of nodes) gets padding tokens after its own,
which no real token sees (tree mask) and which write the caches' spare slot (LatentCache.pad_slot), as every token
of the padding sequences that fill the bucket does (no cached keys, token 0 at position 0). So a padding row never
writes a slot a request owns, and no real row sees one: attention is per sequence, every other op is per row.

Static buffers, allocated once, shared by every bucket and sized for the largest: token ids, positions, the MTP's
input hidden states, the metadata (a block table at the width of the longest request, ctx_lens, the tree mask and
slots: AttnMeta.captured) and the outputs. A forward copies its inputs in (the metadata from the AttnMeta its caller
built; the real tokens per sequence and, for a ragged batch, where its rows go, in one host-to-device copy), resets
the padding rows, and replays. Inside the graph the slots follow from the block table, ctx_lens and the real tokens
per sequence, and nothing reads the device from the host: every capture runs under host_reads.no_host_reads,
which names the op that would. A bucket is captured on its first use, after one eager run on the same buffers (it
compiles and tunes the Triton kernels), into one shared memory pool; outputs are copied into static buffers inside
the graph, so no graph's memory aliases another's results.

Without CUDA nothing is captured: each replay runs the same function eagerly on the same buffers under the
host-read guard. That is how the CPU tests and `bench/gpu_check.py --smoke` check the bucketing, the padding and
capturability.
"""

from __future__ import annotations

import bisect
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .host_reads import no_host_reads
from .kernels.attn_meta import AttnMeta
from .model.cache import LatentCache
from .model.transformer import DeepseekV3


def capture_sizes(max_seqs: int) -> list[int]:
    """vLLM's capture sizes: 1, 2, 4, then multiples of 8, up to the first >= max_seqs."""
    sizes = [1]
    while sizes[-1] < max_seqs:
        sizes.append(sizes[-1] * 2 if sizes[-1] < 8 else sizes[-1] + 8)
    return sizes


def graphs_wanted(device: torch.device, enforce_eager: bool, mla_mode: str, backend: str) -> bool:
    """Whether a runner's decode forwards replay graphs: the CUDA default, unless enforce_eager, naive MLA (its
    attention reads lengths on the host) or the torch backend (the reference: its fixed-shape MoE reads an expert's
    weights per routed token, T * K experts' worth) asks for eager. A CPU is always eager."""
    return device.type == "cuda" and not (enforce_eager or mla_mode == "naive" or backend == "torch")


@dataclass(frozen=True)
class Key:
    """One graph: the main model (layer None) or MTP layer `layer`, `seqs` sequences (a bucket) of `n` new tokens."""

    layer: int | None
    seqs: int
    n: int


@dataclass
class _Graph:
    run: Callable[[], None]  # the captured function: reads the static inputs, writes the static outputs
    graph: Any  # its torch.cuda.CUDAGraph; None where nothing is captured


class StepGraphs:
    """The graphs of one runner's forwards over `main` and `mtp` (None without a drafter). max_num_seqs bounds a
    main forward's sequences, `rows` their new tokens (a verify step's nodes); a draft step runs up to
    max_num_seqs * draft_width sequences of one token each; `width` is the most rows a request may hold."""

    def __init__(self, model: DeepseekV3, main: LatentCache, mtp: LatentCache | None, max_num_seqs: int, rows: int,
                 draft_width: int, width: int, device: torch.device):
        if mtp is not None and mtp.pad_slot != main.pad_slot:
            raise ValueError(f"StepGraphs: the MTP cache's spare slot {mtp.pad_slot} is not the main cache's "
                             f"{main.pad_slot} (one block table addresses both: give them the same slots)")
        self.model, self.main_cache, self.mtp_cache, self.device = model, main, mtp, device
        self.capture = device.type == "cuda"
        self.rows, self.width, self.pad = rows, width, main.pad_slot
        self.main_sizes = capture_sizes(max_num_seqs)
        self.sizes = capture_sizes(max_num_seqs * draft_width) if mtp is not None else self.main_sizes
        s, t = self.sizes[-1], max(self.main_sizes[-1] * rows, self.sizes[-1])
        cfg, long = model.cfg, dict(dtype=torch.long, device=device)
        self.tokens, self.positions = torch.zeros(t, **long), torch.zeros(t, **long)
        self.slots, self.ctx, self.nodes = torch.zeros(t, **long), torch.zeros(s, **long), torch.zeros(s, **long)
        self.table = torch.full((s, width), self.pad, **long)
        self.mask = torch.ones(t * rows, dtype=torch.bool, device=device)
        self.hidden = torch.zeros(t, cfg.hidden_size, dtype=model.dtype, device=device)
        self.out_main, self.out_mtp = torch.zeros_like(self.hidden), torch.zeros_like(self.hidden)
        self.out_logits = torch.zeros(self.main_sizes[-1] * rows, cfg.vocab_size, device=device)
        self.graphs: dict[Key, _Graph] = {}
        self.replays: Counter[Key] = Counter()
        self.pool = torch.cuda.graph_pool_handle() if self.capture else None

    # --- the forwards -------------------------------------------------------------------------------------------

    def main(self, tokens: torch.Tensor, positions: torch.Tensor,
             meta: AttnMeta) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The main model's final hidden states [T, D] and logits [T, V] (float32) over the main cache, as
        `model(tokens, positions, meta, cache)` and `model.logits` give them, from a graph; None when none fits (the
        caller runs eager). Views of static outputs, valid until the next main forward (copies for a ragged batch)."""
        key = self._key(None, meta, self.main_sizes, self.rows)
        if key is None:
            return None
        index = self._replay(key, tokens, positions, None, meta)
        t = tokens.shape[0]
        if index is None:
            return self.out_main[:t], self.out_logits[:t]
        return self.out_main[index], self.out_logits[index]

    def mtp(self, depth: int, tokens: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
            meta: AttnMeta) -> torch.Tensor | None:
        """`model.mtp_forward(depth, tokens, hidden, positions, meta, mtp cache)` from a graph, for one new token per
        sequence (a draft step); a new tensor. None when no graph fits."""
        key = self._key(depth, meta, self.sizes, 1)
        if key is None:
            return None
        self._replay(key, tokens, positions, hidden, meta)
        return self.out_mtp[:tokens.shape[0]].clone()

    def _key(self, layer: int | None, meta: AttnMeta, sizes: list[int], most: int) -> Key | None:
        """The graph for a forward with this metadata, if one fits: at most sizes[-1] sequences, at most `most` new
        tokens each (n: the most of any; a sequence with fewer is padded to n), and every sequence's keys within
        the static block table's width."""
        s, cu = meta.num_seqs, meta.host_cu_q
        if meta.static or s == 0 or s > sizes[-1] or meta.block_table.shape[1] > self.width:
            return None
        n = max(e - b for b, e in zip(cu, cu[1:]))
        if not 0 < n <= most or meta.tree_mask.shape != (cu[-1], n) or max(meta.host_ctx_lens) + n > self.width:
            return None
        return Key(layer, sizes[bisect.bisect_left(sizes, s)], n)

    # --- static buffers, capture, replay ------------------------------------------------------------------------

    def _fill(self, key: Key, tokens: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor | None,
              meta: AttnMeta) -> torch.Tensor | None:
        """Copy a forward's inputs into the bucket's static buffers, sequence b's tokens at rows b * n + j, and
        give every other row padding values (token 0 at position 0, zero hidden state, seeing only itself; a
        padding sequence has no cached keys and its first block-table entries name the spare slot). Returns where
        the real rows went: None when they fill the first T rows, else an index [T] (a ragged batch)."""
        s, w, sb, n = meta.num_seqs, meta.block_table.shape[1], key.seqs, key.n
        tb, cu = sb * n, meta.host_cu_q
        sizes = [e - b for b, e in zip(cu, cu[1:])]
        ragged = any(k != n for k in sizes)
        rows = [b * n + j for b, k in enumerate(sizes) for j in range(k)] if ragged else []
        ints = torch.tensor(sizes + [0] * (sb - s) + rows).to(self.device, non_blocking=True)  # one copy over
        self.nodes[:sb].copy_(ints[:sb])
        index = ints[sb:] if ragged else None
        mask = self.mask[:tb * n].view(tb, n)
        for buf in (self.tokens, self.positions, mask) + ((self.hidden,) if hidden is not None else ()):
            buf[:tb].zero_()
        mask.view(sb, n, n).diagonal(dim1=1, dim2=2).fill_(True)
        for buf, src in ((self.tokens, tokens), (self.positions, positions), (mask, meta.tree_mask),
                         (self.hidden, hidden)):
            if src is None:
                continue
            if index is None:
                buf[:src.shape[0]].copy_(src)
            else:
                buf.index_copy_(0, index, src.to(buf.dtype))
        self.ctx[:s].copy_(meta.ctx_lens)
        self.ctx[s:sb].zero_()
        self.table[:s, :w].copy_(meta.block_table)
        self.table[s:sb, :n].fill_(self.pad)
        return index

    def _replay(self, key: Key, tokens: torch.Tensor, positions: torch.Tensor, hidden: torch.Tensor | None,
                meta: AttnMeta) -> torch.Tensor | None:
        """Fill the static inputs, then run the key's graph (capturing it on first use); _fill's index."""
        index = self._fill(key, tokens, positions, hidden, meta)
        g = self.graphs.get(key)
        if g is None:
            g = self.graphs[key] = self._capture(key)
        elif g.graph is not None:
            with torch.cuda.device(self.device):  # the graph's device, which need not be the current one
                g.graph.replay()
        else:
            with no_host_reads():
                g.run()
        self.replays[key] += 1
        return index

    def _capture(self, key: Key) -> _Graph:
        """Build the key's function over the static buffers and run it once, which gives the first forward's
        result; on CUDA then capture it (capturing runs nothing) under the host-read guard, which names the op a
        capture would fail on. Without CUDA the one run is under the guard."""
        s, n = key.seqs, key.n
        t = s * n
        meta = AttnMeta.captured(self.table[:s], self.ctx[:s], self.mask[:t * n].view(t, n), self.slots[:t], n)
        tokens, positions, hidden = self.tokens[:t], self.positions[:t], self.hidden[:t]
        model = self.model

        def run() -> None:
            meta.fill_slots(self.nodes[:s], self.pad)
            if key.layer is None:
                h = model(tokens, positions, meta, self.main_cache)
                self.out_main[:t].copy_(h)
                self.out_logits[:t].copy_(model.logits(h))
            else:
                self.out_mtp[:t].copy_(model.mtp_forward(key.layer, tokens, hidden, positions, meta, self.mtp_cache))

        if not self.capture:
            with no_host_reads():
                run()
            return _Graph(run, None)
        with torch.cuda.device(self.device):  # capture streams are the current device's (LLM(device="cuda:1"))
            main = torch.cuda.current_stream()
            side = torch.cuda.Stream()
            side.wait_stream(main)
            with torch.cuda.stream(side):  # compiles and tunes the kernels (the autotuner times on the host)
                run()
            main.wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with no_host_reads(), torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local"):
                run()
        return _Graph(run, graph)


class GraphedModel:
    """The model as the drafter sees it: `mtp_forward` over the runner's MTP cache replays a graph where one fits
    (StepGraphs.mtp), every other call and attribute is the model's own."""

    def __init__(self, model: DeepseekV3, graphs: StepGraphs):
        self._model, self._graphs = model, graphs

    def mtp_forward(self, depth: int, tokens: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                    meta: AttnMeta, cache: LatentCache) -> torch.Tensor:
        if cache is self._graphs.mtp_cache:
            out = self._graphs.mtp(depth, tokens, hidden, positions, meta)
            if out is not None:
                return out
        return self._model.mtp_forward(depth, tokens, hidden, positions, meta, cache)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)
