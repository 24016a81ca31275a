"""One engine for plain and speculative decoding, batched over requests with ragged accepted lengths.

Per request r, a step: (1) the MTP drafts a token tree from its last committed row; (2) the main model verifies
every node in one forward (ancestor-only attention among nodes, full attention to the cached prefix); (3) the
longest accepted path plus a bonus token is committed: its latent rows are compacted into contiguous slots and
the MTP cache is extended with the main model's hidden states of the accepted tokens. Plain decoding is the same
step with a root-only tree. One host sync per step (the accepted tokens).

Slots: request r owns main-cache slots [r * R, (r + 1) * R) (token i at r * R + i; tree node j of a step at
r * R + n + j) and MTP-cache slots [r * Q, (r + 1) * Q) (committed row i at r * Q + i; draft expansions after
max_len).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any

import torch

from .detokenizer import TextTracker
from .drafter import Drafter, SamplingBatch
from .inputs import check_token_ids
from .kernels.attn_meta import AttnMeta
from .model import LatentCache
from .model.transformer import DeepseekV3
from .outputs import Metrics, StepOutput
from .params import SamplingParams, SpecConfig
from .sampling import sample_from
from .tree import chain_tree
from .verify import Relaxed, accept


class NonFiniteLogitsError(ValueError):
    """The main model produced NaN or infinite logits for a request (broken weights, or activations that overflow
    the compute dtype). Raised instead of decoding garbage."""


@dataclass
class Request:
    index: int
    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    gen: torch.Generator
    tokens: list[int] = field(default_factory=list)  # committed: prompt + generated (last = the next root)
    n_main: int = 0  # tokens in the main cache
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # the stop token or stop string that ended it
    metrics: Metrics = field(default_factory=Metrics)
    carry: list[torch.Tensor | None] = field(default_factory=list)  # per MTP layer: its last output (drafter)
    text: TextTracker | None = None  # with a tokenizer: the generated text, cut at a stop string

    def emit(self, new: list[int]) -> tuple[list[int], str]:
        """Append accepted tokens, stopping at a stop token, a stop string or max_tokens; returns the tokens
        emitted and the text they add."""
        out, piece = [], ""
        for t in new:
            out.append(t)
            self.generated.append(t)
            if self.text is not None:
                piece += self.text.push(t)
            if t in self.stop_ids:
                self.finish_reason, self.stop_reason = "stop", t
            elif self.text is not None and self.text.stopped is not None:
                self.finish_reason, self.stop_reason = "stop", self.text.stopped
            elif len(self.generated) >= self.params.max_tokens:
                self.finish_reason = "length"
            if self.finish_reason is not None:
                break
        if self.finish_reason is not None and self.text is not None:
            piece += self.text.finish()
        self.tokens.extend(out)
        self.metrics.num_generated += len(out)
        return out, piece


class Engine:
    def __init__(self, model: DeepseekV3, spec: SpecConfig | None, device: torch.device, dtype: torch.dtype,
                 seed: int = 0, tokenizer: Any | None = None):
        self.model, self.spec, self.device, self.dtype, self.tokenizer = model, spec, device, dtype, tokenizer
        self.cfg = model.cfg
        if spec is not None:
            spec.check_vocab(self.cfg.vocab_size)
        self.drafter = Drafter(model, spec) if spec is not None else None
        self.seed_rng = torch.Generator().manual_seed(seed)
        self._seed_lock = threading.Lock()  # requests of concurrent calls draw their default seeds one at a time
        self.relaxed = Relaxed(spec.relaxed_topk, spec.relaxed_delta) if spec and spec.acceptance == "relaxed" \
            else None

    @property
    def tree_nodes(self) -> int:
        return 1 + (self.spec.budget if self.spec else 0)

    def _requests(self, prompts: list[list[int]], params: list[SamplingParams]) -> list[Request]:
        reqs = []
        limit = self.cfg.max_position_embeddings
        for i, (p, sp) in enumerate(zip(prompts, params)):
            check_token_ids(p, self.cfg.vocab_size, f"prompt {i}")
            need = len(p) + sp.max_tokens + self.tree_nodes
            if need > limit:
                raise ValueError(f"prompt {i}: {len(p)} prompt tokens + max_tokens {sp.max_tokens} + "
                                 f"{self.tree_nodes} draft slots exceed the context of {limit} "
                                 "(max_position_embeddings)")
            if sp.stop and self.tokenizer is None:
                raise ValueError(f"prompt {i}: stop strings need a tokenizer (the checkpoint has no tokenizer.json);"
                                 " use stop_token_ids")
            stop = set(sp.stop_token_ids or ())
            if not sp.ignore_eos:
                stop |= set(self.cfg.eos_token_ids)
            if sp.seed is not None:
                seed = sp.seed
            else:
                with self._seed_lock:
                    seed = int(torch.randint(2**62, (1,), generator=self.seed_rng))
            gen = torch.Generator(self.device).manual_seed(seed)
            k = self.spec.num_speculative_tokens if self.spec else 0
            text = TextTracker(self.tokenizer, frozenset(stop), sp.stop or ()) if self.tokenizer else None
            reqs.append(Request(i, list(p), sp, frozenset(stop), gen, tokens=list(p),
                                metrics=Metrics(accepted_per_position=[0] * k),
                                carry=[None] * self.cfg.num_nextn_predict_layers, text=text))
        return reqs

    def _sampling(self, active: list[Request]) -> SamplingBatch:
        dev = self.device
        ps = [r.params for r in active]

        def uniform(shape: tuple[int, ...]) -> torch.Tensor:
            return torch.stack([torch.rand(shape, generator=r.gen, device=dev) for r in active])

        return SamplingBatch(
            greedy=torch.tensor([p.greedy for p in ps], device=dev),
            # greedy rows never sample; temperature 1 keeps their (unused) probabilities finite
            temperature=torch.tensor([1.0 if p.greedy else p.temperature for p in ps], dtype=torch.float32,
                                     device=dev),
            top_k=torch.tensor([p.top_k for p in ps], device=dev),
            top_p=torch.tensor([p.top_p for p in ps], dtype=torch.float32, device=dev),
            any_sampled=not all(p.greedy for p in ps), uniform=uniform,
            any_filtered=any(p.top_k > 0 or p.top_p < 1 for p in ps))

    @torch.inference_mode()
    def run(self, prompts: list[list[int]], params: list[SamplingParams]) -> Iterator[list[StepOutput]]:
        """Generate for every prompt together; yields, after each step, what it emitted per request.
        Requests end with finish_reason set; the caller reads request.generated and request.metrics.
        Raises NonFiniteLogitsError (a ValueError) naming the request whose logits are NaN or infinite."""
        reqs = self._requests(prompts, params)
        dev, cfg = self.device, self.cfg
        t_start = time.perf_counter()
        max_len = max(len(r.prompt) + r.params.max_tokens for r in reqs) + 1
        s = Slots(max_len, max_len + self.tree_nodes,
                  max_len + (self.drafter.num_expansions if self.drafter else 0))
        main_cache = LatentCache(cfg.num_hidden_layers, len(reqs) * s.region, cfg.kv_cache_dim, self.dtype, dev)
        mtp_cache = (LatentCache(cfg.num_nextn_predict_layers, len(reqs) * s.mtp_region, cfg.kv_cache_dim,
                                 self.dtype, dev)
                     if self.drafter else None)

        # prefill: the whole prompts, causal; the first token comes from the last prompt position
        t0 = time.perf_counter()
        lens = [len(r.prompt) for r in reqs]
        ids = torch.tensor([t for r in reqs for t in r.prompt], device=dev)
        pos = torch.cat([torch.arange(n, device=dev) for n in lens])
        meta = AttnMeta.contiguous(s.main_base(reqs, dev), [0] * len(reqs), lens)
        hidden = self.model(ids, pos, meta, main_cache)
        last = torch.tensor(lens, device=dev).cumsum(0) - 1
        sb = self._sampling(reqs)
        logits = self.model.logits(hidden[last])
        first = torch.stack([self._sample_first(logits, sb), _finite(logits)], 1)
        # under tensor parallelism rank 0 decides (a no-op on one rank), so every rank commits the same tokens
        first = self.model.dist.broadcast(first).tolist()  # sync
        t1 = time.perf_counter()
        emitted = []
        for r, (tok, finite), n in zip(reqs, first, lens):
            _check_finite(r, finite)
            r.n_main = n
            r.metrics.num_steps += 1
            r.metrics.verify_time += t1 - t0
            r.metrics.first_token_time = t1 - t_start
            emitted.append(StepOutput(r, *r.emit([tok])))
        yield emitted
        active = [r for r in reqs if r.finish_reason is None]
        g = None
        if self.drafter and active:
            starts = [0, *accumulate(lens)]
            g = self._extend(active, [0] * len(active),
                             [hidden[starts[r.index]:starts[r.index + 1]] for r in active], s, mtp_cache)
            for r in active:
                r.metrics.draft_time += time.perf_counter() - t1
        while active:
            emitted, g = self._step(active, g, s, main_cache, mtp_cache)
            yield emitted
            active = [r for r in active if r.finish_reason is None]
        for r in reqs:
            m = r.metrics
            m.other_time = max(0.0, time.perf_counter() - t_start - m.draft_time - m.verify_time)

    def _sample_first(self, logits: torch.Tensor, sb: SamplingBatch) -> torch.Tensor:
        top1 = logits.argmax(-1)
        if not sb.any_sampled:
            return top1
        return torch.where(sb.greedy, top1, sample_from(sb.probs(logits), sb.uniform(())))

    def _extend(self, active: list[Request], n_rows: list[int], hidden: list[torch.Tensor], s: Slots,
                cache: LatentCache) -> torch.Tensor:
        """The MTP cache rows of each request's newly committed tokens (after n_rows[b]); returns each request's
        last-row layer-0 output [B, D] (it predicts the next root's first child)."""
        return self.drafter.extend([r.tokens for r in active], n_rows, hidden, [r.carry for r in active],
                                   s.mtp_base(active, self.device), cache)

    def _step(self, active: list[Request], g: torch.Tensor | None, s: Slots, main_cache: LatentCache,
              mtp_cache: LatentCache | None) -> tuple[list[StepOutput], torch.Tensor | None]:
        """One draft + verify + commit step for the active requests; returns the emitted tokens and the next g."""
        dev = self.device
        b = len(active)
        n_main = [r.n_main for r in active]
        root = torch.tensor([r.tokens[-1] for r in active], device=dev)
        sb = self._sampling(active)
        t0 = time.perf_counter()
        if self.drafter:
            mtp_base = s.mtp_base(active, dev)
            draft = self.drafter.draft(root, g, n_main, mtp_base, mtp_base + s.max_len, mtp_cache, sb)
            tree, q = draft.tree, draft.q
            k, w = self.spec.num_speculative_tokens, self.spec.topk
        else:
            tree, q, k, w = chain_tree(root, root.new_zeros(b, 0)), None, 0, 1  # plain: the root alone
        t1 = time.perf_counter()

        n = tree.num_nodes
        pos = (torch.tensor(n_main, device=dev)[:, None] + tree.depth).reshape(-1)
        meta = AttnMeta.contiguous(s.main_base(active, dev), n_main, [n] * b, tree.mask.reshape(b * n, n))
        hidden = self.model(tree.tokens.reshape(-1), pos, meta, main_cache).view(b, n, -1)
        logits = self.model.logits(hidden.view(b * n, -1))
        p = sb.probs(logits, n).view(b, n, -1) if sb.any_sampled else None
        u_acc = sb.uniform((max(k, 1), w)) if sb.any_sampled else torch.zeros(b, max(k, 1), w, device=dev)
        u_bonus = sb.uniform(()) if sb.any_sampled else torch.zeros(b, device=dev)
        acc = accept(tree, logits.view(b, n, -1), p, q, sb.greedy, u_acc, u_bonus, k, self.relaxed)
        path_tok = tree.tokens.gather(1, acc.path.clamp(min=0))
        finite = _finite(logits.view(b, n, -1)).all(-1)
        host = torch.cat([acc.num_accepted[:, None], acc.path, path_tok, acc.bonus[:, None], finite[:, None]], 1)
        host = self.model.dist.broadcast(host).tolist()  # sync; rank 0's acceptance is every rank's
        t2 = time.perf_counter()

        emitted, src, dst, cont, ext_hidden, n_rows = [], [], [], [], [], []
        for r, row in zip(active, host):
            _check_finite(r, row[-1])
        for i, (r, row) in enumerate(zip(active, host)):
            a = row[0]
            path = row[1:2 + a]
            new = row[2 + k + 1:2 + k + 1 + a] + [row[-2]]
            m = r.metrics
            m.num_steps += 1
            m.num_drafted += n - 1
            m.num_accepted += a
            for d in range(a):
                m.accepted_per_position[d] += 1
            m.draft_time += t1 - t0
            m.verify_time += t2 - t1
            n_before = r.n_main
            emitted.append(StepOutput(r, *r.emit(new)))
            if r.finish_reason is not None:
                continue
            base = r.index * s.region + n_before
            src += [base + j for j in path]
            dst += [base + j for j in range(a + 1)]
            r.n_main = n_before + a + 1
            cont.append(r)
            n_rows.append(n_before)
            ext_hidden.append(hidden[i, path])
        if src:  # the accepted path's rows move to contiguous slots right after the prefix
            main_cache.copy_slots(torch.tensor(src, device=dev), torch.tensor(dst, device=dev))
        if not self.drafter or not cont:
            return emitted, None
        t3 = time.perf_counter()
        g = self._extend(cont, n_rows, ext_hidden, s, mtp_cache)
        for r in cont:
            r.metrics.draft_time += time.perf_counter() - t3
        return emitted, g


@dataclass(frozen=True)
class Slots:
    """Slot layout of one generate call: request r owns main slots [r * region, ...) and MTP slots
    [r * mtp_region, ...) whose rows past max_len hold the step's draft expansions."""

    max_len: int
    region: int
    mtp_region: int

    def main_base(self, reqs: list[Request], device: torch.device) -> torch.Tensor:
        return torch.tensor([r.index * self.region for r in reqs], device=device)

    def mtp_base(self, reqs: list[Request], device: torch.device) -> torch.Tensor:
        return torch.tensor([r.index * self.mtp_region for r in reqs], device=device)



def _finite(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [...] int64: 1 where every logit is finite (folded into the step's one host transfer)."""
    return torch.isfinite(logits).all(-1).long()


def _check_finite(r: Request, finite: int) -> None:
    if not finite:
        raise NonFiniteLogitsError(
            f"request {r.index}: the main model's logits are not finite (NaN or inf) after {len(r.generated)} "
            "generated tokens: the checkpoint's weights are broken or the activations overflow the dtype")
