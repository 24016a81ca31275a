"""The engine: one loop for plain and speculative decoding, continuously batched over a persistent KV pool.

Requests are added at any time (`add`) and leave when they finish or are aborted. Each `step` runs three phases:
  1. schedule: admit waiting requests first come first served while `max_num_seqs` and the pool allow; give every
     running request the rows this step may write, preempting the newest running request (it is recomputed later)
     when blocks run out;
  2. prefill: up to `prefill_chunk` tokens of admitted prompts, so a long prompt never stalls running requests;
     a prompt's last chunk samples its first token, and every chunk builds its MTP rows;
  3. decode, every running request at its own accepted length: propose (the MTP drafts a chain or a tree from its
     last committed row), verify (one tree-masked main forward over every node), commit (accept the longest path
     plus a bonus token, move the path's rows to consecutive slots, extend the MTP cache).
Plain decoding is the same decode step with a root-only tree. Each phase has one host sync (its tokens).
The caller holds `lock` around add / abort / step / take when several threads share the engine.
"""

from __future__ import annotations

import functools
import threading
import time
from collections import deque
from typing import Any

import torch

from .detokenizer import TextTracker
from .drafter import Draft, Drafter
from .inputs import check_token_ids
from .kv_pool import KVPool, Rows, default_kv_tokens
from .model.transformer import DeepseekV3
from .outputs import Metrics
from .params import SamplingParams, SpecConfig
from .penalties import Penalties
from .request import Request, Status
from .sampling import SamplingBatch, logprob_dict, sample_from, token_logprobs
from .step_clock import StepClock
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
        self.max_num_seqs, self.prefill_chunk = max_num_seqs, prefill_chunk
        tokens = kv_cache_tokens or default_kv_tokens(cfg, dtype, device, spec is not None, max_num_seqs)
        # a cached block's rows depend on the tokens after it too: one with one MTP layer (the release's); with
        # more, the drafter's carry (a layer's output, not cached) would be missing, so prompts are recomputed
        lookahead = None if not enable_prefix_caching or (spec and cfg.num_nextn_predict_layers > 1) else \
            (1 if spec else 0)
        self.pool = KVPool(cfg, tokens, dtype, device, mtp=spec is not None, lookahead=lookahead)
        self.seed_rng = torch.Generator().manual_seed(seed)
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []  # prefilling and decoding, in admission order
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
            text = TextTracker(self.tokenizer, frozenset(stop), params.stop or ()) if self.tokenizer else None
            r = Request(self._ids, list(prompt), params, frozenset(stop),
                        torch.Generator(self.device).manual_seed(seed), tokens=list(prompt), n_prefill=len(prompt),
                        metrics=Metrics(accepted_per_position=[0] * k),
                        carry=[None] * cfg.num_nextn_predict_layers, text=text, where=where)
            self._ids += 1
            self.waiting.append(r)
        return r

    def abort(self, r: Request) -> None:
        """End a request now (finish_reason "abort"); its blocks return to the pool at once."""
        with self.lock:
            if not r.finished:
                r.finish_reason = "abort"
                self._finish(r)

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    # --- the step ---------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        """One engine step; what it emits lands in each request's outbox."""
        with self.lock:
            self._schedule()
            first = self._prefill()
            if first and self._decoded:  # let the first tokens out now; decode next step (never twice in a row)
                self._decoded = False
            else:
                self._decode()
                self._decoded = True
            for r in self.running:  # rows below n_main are final in both caches: index their full blocks
                self.pool.cache_prefix(r.table, r.tokens, r.n_main)

    def _schedule(self) -> None:
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
            while r.status is Status.RUNNING and not self.pool.grow(r.table, r.n_main + self.step_rows):
                self._preempt(next(x for x in reversed(self.running)))

    def _preempt(self, r: Request) -> None:
        """Free r's blocks and queue it first, to be recomputed from its committed tokens."""
        self.pool.release(r.table)
        self.running.remove(r)
        # a request preempted before its first token prefills its prompt again and samples that token then (with
        # the same draws as unpreempted); later ones recompute every committed token but the root
        r.status, r.n_main, r.g = Status.WAITING, 0, None
        r.n_prefill = len(r.tokens) - 1 if r.generated else len(r.tokens)
        r.carry = [None] * len(r.carry)
        r.metrics.num_preemptions += 1
        self.waiting.appendleft(r)

    def _finish(self, r: Request) -> None:
        r.status = Status.FINISHED
        self.pool.release(r.table)
        if r in self.running:
            self.running.remove(r)
        elif r in self.waiting:
            self.waiting.remove(r)
        m = r.metrics
        m.other_time = max(0.0, time.perf_counter() - r.arrival - m.prefill_time - m.draft_time - m.verify_time)

    def _rows(self, reqs: list[Request], width: int) -> Rows:
        return Rows.of([r.table for r in reqs], width, self.pool.block_size)

    def _prefill(self) -> bool:
        """Up to prefill_chunk tokens of prefilling requests, oldest first, as one causal forward. True when some
        prompt finished and emitted its first token."""
        budget, chunks = self.prefill_chunk, []
        for r in self.running:
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
                self._prompt_logprobs(r, s, e, part)
        firsts = [i for i, (r, _, e) in enumerate(chunks) if e == r.n_prefill and r.n_prefill == len(r.tokens)]
        if firsts:  # fresh prompts done: their first token, from the last prompt position
            freq = [reqs[i] for i in firsts]
            logits = self.model.logits(torch.stack([parts[i][-1] for i in firsts]))
            sb = SamplingBatch.build([r.params for r in freq], [r.gen for r in freq], 1, dev)
            first = torch.stack([self._sample(self._penalize(freq, logits), sb), _finite(logits)], 1)
            first = self.model.dist.broadcast(first)
            host = first.tolist()  # sync; rank 0 decides under tensor parallelism
            lps = self._logprobs(freq, logits, first[:, 0], 1)
            for i, (r, (tok, finite)) in enumerate(zip(freq, host)):
                if self._check_finite(r, finite):
                    r.metrics.num_steps += 1
                    r.emit([tok], lps[i] if lps else None)
        t1 = time.perf_counter()
        for (r, _, e), n in zip(chunks, lens):
            r.metrics.prefill_time += (t1 - t0) * n / sum(lens)
            r.n_main = e
            if r.finish_reason is not None and not r.finished:
                self._finish(r)
        live = [i for i, (r, _, _) in enumerate(chunks) if not r.finished]
        if self.drafter and live:
            keep = [chunks[i] for i in live]
            g = self.drafter.extend([r.tokens for r, _, _ in keep], [s for _, s, _ in keep],
                                    [parts[i] for i in live], [r.carry for r, _, _ in keep],
                                    self._rows([r for r, _, _ in keep], rows.maps.shape[1]), self.pool.mtp)
            for (r, _, _), gi in zip(keep, g):
                r.g = gi
            dt = time.perf_counter() - t1
            for r, _, _ in keep:
                r.metrics.prefill_time += dt / len(keep)
        for r, _, e in chunks:
            if not r.finished and e == r.n_prefill:
                r.status = Status.RUNNING
        return bool(firsts)

    def _prompt_logprobs(self, r: Request, s: int, e: int, hidden: torch.Tensor) -> None:
        """Prompt rows s..e-1 (hidden [e-s, D]) predict prompt tokens s+1..: their logprobs, once (a recompute
        after preemption finds them done)."""
        lps = r.prompt_logprobs = r.prompt_logprobs or [None]  # the first prompt token has no prediction
        start, end = len(lps), min(e + 1, len(r.prompt))  # the next prompt token to score, one past the last
        if start >= end:
            return
        rows = hidden[start - 1 - s:end - 1 - s]
        chosen = torch.tensor(r.prompt[start:end], device=rows.device)
        ids, values = token_logprobs(self.model.logits(rows), chosen, r.params.prompt_logprobs)
        lps.extend(logprob_dict(i, v, r.params.prompt_logprobs) for i, v in zip(ids, values))

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
        active = [r for r in self.running if r.status is Status.RUNNING]
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
                r.g = gi

    def _propose(self, active: list[Request], rows: Rows, root: torch.Tensor, sb: SamplingBatch) -> Draft:
        """The MTP drafts a chain or tree from each request's last committed row."""
        g = torch.stack([r.g for r in active])
        return self.drafter.draft(root, g, [r.n_main for r in active], rows, self.pool.mtp, sb)

    def _verify(self, active: list[Request], rows: Rows, draft: Draft, sb: SamplingBatch
                ) -> tuple[torch.Tensor, list[list[int]], list[list[dict[int, float]] | None] | None]:
        """One tree-masked main forward over every node, acceptance, and the step's one host transfer: per request
        [accepted count, path (k+1), path tokens (k+1), bonus token, finite flag]. Returns the nodes' hidden states
        [B, N, D] too (the MTP extend reads the accepted path's), and the emitted tokens' logprobs when a request
        asks for them."""
        tree, q = draft.tree, draft.q
        b, n = len(active), tree.num_nodes
        k, w = self.spec.num_speculative_tokens, self.spec.topk
        n_main = [r.n_main for r in active]
        pos = (torch.tensor(n_main, device=self.device)[:, None] + tree.depth).reshape(-1)
        meta = rows.meta(n_main, [n] * b, tree.mask.reshape(b * n, n))
        hidden = self.model(tree.tokens.reshape(-1), pos, meta, self.pool.main).view(b, n, -1)
        logits = self.model.logits(hidden.view(b * n, -1))
        target = self._penalize(active, logits, tree)
        p = sb.probs(target, n).view(b, n, -1) if sb.any_sampled else None
        u_acc = sb.uniform((k, w)) if sb.any_sampled else None
        u_bonus = sb.uniform(()) if sb.any_sampled else None
        acc = accept(tree, target.view(b, n, -1), p, q, sb.greedy, u_acc, u_bonus, k, self.relaxed)
        path_tok = tree.tokens.gather(1, acc.path.clamp(min=0))
        finite = _finite(logits.view(b, n, -1)).all(-1)
        host = torch.cat([acc.num_accepted[:, None], acc.path, path_tok, acc.bonus[:, None], finite[:, None]], 1)
        dev_host = self.model.dist.broadcast(host)
        host = dev_host.tolist()  # sync; rank 0's acceptance is every rank's
        self.clock.synced()
        lps = None
        if any(r.params.logprobs is not None for r in active):
            # emitted token j (accepted drafts, then the bonus) is the main model's choice at path node j
            a, path = dev_host[:, 0], dev_host[:, 1:2 + k].clamp(min=0)
            emitted = torch.cat([dev_host[:, 3 + k:3 + 2 * k], a[:, None] * 0], 1).scatter(
                1, a[:, None], dev_host[:, -2:-1])
            rows = logits.view(b, n, -1).gather(1, path[..., None].expand(b, k + 1, logits.shape[-1]))
            lps = self._logprobs(active, rows.view(b * (k + 1), -1), emitted.reshape(-1), k + 1)
        return hidden, host, lps

    def _commit(self, active: list[Request], n_nodes: int, host: list[list[int]],
                lps: list[list[dict[int, float]] | None] | None) -> tuple[list[Request], list[int], list[list[int]]]:
        """Emit each request's accepted tokens and bonus; move the accepted path's main-cache rows to the rows
        right after its prefix. Returns the requests that go on, their committed rows before this step, and
        their accepted paths (node indices from the root)."""
        k = self.spec.num_speculative_tokens
        src, dst, cont, n_before, paths = [], [], [], [], []
        for i, (r, row) in enumerate(zip(active, host)):
            if not self._check_finite(r, row[-1]):
                continue
            a = row[0]
            path = row[1:2 + a]
            m = r.metrics
            m.num_steps += 1
            m.num_drafted += n_nodes - 1
            m.num_accepted += a
            for d in range(a):
                m.accepted_per_position[d] += 1
            start = r.n_main
            r.emit(row[2 + k + 1:2 + k + 1 + a] + [row[-2]], lps[i] if lps else None)
            if r.finish_reason is not None:
                self._finish(r)
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
        tok = self._sample(self._penalize(active, logits), sb)
        out = self.model.dist.broadcast(torch.stack([tok, _finite(logits)], 1))
        host = out.tolist()  # sync; rank 0 decides under tensor parallelism
        lps = self._logprobs(active, logits, out[:, 0], 1)
        self.clock.synced()
        self.clock.add([r.metrics for r in active], "verify_time", t0, self.clock.mark())
        for i, (r, (tok, finite)) in enumerate(zip(active, host)):
            if self._check_finite(r, finite):
                r.metrics.num_steps += 1
                r.n_main += 1
                r.emit([tok], lps[i] if lps else None)
                if r.finish_reason is not None:
                    self._finish(r)

    def _logprobs(self, reqs: list[Request], logits: torch.Tensor, chosen: torch.Tensor, per: int
                  ) -> list[list[dict[int, float]] | None] | None:
        """logits [len(reqs) * per, V] and the tokens chosen there -> per request its `per` rows' logprob dicts,
        None for a request that does not ask (and instead of the list when none does); rows past what a request
        emits are never read."""
        want = [r.params.logprobs for r in reqs]
        if all(w is None for w in want):
            return None
        ids, values = token_logprobs(logits, chosen, max(w or 0 for w in want))
        return [None if w is None else [logprob_dict(ids[i * per + j], values[i * per + j], w) for j in range(per)]
                for i, w in enumerate(want)]

    def _check_finite(self, r: Request, finite: int) -> bool:
        """False, and the request ends with its error, when its logits were not finite."""
        if finite:
            return True
        r.error_at = time.perf_counter()
        r.error = NonFiniteLogitsError(
            f"{r.where}: the main model's logits are not finite (NaN or inf) after {len(r.generated)} "
            "generated tokens: the checkpoint's weights are broken or the activations overflow the dtype")
        r.finish_reason = "error"
        self._finish(r)
        return False


@functools.lru_cache(maxsize=64)
def _ones(b: int, device: torch.device) -> torch.Tensor:
    """[b, 1] True: one new token per sequence that sees itself."""
    return torch.ones(b, 1, dtype=torch.bool, device=device)


def _finite(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [...] int64: 1 where every logit is finite (folded into the step's one host transfer). A NaN or
    inf anywhere makes the row's float32 sum non-finite (finite logits of a real model are far below the
    3e38 / V a sum could overflow at); one reduction costs a tenth of isfinite().all()."""
    return torch.isfinite(logits.float().sum(-1)).long()
