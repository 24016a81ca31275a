"""The engine: one loop for plain and speculative decoding, continuously batched over a persistent KV pool.

Requests are added at any time (`add`) and leave when they finish or are aborted. Each `step` runs three phases:
  1. schedule (scheduler.py): admit waiting requests first come first served while `max_num_seqs` and the pool
     allow; give every running request the rows this step may write, preempting the newest running request (it is
     recomputed later) when blocks run out;
  2. prefill: up to `prefill_chunk` tokens of admitted prompts, so a long prompt never stalls running requests;
     a prompt's last chunk samples its first token, and every chunk builds its MTP rows;
  3. decode, every running request at its own accepted length: propose (the MTP drafts a chain or a tree from its
     last committed row), verify (one tree-masked main forward over every node), commit (accept the longest path
     plus a bonus token, move the path's rows to consecutive slots, extend the MTP cache). Without a drafter,
     `_decode_plain`: one forward and one sampled token per request, no tree.
Each phase moves its decisions to the host in one transfer (a StepResult: emitted tokens, finite flags, accepted
paths); a batch in which some request asks for logprobs moves those in one more, after it.
What a step emits lands in each request's outbox as token ids; text and stop strings are the caller's
(request_state.py). add, abort and step take `lock` (several threads may share the engine).
"""

from __future__ import annotations

import functools
import threading
import time
from typing import Any

import torch

from .drafter import Draft, Drafter
from .inputs import check_token_ids
from .kv_pool import KVPool, Rows, default_kv_tokens
from .logprobs import add_prompt_logprobs, step_logprobs
from .model.transformer import DeepseekV3
from .outputs import Metrics
from .params import SamplingParams, SpecConfig
from .penalties import Penalties
from .request import Request, Status
from .sampling import SamplingBatch, sample_from
from .scheduler import EngineStats, Scheduler
from .step_clock import StepClock
from .step_result import HostStep, StepResult
from .tree import TokenTree
from .verify import Relaxed, accept


class NonFiniteLogitsError(ValueError):
    """The main model produced NaN or infinite logits for a request (broken weights, or activations that overflow
    the compute dtype). Raised instead of decoding garbage."""


