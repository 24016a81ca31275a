"""The engine: one loop for plain and speculative decoding, continuously batched over a persistent KV pool.

Requests are added at any time (`add`) and leave when they finish or are aborted. Each `step` runs its phases:
  1. schedule (scheduler.py): admit waiting requests first come first served while `max_num_seqs` and the pool
     allow; give every running request the rows this step may write, preempting the newest running request (it is
     recomputed later) when blocks run out; pick up to `prefill_chunk` prompt tokens, so a long prompt never
     stalls running requests. These decisions, the decode batch and its draft shape and sampling seeds make the
     step plan (step_plan.py), shipped to every rank of a tensor-parallel group;
  2. prefill, on every rank (runner.py): one causal forward over the chunks; a prompt's last chunk samples its
     first token, and every chunk builds its MTP rows;
  3. decode, every running request at its own accepted length: propose (the MTP drafts a chain or a tree from its
     last committed row), verify (one tree-masked main forward over every node), commit (accept the longest path
     plus a bonus token, move the path's rows to consecutive slots, extend the MTP cache). Without a drafter,
     one forward and one sampled token per request, no tree.
This engine runs on rank 0 alone and decides: it is the runner's Leader, whose `prefilled`, `decoded` and
`verified` sample, accept and emit. Each of those moves its decisions to the host in one transfer (a StepResult:
emitted tokens, finite flags, accepted paths; a batch in which some request asks for logprobs moves those in one
more), and under tensor parallelism ships what the other ranks need of them in one Commit. What a step emits lands
in each request's outbox as token ids; text and stop strings are the caller's (request_state.py). add, abort,
step and score take `lock` (several threads may share the engine).
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from typing import Any

import torch

from .draft_policy import DraftPolicy
from .drafter import Draft, Drafter
from .inputs import check_token_ids
from .kv_pool import KVPool, default_kv_tokens
from .logprobs import add_prompt_logprobs, prompt_rows, step_logprobs
from .model.transformer import DeepseekV3
from .outputs import Metrics
from .params import SamplingParams, SpecConfig
from .penalties import Penalties
from .request import Request, Status
from .runner import Runner, StepTimes, sampling_batch
from .sampling import SamplingBatch, sample_from
from .scheduler import EngineStats, Scheduler
from .step_clock import StepClock
from .step_plan import Chunk, Decode, DraftShape, Sampling, Score, StepPlan
from .step_result import Commit, HostStep, StepResult
from .tree import TokenTree
from .verify import Relaxed, accept


class NonFiniteLogitsError(ValueError):
    """The main model produced NaN or infinite logits for a request (broken weights, or activations that overflow
    the compute dtype). Raised instead of decoding garbage."""


class Engine:
    """Rank 0's engine over `model` (this rank's shard). kv_cache_tokens: the pool (default from this process's
    free memory: a tensor-parallel LLM passes the size every rank agreed on); the other sizes as LLM's, which
    checks them (EngineConfig)."""

    def __init__(self, model: DeepseekV3, spec: SpecConfig | None, device: torch.device, dtype: torch.dtype,
                 seed: int = 0, tokenizer: Any | None = None, *, kv_cache_tokens: int | None = None,
                 max_num_seqs: int = 64, prefill_chunk: int = 512, enable_prefix_caching: bool = True):
        self.model, self.spec, self.device, self.dtype, self.tokenizer = model, spec, device, dtype, tokenizer
        self.cfg = cfg = model.cfg
        if spec is not None:
            spec.check_vocab(cfg.vocab_size)
        self.shape = DraftShape.of(spec) if spec is not None else None
        self.policy = DraftPolicy(self.shape, spec.adaptive) if spec is not None else None
        self.relaxed = Relaxed(spec.relaxed_topk, spec.relaxed_delta) if spec and spec.acceptance == "relaxed" \
            else None
        tokens = kv_cache_tokens or default_kv_tokens(cfg, dtype, device, spec is not None, max_num_seqs)
        # a cached block's rows depend on the tokens after it too: one with one MTP layer (the release's); with
        # more, the drafter's carry (a layer's output, not cached) would be missing, so prompts are recomputed
        lookahead = None if not enable_prefix_caching or (spec and cfg.num_nextn_predict_layers > 1) else \
            (1 if spec else 0)
        self.pool = KVPool(cfg, tokens, dtype, device, mtp=spec is not None, lookahead=lookahead)
        self.runner = Runner(model, self.pool.main, self.pool.mtp, self.pool.block_size, self.shape, device)
        self.step_rows = self.runner.step_rows
        self.seed_rng = torch.Generator().manual_seed(seed)
        self.scheduler = Scheduler(self.pool, max_num_seqs, self.step_rows, prefill_chunk)
        self.lock = threading.RLock()
        self._decoded = True  # the last step decoded (a step that emits first tokens may then skip decoding)
        self._ids = 0
        self._shipped: dict[int, int] = {}  # per request holding blocks: how many of them the runners have
        self._step: dict[int, Request] = {}  # the running requests of the step in progress, by id
        self._first_seeds: dict[int, int] = {}  # this step's first-token seeds, by request id
        self._lag: dict[int, int] = {}  # requests whose last rows plain steps left out of the MTP cache: how many
        self._work = (0, 0, 0, 0)  # the decode step's tokens verified, draft steps, emitted and MTP rows caught up

    @property
    def drafter(self) -> Drafter | None:
        return self.runner.drafter

    @property
    def clock(self) -> StepClock:
        return self.runner.clock

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
            r = Request(self._ids, list(prompt), params, frozenset(stop), random.Random(seed), tokens=list(prompt),
                        n_prefill=len(prompt), metrics=Metrics(accepted_per_position=[0] * k,
                                                               drafted_per_position=[0] * k), where=where)
            self._ids += 1
            self.scheduler.waiting.append(r)
        return r

    def abort(self, r: Request) -> None:
        """End a request now (finish_reason "abort"); its blocks return to the pool at once (the other ranks drop
        its rows with the next plan)."""
        with self.lock:
            if not r.finished:
                r.finish_reason = "abort"
                self.scheduler.finish(r)

    @property
    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished

    @property
    def busy(self) -> bool:
        """Requests to run, or rows the other ranks still hold for requests that ended: a step is due."""
        return self.scheduler.has_unfinished or bool(self.scheduler.freed)

    def stats(self) -> EngineStats:
        """Requests running and waiting now, the KV pool's usage and (MTP) the drafting's costs and choices."""
        with self.lock:
            stats = self.scheduler.stats()
            return stats if self.policy is None else dataclasses.replace(stats, drafting=self.policy.stats())

    # --- the step ---------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> None:
        """One engine step: schedule, ship the plan, run it (prefill, then propose / verify / commit); what it
        emits lands in each request's outbox."""
        with self.lock:
            plan = self._plan()
            if plan is None:
                return
            self.runner.send(plan)
            times = self.runner.run(plan, self)
            self._account(plan.prefill, times)
            for r in self.scheduler.running:  # rows final in both caches: index their full blocks
                self.pool.cache_prefix(r.table, r.tokens, r.n_main - self._lag.get(r.id, 0))

    @torch.inference_mode()
    def score(self, s: Score) -> torch.Tensor:
        """Run a Score on every rank; its logits (runner.score)."""
        with self.lock:
            self.runner.send(s)
            return self.runner.score(s)

    def close(self) -> None:
        """Tell the other ranks of a tensor-parallel group that this engine is done (they return from follow)."""
        with self.lock:
            self.runner.send(None)

    def _plan(self) -> StepPlan | None:
        """Schedule, and the step plan of what was decided (None when there is nothing to run or ship)."""
        chunks = self.scheduler.schedule()
        running = self.scheduler.running
        self._step = {r.id: r for r in running}
        self._first_seeds = {r.id: r.gen.getrandbits(63) for r, _, e in chunks if self._ends_prompt(r, e)}
        prefill = [Chunk(r.id, s, r.tokens[s:e], None if self._ends_prompt(r, e) else r.tokens[e],
                         prompt_rows(r, s, e)) for r, s, e in chunks]
        decode = None
        if prefill and self._first_seeds and self._decoded:  # let the first tokens out now; decode next step
            self._decoded = False
        else:  # (never twice in a row)
            self._decoded = True
            decode = self._decode_batch({r.id: e for r, _, e in chunks})
        freed, self.scheduler.freed = self.scheduler.freed, []
        for i in freed:
            self._shipped.pop(i, None)
            self._lag.pop(i, None)
        blocks = {}
        for r in running:
            n = self._shipped.get(r.id, 0)
            if len(r.table.blocks) > n:
                blocks[r.id] = r.table.blocks[n:]
                self._shipped[r.id] = len(r.table.blocks)
        if not (prefill or decode or freed or blocks):
            return None
        return StepPlan(freed, blocks, len(running), prefill, decode)

    @staticmethod
    def _ends_prompt(r: Request, end: int) -> bool:
        """Whether a chunk ending at row `end` ends r's prompt, so that the step samples r's first token."""
        return end == r.n_prefill == len(r.tokens)

    def _decode_batch(self, ends: dict[int, int]) -> Decode | None:
        """Every request decoding after this step's prefill (admission order): those running, and those whose
        prefill this step ends (a new prompt's root is the first token the step samples)."""
        reqs = [r for r in self.scheduler.running if r.status is Status.RUNNING or ends.get(r.id) == r.n_prefill]
        if not reqs:
            return None
        roots = [None if r.status is Status.PREFILL and self._ends_prompt(r, r.n_prefill) else r.tokens[-1]
                 for r in reqs]
        n_main = [r.n_main if r.status is Status.RUNNING else r.n_prefill for r in reqs]
        shape, depth, floor = self.policy.plan(reqs, [x is None for x in roots]) if self.policy else (None,) * 3
        return Decode([r.id for r in reqs], n_main, roots, _sampling(reqs), shape, depth, floor)

    # --- rank 0's decisions (the runner's Leader) -------------------------------------------------------------

    def prefilled(self, chunks: list[Chunk], scores: list[torch.Tensor | None],
                  logits: torch.Tensor | None) -> Commit | None:
        """Score the prompt rows asked for, sample and emit the first tokens of the chunks that end a new prompt,
        and advance every chunk's request; a Commit over the chunks when some first token was sampled."""
        reqs = [self._step[c.req] for c in chunks]
        for c, r, sc in zip(chunks, reqs, scores):
            if sc is not None:
                add_prompt_logprobs(r, c.start, c.scored, sc)
        firsts = [i for i, c in enumerate(chunks) if c.next is None]
        tokens: list[list[int]] = [[] for _ in chunks]
        if firsts:
            freq = [reqs[i] for i in firsts]
            sb = sampling_batch(_sampling(freq, [self._first_seeds[r.id] for r in freq]), len(freq), 1, self.device)
            res = StepResult.sampled(self._sample(self._penalize(freq, logits), sb), logits)
            host = res.host()
            self._emit_sampled(freq, host, step_logprobs(freq, logits, res.tokens[:, 0], 1))
            for i, t in zip(firsts, host.tokens):
                tokens[i] = t
        for c, r in zip(chunks, reqs):
            r.n_main = c.end
            if r.finish_reason is not None and not r.finished:
                self.scheduler.finish(r)
            if not r.finished and c.end == r.n_prefill:
                r.status = Status.RUNNING
        return Commit([not r.finished for r in reqs], tokens) if firsts else None

    def decoded(self, reqs: list[int], logits: torch.Tensor, sb: SamplingBatch) -> None:
        """Plain decoding: sample and emit one token a request (with a drafter, its MTP rows wait for the next
        drafting step: runner.py)."""
        active = [self._step[i] for i in reqs]
        res = StepResult.sampled(self._sample(self._penalize(active, logits), sb), logits)
        host = res.host()
        self.clock.synced()
        self._emit_sampled(active, host, step_logprobs(active, logits, res.tokens[:, 0], 1))
        self._work = (len(active), 0, len(active), 0)
        for r in active:
            r.n_main += 1
            if self.policy is not None:
                self._lag[r.id] = self._lag.get(r.id, 0) + 1
            if r.finish_reason is not None and not r.finished:
                self.scheduler.finish(r)

    def verified(self, reqs: list[int], draft: Draft, logits: torch.Tensor, sb: SamplingBatch) -> Commit:
        """Acceptance over the draft's trees (logits [B * N, V] at every node), the step's one host transfer (a
        StepResult), then each request's accepted tokens and bonus emitted."""
        active = [self._step[i] for i in reqs]
        tree, q = draft.tree, draft.q
        b, n = tree.tokens.shape
        k, w = self.shape.k, self.shape.topk  # the configured shape lays out the uniforms, whatever was drafted
        target = self._penalize(active, logits, tree)
        p = sb.probs(target, n).view(b, n, -1) if sb.any_sampled else None
        u_acc = sb.uniform((k, w)) if sb.any_sampled else None
        u_bonus = sb.uniform(()) if sb.any_sampled else None
        acc = accept(tree, target.view(b, n, -1), p, q, sb.greedy, u_acc, u_bonus, draft.depth, self.relaxed)
        res = StepResult.verified(tree, acc, logits.view(b, n, -1))
        host = res.host()
        self.clock.synced()
        self.policy.verified([r.params.greedy for r in active], draft.num_nodes, draft.codes, draft.parents,
                             host.path)
        lag = sum(self._lag.pop(r.id, 0) for r in active)  # rows the runner caught up before it drafted
        self._work = (sum(draft.num_nodes), draft.steps, sum(map(len, host.tokens)), lag)
        lps = None
        if any(r.params.logprobs is not None for r in active):
            # emitted token j (accepted drafts, then the bonus) is the main model's choice at path node j
            path, v = res.path.clamp(min=0), logits.shape[-1]
            rows = logits.view(b, n, v).gather(1, path[..., None].expand(*path.shape, v))
            lps = step_logprobs(active, rows.view(-1, v), res.tokens.clamp(min=0).view(-1), path.shape[1])
        return Commit(self._commit(active, draft, host, lps), host.tokens, host.path)

    def _commit(self, active: list[Request], draft: Draft, host: HostStep,
                lps: list[list[dict[int, float]] | None] | None) -> list[bool]:
        """Emit each request's accepted tokens and bonus; whether each goes on (its rows then move and its MTP
        cache is extended: runner.py)."""
        keep = []
        for i, (r, nodes, depth) in enumerate(zip(active, draft.num_nodes, draft.depths(self.shape.budget))):
            if not self._check_finite(r, host.finite[i]):
                keep.append(False)
                continue
            a = len(host.path[i]) - 1  # accepted drafts (the root not counted)
            m = r.metrics
            m.num_steps += 1
            m.num_drafted += nodes - 1
            m.num_accepted += a
            for d in range(depth):
                m.drafted_per_position[d] += 1
            for d in range(a):
                m.accepted_per_position[d] += 1
            r.emit(host.tokens[i], lps[i] if lps else None)
            if r.finish_reason is not None:
                self.scheduler.finish(r)
            else:
                r.n_main += a + 1
            keep.append(r.finish_reason is None)
        return keep

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

    def _account(self, chunks: list[Chunk], times: StepTimes) -> None:
        """The step's phase times into its requests' metrics: prefill (the forward and first tokens shared by
        tokens, the MTP rows equally among the requests that go on), draft (propose and the MTP extend) and
        verify (the forward, acceptance and commit)."""
        if times.prefill is not None:
            t0, t1, t2 = times.prefill
            total = sum(len(c.tokens) for c in chunks)
            live = [self._step[c.req] for c in chunks if not self._step[c.req].finished]
            for c in chunks:
                self._step[c.req].metrics.prefill_time += (t1 - t0) * len(c.tokens) / total
            for r in live:
                r.metrics.prefill_time += (t2 - t1) / len(live)
        if times.decode is None:
            return
        if self.policy is not None:
            self.policy.timed(self.clock, len(times.batch), times.decode, *self._work)
        batch = [self._step[i] for i in times.batch]
        if len(times.decode) == 2:
            self.clock.add([r.metrics for r in batch], "verify_time", *times.decode)
            return
        t0, _, _, t1, t2, t3 = times.decode  # the catch-up of earlier plain steps' MTP rows counts as drafting
        timed = [r.metrics for r in batch if r.finish_reason != "error"]
        self.clock.add(timed, "draft_time", t0, t1)
        self.clock.add(timed, "verify_time", t1, t2)
        self.clock.add([r.metrics for r in batch if not r.finished], "draft_time", t2, t3)


def _sampling(reqs: list[Request], seeds: list[int] | None = None) -> Sampling | None:
    """The requests' sampling this step (None when all are greedy); each sampled request's seed: from `seeds`, or
    drawn from its stream."""
    if all(r.params.greedy for r in reqs):
        return None
    ps = [r.params for r in reqs]
    if seeds is None:
        seeds = [r.gen.getrandbits(63) for r in reqs]
    return Sampling([p.temperature for p in ps], [p.top_k for p in ps], [p.top_p for p in ps],
                    [None if p.greedy else s for p, s in zip(ps, seeds)])