class Engine:
    def __init__(self, model: DeepseekV3, spec: SpecConfig | None, device: torch.device, dtype: torch.dtype,
                 seed: int = 0, tokenizer: Any | None = None, *, kv_cache_tokens: int | None = None,
                 max_num_seqs: int = 64, prefill_chunk: int = 512, enable_prefix_caching: bool = True):
        for name, v in (("max_num_seqs", max_num_seqs), ("prefill_chunk", prefill_chunk)):
            if not (type(v) is int and v >= 1):
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if kv_cache_tokens is not None and not (type(kv_cache_tokens) is int and kv_cache_tokens >= 1):
            raise ValueError(f"kv_cache_tokens must be a positive integer, got {kv_cache_tokens!r}")
        if type(enable_prefix_caching) is not bool:
            raise ValueError(f"enable_prefix_caching must be True or False, got {enable_prefix_caching!r}")
        self.model, self.spec, self.device, self.dtype, self.tokenizer = model, spec, device, dtype, tokenizer
        self.cfg = cfg = model.cfg
        if spec is not None:
            spec.check_vocab(cfg.vocab_size)
        self.drafter = Drafter(model, spec) if spec is not None else None
        self.relaxed = Relaxed(spec.relaxed_topk, spec.relaxed_delta) if spec and spec.acceptance == "relaxed" \
            else None
        k, w = (spec.num_speculative_tokens, spec.topk) if spec else (0, 1)
        # rows a decode step writes past the committed ones: the tree's nodes (main), the expansions (MTP)
        self.step_rows = 1 + (max(spec.budget, (k - 1) * w) if spec else 0)
        # uniforms a sampled request draws per decode step: draft rows over the vocabulary, acceptance, bonus
        self.draws = ((1 + (k - 1) * w) * cfg.vocab_size if spec else 0) + max(k, 1) * w + 1
        self.prefill_chunk = prefill_chunk
        tokens = kv_cache_tokens or default_kv_tokens(cfg, dtype, device, spec is not None, max_num_seqs)
        # a cached block's rows depend on the tokens after it too: one with one MTP layer (the release's); with
        # more, the drafter's carry (a layer's output, not cached) would be missing, so prompts are recomputed
        lookahead = None if not enable_prefix_caching or (spec and cfg.num_nextn_predict_layers > 1) else \
            (1 if spec else 0)
        self.pool = KVPool(cfg, tokens, dtype, device, mtp=spec is not None, lookahead=lookahead)
        self.seed_rng = torch.Generator().manual_seed(seed)
        self.scheduler = Scheduler(self.pool, max_num_seqs, self.step_rows)
        self.lock = threading.RLock()
        self.clock = StepClock(device)
        self._decoded = True  # the last step decoded (a step that emits first tokens may then skip decoding)
        self._ids = 0

    # --- requests ---------------------------------------------------------------------------------------------

    def add(self, prompt: list[int], params: SamplingParams, where: str = "prompt") -> Request:
        """Queue a request (ValueError naming `where` when it can never run: bad ids, past the context, larger
        than the whole pool, stop strings without a tokenizer)."""
        cfg = self.cfg
        prompt = check_token_ids(prompt, cfg.vocab_size, where)
        need = len(prompt) + params.max_tokens + self.step_rows
        if need > cfg.max_position_embeddings:
            raise ValueError(f"{where}: {len(prompt)} prompt tokens + max_tokens {params.max_tokens} + "
                             f"{self.step_rows} draft rows exceed the context of {cfg.max_position_embeddings} "
                             "(max_position_embeddings)")
        if need > self.pool.num_tokens:
            raise ValueError(f"{where}: needs {need} KV rows (prompt + max_tokens + draft rows) but the whole pool "
                             f"holds {self.pool.num_tokens} (kv_cache_tokens)")
        if params.logit_bias and max(params.logit_bias) >= cfg.vocab_size:
            raise ValueError(f"{where}: logit_bias names token {max(params.logit_bias)}, outside the vocabulary of "
                             f"{cfg.vocab_size}")
        if params.stop_token_ids and max(params.stop_token_ids) >= cfg.vocab_size:
            raise ValueError(f"{where}: stop_token_ids names token {max(params.stop_token_ids)}, outside the "
                             f"vocabulary of {cfg.vocab_size}")
        if self.spec is not None:
            self.spec.check_request(params, where)
        if params.stop and self.tokenizer is None:
            raise ValueError(f"{where}: stop strings need a tokenizer (the checkpoint has no tokenizer.json); use "
                             "stop_token_ids")
        stop = set(params.stop_token_ids or ())
        if not params.ignore_eos:
            stop |= set(cfg.eos_token_ids)
        with self.lock:
            seed = params.seed if params.seed is not None else int(torch.randint(2**62, (1,),
                                                                                 generator=self.seed_rng))
            k = self.spec.num_speculative_tokens if self.spec else 0
            r = Request(self._ids, list(prompt), params, frozenset(stop),
                        torch.Generator(self.device).manual_seed(seed), tokens=list(prompt), n_prefill=len(prompt),
                        metrics=Metrics(accepted_per_position=[0] * k),
                        carry=[None] * cfg.num_nextn_predict_layers, where=where)
            self._ids += 1
            self.scheduler.waiting.append(r)
        return r

    def abort(self, r: Request) -> None:
        """End a request now (finish_reason "abort"); its blocks return to the pool at once."""
        with self.lock:
            if not r.finished:
                r.finish_reason = "abort"
                self.scheduler.finish(r)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    def stats(self) -> EngineStats:
        """Requests running and waiting now, and the KV pool's usage."""
        with self.lock:
            return self.scheduler.stats()

    # --- the step ---------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        """One engine step; what it emits lands in each request's outbox."""
        with self.lock:
            self.scheduler.schedule()
            first = self._prefill()
            if first and self._decoded:  # let the first tokens out now; decode next step (never twice in a row)
                self._decoded = False
            else:
                self._decode()
                self._decoded = True
            for r in self.scheduler.running:  # rows below n_main are final in both caches: index their full blocks
                self.pool.cache_prefix(r.table, r.tokens, r.n_main)

    def _rows(self, reqs: list[Request], width: int) -> Rows:
        return Rows.of([r.table for r in reqs], width, self.pool.block_size)

    def _prefill(self) -> bool:
        """Up to prefill_chunk tokens of prefilling requests, oldest first, as one causal forward. True when some
        prompt finished and emitted its first token."""
        budget, chunks = self.prefill_chunk, []
        for r in self.scheduler.running:
            if r.status is Status.PREFILL and budget > 0:
                n = min(r.n_prefill - r.n_main, budget)
                chunks.append((r, r.n_main, r.n_main + n))
                budget -= n
        if not chunks:
            return False
        dev = self.device
        t0 = time.perf_counter()
        reqs = [c[0] for c in chunks]
        rows = self._rows(reqs, max(e for _, _, e in chunks) + self.step_rows)
        ids = torch.tensor([t for r, s, e in chunks for t in r.tokens[s:e]], device=dev)
        pos = torch.cat([torch.arange(s, e, device=dev) for _, s, e in chunks])
        hidden = self.model(ids, pos, rows.meta([s for _, s, _ in chunks], [e - s for _, s, e in chunks]),
                            self.pool.main)
        lens = [e - s for _, s, e in chunks]
        parts = list(hidden.split(lens))
        for (r, s, e), part in zip(chunks, parts):
            if r.params.prompt_logprobs is not None:
                add_prompt_logprobs(r, s, e, part, self.model.logits)
        firsts = [i for i, (r, _, e) in enumerate(chunks) if e == r.n_prefill and r.n_prefill == len(r.tokens)]
        if firsts:  # fresh prompts done: their first token, from the last prompt position
            freq = [reqs[i] for i in firsts]
            logits = self.model.logits(torch.stack([parts[i][-1] for i in firsts]))
            sb = SamplingBatch.build([r.params for r in freq], [r.gen for r in freq], 1, dev)
            first = StepResult.sampled(self._sample(self._penalize(freq, logits), sb), logits)
            first, host = first.sync(self.model.dist)  # rank 0 decides under tensor parallelism
            self._emit_sampled(freq, host, step_logprobs(freq, logits, first.tokens[:, 0], 1))
        t1 = time.perf_counter()
        for (r, _, e), n in zip(chunks, lens):
            r.metrics.prefill_time += (t1 - t0) * n / sum(lens)
            r.n_main = e
            if r.finish_reason is not None and not r.finished:
                self.scheduler.finish(r)
        live = [i for i, (r, _, _) in enumerate(chunks) if not r.finished]
        if self.drafter and live:
            keep = [chunks[i] for i in live]
            g = self.drafter.extend([r.tokens for r, _, _ in keep], [s for _, s, _ in keep],
                                    [parts[i] for i in live], [r.carry for r, _, _ in keep],
                                    self._rows([r for r, _, _ in keep], rows.maps.shape[1]), self.pool.mtp)
            for (r, _, _), gi in zip(keep, g):
                r.mtp_hidden = gi
            dt = time.perf_counter() - t1
            for r, _, _ in keep:
                r.metrics.prefill_time += dt / len(keep)
        for r, _, e in chunks:
            if not r.finished and e == r.n_prefill:
                r.status = Status.RUNNING
        return bool(firsts)

    def _penalize(self, reqs: list[Request], logits: torch.Tensor, tree: TokenTree | None = None) -> torch.Tensor:
        """The target logits, adjusted when a request asks (penalties.py: rows of a tree count their drafted
        ancestors)."""
        pen = Penalties.build(reqs, self.cfg.vocab_size, self.device)
        return logits if pen is None else pen.apply(logits, tree)

    def _sample(self, logits: torch.Tensor, sb: SamplingBatch) -> torch.Tensor:
        top1 = logits.argmax(-1)
        if not sb.any_sampled:
            return top1
        return torch.where(sb.greedy, top1, sample_from(sb.probs(logits), sb.uniform(())))

    def _decode(self) -> None:
        """Propose, verify, commit for every running request."""
        active = [r for r in self.scheduler.running if r.status is Status.RUNNING]
        if not active:
            return
        t0 = self.clock.mark()
        n_main = [r.n_main for r in active]
        rows = self._rows(active, max(n_main) + self.step_rows)
        root = torch.tensor([r.tokens[-1] for r in active], device=self.device)
        sb = SamplingBatch.build([r.params for r in active], [r.gen for r in active], self.draws, self.device)
        if not self.drafter:
            return self._decode_plain(active, rows, root, sb, t0)
        draft = self._propose(active, rows, root, sb)
        t1 = self.clock.mark()
        hidden, host, lps = self._verify(active, rows, draft, sb)
        cont, n_before, paths = self._commit(active, draft.tree.num_nodes, host, lps)
        t2 = self.clock.mark()
        timed = [r.metrics for r in active if r.finish_reason != "error"]
        self.clock.add(timed, "draft_time", t0, t1)
        self.clock.add(timed, "verify_time", t1, t2)
        if cont:  # the MTP cache gets the accepted tokens' rows; their last output seeds the next draft
            keep = [active.index(r) for r in cont]
            g = self.drafter.extend([r.tokens for r in cont], n_before, [hidden[i, p] for i, p in zip(keep, paths)],
                                    [r.carry for r in cont], self._rows(cont, rows.maps.shape[1]), self.pool.mtp)
            self.clock.add([r.metrics for r in cont], "draft_time", t2, self.clock.mark())
            for r, gi in zip(cont, g):
                r.mtp_hidden = gi

    def _propose(self, active: list[Request], rows: Rows, root: torch.Tensor, sb: SamplingBatch) -> Draft:
        """The MTP drafts a chain or tree from each request's last committed row."""
        g = torch.stack([r.mtp_hidden for r in active])
        return self.drafter.draft(root, g, [r.n_main for r in active], rows, self.pool.mtp, sb)

    def _verify(self, active: list[Request], rows: Rows, draft: Draft, sb: SamplingBatch
                ) -> tuple[torch.Tensor, HostStep, list[list[dict[int, float]] | None] | None]:
        """One tree-masked main forward over every node, acceptance, and the step's one host transfer (a
        StepResult: emitted tokens, finite flags, accepted paths). Returns the nodes' hidden states [B, N, D] too
        (the MTP extend reads the accepted path's), and the emitted tokens' logprobs when a request asks."""
        tree, q = draft.tree, draft.q
        b, n = len(active), tree.num_nodes
        k, w = self.spec.num_speculative_tokens, self.spec.topk
        n_main = [r.n_main for r in active]
        pos = (torch.tensor(n_main, device=self.device)[:, None] + tree.depth).reshape(-1)
        meta = rows.meta(n_main, [n] * b, draft.attn_mask())
        hidden = self.model(tree.tokens.reshape(-1), pos, meta, self.pool.main).view(b, n, -1)
        logits = self.model.logits(hidden.view(b * n, -1))
        target = self._penalize(active, logits, tree)
        p = sb.probs(target, n).view(b, n, -1) if sb.any_sampled else None
        u_acc = sb.uniform((k, w)) if sb.any_sampled else None
        u_bonus = sb.uniform(()) if sb.any_sampled else None
        acc = accept(tree, target.view(b, n, -1), p, q, sb.greedy, u_acc, u_bonus, k, self.relaxed)
        res, host = StepResult.verified(tree, acc, logits.view(b, n, -1)).sync(self.model.dist)  # rank 0 decides
        self.clock.synced()
        lps = None
        if any(r.params.logprobs is not None for r in active):
            # emitted token j (accepted drafts, then the bonus) is the main model's choice at path node j
            path, v = res.path.clamp(min=0), logits.shape[-1]
            rows = logits.view(b, n, v).gather(1, path[..., None].expand(*path.shape, v))
            lps = step_logprobs(active, rows.view(-1, v), res.tokens.clamp(min=0).view(-1), path.shape[1])
        return hidden, host, lps

    def _commit(self, active: list[Request], n_nodes: int, host: HostStep,
                lps: list[list[dict[int, float]] | None] | None) -> tuple[list[Request], list[int], list[list[int]]]:
        """Emit each request's accepted tokens and bonus; move the accepted path's main-cache rows to the rows
        right after its prefix. Returns the requests that go on, their committed rows before this step, and
        their accepted paths (node indices from the root)."""
        src, dst, cont, n_before, paths = [], [], [], [], []
        for i, r in enumerate(active):
            if not self._check_finite(r, host.finite[i]):
                continue
            path = host.path[i]
            a = len(path) - 1  # accepted drafts (the root not counted)
            m = r.metrics
            m.num_steps += 1
            m.num_drafted += n_nodes - 1
            m.num_accepted += a
            for d in range(a):
                m.accepted_per_position[d] += 1
            start = r.n_main
            r.emit(host.tokens[i], lps[i] if lps else None)
            if r.finish_reason is not None:
                self.scheduler.finish(r)
                continue
            for j, node in enumerate(path):
                if node != j:
                    src.append(r.table.slot(start + node, self.pool.block_size))
                    dst.append(r.table.slot(start + j, self.pool.block_size))
            r.n_main = start + a + 1
            cont.append(r)
            n_before.append(start)
            paths.append(path)
        if src:
            self.pool.main.copy_slots(torch.tensor(src, device=self.device), torch.tensor(dst, device=self.device))
        return cont, n_before, paths

    def _decode_plain(self, active: list[Request], rows: Rows, root: torch.Tensor, sb: SamplingBatch,
                      t0: Any) -> None:
        """Plain decoding: the root-only tree's step without the tree (one token a request, sampled as the first
        token is); the speculative step reduces to this when nothing is accepted."""
        n_main = [r.n_main for r in active]
        meta = rows.meta(n_main, [1] * len(active), _ones(len(active), root.device))
        hidden = self.model(root, torch.tensor(n_main, device=root.device), meta, self.pool.main)
        logits = self.model.logits(hidden)
        res = StepResult.sampled(self._sample(self._penalize(active, logits), sb), logits)
        res, host = res.sync(self.model.dist)  # rank 0 decides under tensor parallelism
        lps = step_logprobs(active, logits, res.tokens[:, 0], 1)
        self.clock.synced()
        self.clock.add([r.metrics for r in active], "verify_time", t0, self.clock.mark())
        self._emit_sampled(active, host, lps)
        for r in active:
            r.n_main += 1
            if r.finish_reason is not None and not r.finished:
                self.scheduler.finish(r)

    def _emit_sampled(self, reqs: list[Request], host: HostStep,
                      lps: list[list[dict[int, float]] | None] | None) -> None:
        """Emit each request's one sampled token (a prompt's first, or plain decoding's) unless its logits were
        not finite (then it ends with its error)."""
        for i, r in enumerate(reqs):
            if self._check_finite(r, host.finite[i]):
                r.metrics.num_steps += 1
                r.emit(host.tokens[i], lps[i] if lps else None)

    def _check_finite(self, r: Request, finite: bool) -> bool:
        """False, and the request ends with its error, when its logits were not finite."""
        if finite:
            return True
        r.error_at = time.perf_counter()
        r.error = NonFiniteLogitsError(
            f"{r.where}: the main model's logits are not finite (NaN or inf) after {len(r.generated)} "
            "generated tokens: the checkpoint's weights are broken or the activations overflow the dtype")
        r.finish_reason = "error"
        self.scheduler.finish(r)
        return False


@functools.lru_cache(maxsize=64)
def _ones(b: int, device: torch.device) -> torch.Tensor:
    """[b, 1] True: one new token per sequence that sees itself."""
    return torch.ones(b, 1, dtype=torch.bool, device=device)

