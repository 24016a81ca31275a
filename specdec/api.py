"""The public entry point: `LLM`."""

from __future__ import annotations

import copy
import dataclasses
import functools
import os
import warnings
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from .cuda_graphs import graphs_wanted
from .engine import Engine
from .engine_config import BUNDLED_MODEL, DTYPES, EngineConfig, resolve_device, resolve_dtype
from .inputs import Prompt, as_prompt_list, check_text, check_token_ids
from .kernels.backend import Backend
from .kv_pool import BLOCK_SIZE, default_kv_tokens, latent_caches
from .launcher import TensorParallelError, brief, join, leader_call
from .model.loader import load_model
from .model.transformer import DeepseekV3
from .outputs import RequestOutput, StepOutput
from .params import SamplingParams, SpecConfig, check_seed, check_spec_config
from .request import Request
from .request_state import RequestState
from .runner import Runner
from .scheduler import EngineStats
from .step_plan import Channel, DraftShape, Score

__all__ = ["BUNDLED_MODEL", "DTYPES", "LLM", "RequestRejected", "encode_text", "resolve_device", "resolve_dtype"]
SMALL_MODEL_PARAMS = 1_000_000_000  # below this, CPU decoding runs on one thread by default (see `default_threads`)


def default_threads(device: torch.device, num_params: int) -> int | None:
    """CPU intra-op threads when the caller does not say: one for models under SMALL_MODEL_PARAMS (a small model's
    ops are too short to split, and on a busy machine every OpenMP barrier waits for the slowest core: measured on
    2 cores, the bundled model decodes 10-40x slower on 2 threads than on 1 when the other core is loaded), else
    torch's default. None: leave torch's setting alone (GPUs)."""
    if device.type != "cpu":
        return None
    return 1 if num_params < SMALL_MODEL_PARAMS else usable_cores()


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask: a container's or taskset's share, not the host's)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class RequestRejected(ValueError):
    """engine_step refused an add (it can never run, or its key is live or repeated); `key` names it. Nothing
    of that call was queued or aborted."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def _request_output(i: int, r: RequestState) -> RequestOutput:
    """The RequestOutput of finished request r, the i-th of its call."""
    return RequestOutput(i, r.prompt, r.generated, r.finish_reason, r.metrics, r.text.text if r.text is not None
                         else None, r.stop_reason, r.logprobs, r.prompt_logprobs)


def _load_tokenizer(path: Path) -> Any | None:
    tok = path / "tokenizer.json"
    if not tok.is_file():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(tok))
    except Exception as e:  # tokenizers raises its own exception type with a serde message
        raise ValueError(f"{tok}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None


def encode_text(tokenizer: Any, text: str, add_special_tokens: bool = True) -> list[int]:
    """text's token ids as the checkpoint's tokenizer.json encodes it, its post-processor adding the special tokens
    it names (the bundled model's puts a BOS first; none without a post-processor): what transformers'
    `AutoTokenizer.from_pretrained(path)(text)` gives, as vLLM encodes text prompts. add_special_tokens=False: the
    text's own tokens only (a rendered chat template writes its own BOS). Releases the GIL while it tokenizes, so a
    server can call it from a thread."""
    # encode_batch releases the GIL; encode holds it (a 9 MB prompt stalled every other thread for 15 s)
    return tokenizer.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids


class LLM:
    """DeepSeek-V3 (+ MTP drafter) loaded from a checkpoint directory in the released layout.

    tensor_parallel_size=N splits the model over N ranks (attention heads, MLP widths and the vocabulary split,
    routed experts spread whole). Rank 0 alone schedules and takes calls; every other rank runs rank 0's step plans
    (docs/tensor_parallel.md, launcher.py). Under torchrun (one node or several) every rank builds the LLM, then
    rank 0 makes the calls and the others call `follow()`. Otherwise this process becomes rank 0 and starts N-1
    workers on this node that follow it; `close()` (or `with LLM(...) as llm:`, or exit) stops them. The
    configuration is rank 0's (the workers are built from it; under torchrun a rank whose own differs raises a
    ValueError naming the field), and the KV pool the smallest any rank's memory allows. Output does not depend on
    N.

    threads: CPU intra-op threads (torch.set_num_threads, process-wide); default one for models under 1B
    parameters on CPU (see `default_threads`), else torch's choice. More than the cores this process may use
    (`usable_cores`) is capped at that count, with a warning.

    The engine is continuously batched over one KV pool allocated here: kv_cache_tokens rows (default: 90% of a
    GPU's free memory, 10% of a CPU's available memory), at most max_num_seqs requests running at once; more wait
    their turn, and calls from several threads share the batch; prompts are prefilled prefill_chunk tokens per
    step. enable_prefix_caching keeps the KV rows of full 64-token blocks indexed by their tokens, so a prompt that
    starts like an earlier one reuses them (plain decoding, and checkpoints with one MTP layer as the release;
    with more MTP layers prompts are recomputed). warmup (default: on CUDA with Triton) compiles and
    tunes the kernels for the decode, verify and prefill shapes at load, not in the first request.

    CUDA graphs (specdec/cuda_graphs.py): on a GPU a decode step's forwards (plain, verify, each MTP draft step) run
    as graphs, captured per batch bucket on first use and replayed with the batch padded to its bucket;
    enforce_eager=True (vLLM's name) runs them eagerly, the reference and the fallback. A CPU always runs eager, as
    do mla_mode="naive" (its attention reads lengths on the host) and backend="torch" (the reference).

    Weights: an FP8 checkpoint's weights stay as released where kernels read them: the Triton W8A8 kernels on a GPU
    with FP8, and on a CPU our C++ kernels (kernels/cpu_ops.py: FP8 linears and experts, BF16 embedding, head and
    eh_proj, about a quarter of the float32 bytes). dequantize_fp8=True dequantizes them to `dtype` at load instead:
    the reference path (and what runs where the C++ kernels cannot build).

    Thread safety: one LLM may be called from several threads at once. The model keeps no state between forwards
    and requests share only the KV pool (and, with prefix caching, blocks no one writes again), so concurrent calls
    give the results they give alone; under tensor parallelism too (the workers follow rank 0's one engine).
    """

    def __init__(self, model: str | Path | None = None, *, dtype: str | torch.dtype = "bfloat16",
                 device: str | torch.device | None = None, speculative: SpecConfig | None = SpecConfig(),
                 backend: str = "auto", tensor_parallel_size: int = 1, mla_mode: str = "auto", seed: int = 0,
                 threads: int | None = None, kv_cache_tokens: int | None = None, max_num_seqs: int = 64,
                 prefill_chunk: int = 512, enable_prefix_caching: bool = True, warmup: bool | None = None,
                 dequantize_fp8: bool = False, enforce_eager: bool = False, progress: bool = False):
        config = EngineConfig(model, dtype, device, speculative, backend, tensor_parallel_size, mla_mode, seed,
                              threads, kv_cache_tokens, max_num_seqs, prefill_chunk, enable_prefix_caching, warmup,
                              dequantize_fp8, enforce_eager)
        if threads is not None and threads > usable_cores():  # more only wait at barriers (170x slower at 1000)
            warnings.warn(f"threads={threads} exceeds the {usable_cores()} CPU cores this process may use; using "
                          f"{usable_cores()}", stacklevel=2)
            config = dataclasses.replace(config, threads=usable_cores())
        self._start(config, progress)

    @classmethod
    def from_config(cls, config: EngineConfig, progress: bool = False) -> LLM:
        """The LLM of a whole EngineConfig (what a spawned tensor-parallel worker is built with)."""
        llm = cls.__new__(cls)
        llm._start(config, progress)
        return llm

    def _start(self, config: EngineConfig, progress: bool) -> None:
        self.path, self.dtype, self.speculative, self.seed = config.model, resolve_dtype(config.dtype), \
            config.speculative, config.seed
        self._served: dict[str, RequestState] = {}  # engine_step's requests the engine still runs, by key
        self.tp = join(config.tensor_parallel_size, torch.device(config.device), self.path,
                       functools.partial(LLM.from_config, config))
        self.device, driver = self.tp.device, self.tp.driver
        try:
            self.engine_config = config = self.tp.agree(config)
            self.backend = Backend.resolve(config.backend, self.device, dequantize=config.dequantize_fp8)
            self.model: DeepseekV3 = load_model(self.path, dtype=self.dtype, device=self.device, backend=self.backend,
                                                keep_fp8=self.backend.keep_fp8, dist=self.tp.dist,
                                                mla_mode=config.mla_mode, progress=progress)
            self.config = self.model.cfg
            self.threads = config.threads or default_threads(self.device,
                                                             sum(p.numel() for p in self.model.parameters()))
            if self.threads is not None:
                torch.set_num_threads(self.threads)
            if self.speculative is not None and self.config.num_nextn_predict_layers == 0:
                raise ValueError(f"{self.path}: the checkpoint has no MTP layer (num_nextn_predict_layers=0), so it "
                                 "cannot draft: decode without speculation")
            self.tokenizer = _load_tokenizer(self.path)
            # the pool: kv_cache_tokens, else the smallest default any rank's free memory gives (ranks differ: rank 0
            # serves, drivers and other processes take memory)
            tokens = self.tp.smallest(config.kv_cache_tokens or default_kv_tokens(
                self.config, self.dtype, self.device, self.speculative is not None, config.max_num_seqs,
                self.tp.dist.rank))
            self.engine: Engine | None = None  # rank 0's: the other ranks of a group run plans only
            if self.tp.leads:
                self.engine = self._engine(self.speculative, self.seed, tokens)
                self.runner = self.engine.runner
            else:
                mtp = self.speculative is not None
                self.runner = Runner(self.model, *latent_caches(self.config, tokens, self.dtype, self.device, mtp),
                                     BLOCK_SIZE, DraftShape.of(self.speculative) if mtp else None, self.device)
                self._use_graphs(self.runner)
            r = self.runner
            r.channel = self.tp.channel()
            self.tp.check_same({"KV pool slots": r.main.num_slots, "rows a decode step writes": r.step_rows,
                                "block size": r.block_size})
            if config.warmup or (config.warmup is None and self.device.type == "cuda" and self.backend.name != "torch"):
                self.warmup_s = self._warmup()
            if driver is not None:
                driver.ready()
        except BaseException as e:
            if driver is not None:
                if not isinstance(e, ValueError):  # a worker's failure is the likelier cause: name it
                    driver.find_failed(e, "while loading the model")
                driver.abandon("rank 0 failed to build its shard")
            raise
        if self.tp.dist.world_size > 1 and self.tp.leads:
            self._finalizer = weakref.finalize(self, self.tp.close, self.engine.close)

    def with_speculative(self, speculative: SpecConfig | None, seed: int | None = None) -> LLM:
        """A view sharing this LLM's weights and tokenizer that decodes with `speculative` (None: plain) in an
        engine of its own, seeded with `seed` (default: this LLM's seed), for A/B comparisons on one loaded model.
        Raises ValueError for MTP without an MTP layer, and under tensor parallelism (the other ranks run one
        engine's plans)."""
        check_spec_config(speculative, "speculative")
        seed = self.seed if seed is None else seed
        check_seed(seed, "seed")
        if speculative == self.speculative and seed == self.seed:
            return self
        if speculative is not None and self.config.num_nextn_predict_layers == 0:
            raise ValueError(f"{self.path}: the checkpoint has no MTP layer, so it cannot draft")
        if self.tp.dist.world_size > 1:
            raise ValueError("comparing decoding configurations on one model needs an engine of each on every rank, "
                             "which a tensor-parallel group does not keep: run with --tp 1")
        other = copy.copy(self)
        other.speculative, other.seed, other._served = speculative, seed, {}
        other.engine = self._engine(speculative, seed, self.engine_config.kv_cache_tokens)
        other.runner = other.engine.runner
        return other

    def _engine(self, speculative: SpecConfig | None, seed: int, kv_tokens: int | None) -> Engine:
        c = self.engine_config
        engine = Engine(self.model, speculative, self.device, self.dtype, seed, self.tokenizer,
                        kv_cache_tokens=kv_tokens, max_num_seqs=c.max_num_seqs, prefill_chunk=c.prefill_chunk,
                        enable_prefix_caching=c.enable_prefix_caching)
        self._use_graphs(engine.runner)
        return engine

    def _use_graphs(self, runner: Runner) -> None:
        """CUDA graphs for the runner's decode forwards where they are the default (cuda_graphs.graphs_wanted)."""
        c = self.engine_config
        if graphs_wanted(self.device, c.enforce_eager, c.mla_mode, self.backend.name):
            runner.use_graphs(c.max_num_seqs)

    def _warmup(self) -> float:
        """Compile and tune the Triton kernels for decode, verify and prefill shapes (kernels/warmup.py); seconds."""
        from .kernels.warmup import ModelShape, model_cases, warmup

        rows = self.runner.step_rows
        steps = [(b, n, 1024) for b in (1, 8) for n in sorted({1, rows})] + [(1, 512, 0)]
        cases = model_cases(ModelShape.of(self.config), self.tp.dist.world_size, steps, fp8=self.backend.keep_fp8)
        return warmup(self.backend, cases, self.device, self.dtype)

    def follow(self, channel: Channel | None = None) -> None:
        """A rank other than 0 of a tensor-parallel group: run rank 0's step plans until rank 0 closes its LLM
        (then return). Under torchrun every rank builds the LLM; rank 0 makes the calls and the others call this.
        channel: where the plans come from (a spawned worker's pipe; default: the group's control group). Raises
        TensorParallelError when the group fails (rank 0 died, or this rank could not run a plan)."""
        if self.tp.leads:
            raise ValueError("follow(): rank 0 makes the calls; the other ranks of a tensor-parallel group follow it")
        if channel is not None:
            self.runner.channel = channel
        try:
            self.runner.follow()
        except Exception as e:
            raise TensorParallelError(f"tensor-parallel rank {self.tp.dist.rank}: the group failed ({brief(e)})") from e

    def close(self) -> None:
        """Rank 0: let the other ranks go (the workers it spawned exit; under torchrun they return from follow()).
        Idempotent; nothing to do on one rank or on a follower."""
        if self.tp.dist.world_size > 1 and self.tp.leads:
            self._finalizer()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- inputs -----------------------------------------------------------------------------------------------

    def _check_ids(self, token_ids: Any, what: str = "token_ids") -> list[int]:
        ids = check_token_ids(token_ids, self.config.vocab_size, what)
        limit = self.config.max_position_embeddings
        if len(ids) > limit:
            raise ValueError(f"{what}: {len(ids)} tokens exceed the context of {limit} (max_position_embeddings)")
        return ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """text's token ids by the checkpoint's rule (`encode_text`; token-id prompts are used as given).
        ValueError for empty or non-UTF-8 text, or a checkpoint without tokenizer.json."""
        check_text(text, "text")
        if self.tokenizer is None:
            raise ValueError(f"{self.path}: no tokenizer.json, so prompts must be token id lists")
        return encode_text(self.tokenizer, text, add_special_tokens)

    @property
    def max_model_len(self) -> int:
        """The most tokens one request can hold, prompt and max_tokens together: the context
        (max_position_embeddings) or the whole KV pool if smaller, less the draft rows a verify step writes."""
        r = self.runner
        return min(self.config.max_position_embeddings, r.main.num_slots) - r.step_rows

    def _encode(self, prompt: Prompt, i: int) -> list[int]:
        if isinstance(prompt, str):
            check_text(prompt, f"prompt {i}")
            return self.encode(prompt)
        return check_token_ids(prompt, self.config.vocab_size, f"prompt {i}")

    def _add(self, prompts: Any, params: SamplingParams | list[SamplingParams] | None) -> list[RequestState]:
        ids = [self._encode(p, i) for i, p in enumerate(as_prompt_list(prompts))]
        params = params or SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(ids)
        if not isinstance(params, (list, tuple)) or not all(isinstance(p, SamplingParams) for p in params):
            raise ValueError("params must be a SamplingParams or a list of them, one per prompt")
        if len(params) != len(ids):
            raise ValueError(f"got {len(params)} SamplingParams for {len(ids)} prompts")
        e = self.engine
        with e.lock:  # all or none: a bad request leaves nothing queued
            reqs = []
            try:
                for i, (p, sp) in enumerate(zip(ids, params)):
                    reqs.append(self._track(e.add(p, sp, f"prompt {i}")))
            except ValueError:
                for r in reqs:
                    e.abort(r.request)
                raise
        return reqs

    def _track(self, r: Request) -> RequestState:
        """The caller's side of an engine request: its text and stop strings, processed outside the engine lock."""
        return RequestState(r, self.tokenizer, self.engine.lock)

    def _drive(self, reqs: list[RequestState]) -> Iterator[list[StepOutput]]:
        """Step the shared engine until every request in reqs has finished, yielding what each step emitted for
        them (detokenized here, outside the engine lock). Requests of other threads' calls ride along in the same
        batches. A stop string ends its request in the engine before anything is yielded or stepped. A request
        whose logits were not finite raises its NonFiniteLogitsError; a generator closed early aborts what it
        still has running."""
        e = self.engine
        try:
            while True:
                outs = [o for r in reqs for o in r.take()]
                for r in reqs:
                    if r.needs_abort:
                        e.abort(r.request)
                failed = [r for r in reqs if r.error is not None]
                if failed:
                    raise min(failed, key=lambda r: r.request.error_at).error
                if outs:
                    yield outs
                if all(r.finished for r in reqs):
                    return
                if not outs:
                    e.step()
        finally:
            for r in reqs:
                if not r.request.finished:
                    e.abort(r.request)

    def _steps(self, prompt: str | list[int], params: SamplingParams | None) -> Iterator[StepOutput]:
        for outs in self._drive(self._add([prompt], params)):
            yield from outs

    # --- generation -------------------------------------------------------------------------------------------

    @leader_call
    def generate(self, prompts: list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run every prompt (speculatively unless speculative=None), continuously batched with whatever else the
        engine runs; one RequestOutput per prompt, in order ([] for no prompts)."""
        if isinstance(prompts, (list, tuple)) and not prompts:
            return []
        reqs = self._add(prompts, params)
        for _ in self._drive(reqs):
            pass
        return [_request_output(i, r) for i, r in enumerate(reqs)]

    @leader_call
    def as_completed(self, prompts: list[str] | list[list[int]],
                     params: SamplingParams | list[SamplingParams] | None = None) -> Iterator[RequestOutput]:
        """generate's RequestOutputs one at a time, each as soon as its request finishes (finish order; request_id
        is the prompt's index), so that a caller keeps what finished if it stops early. Closing the iterator
        aborts the requests still running."""
        if isinstance(prompts, (list, tuple)) and not prompts:
            return
        left = dict(enumerate(self._add(prompts, params)))
        for _ in self._drive(list(left.values())):
            for i in [i for i, r in left.items() if r.finished]:
                yield _request_output(i, left.pop(i))
        for i, r in left.items():
            yield _request_output(i, r)

    @leader_call
    def stream_steps(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[StepOutput]:
        """One item per engine step for one request: the tokens that step accepted, the text they add (with a
        tokenizer, held back across incomplete UTF-8 and possible stop strings) and the running metrics."""
        yield from self._steps(prompt, params)

    @leader_call
    def engine_step(self, adds: list[tuple[str, list[int], SamplingParams]] = (),
                    aborts: list[str] = ()) -> dict[str, RequestState]:
        """One step of the shared engine for a serving loop: queue `adds` (key, prompt token ids, params) and
        abort `aborts` (keys of earlier adds; unknown or finished keys are ignored), then step once if anything is
        queued or running. Returns the new requests by key; RequestState.take hands out what steps emit for one
        (detokenized in the caller's thread), and one that a stop string ended there (needs_abort) is aborted by
        passing its key in the next call's `aborts`. Under tensor parallelism this runs on rank 0, whose engine
        ships every step's plan to the other ranks: one loop on rank 0 drives them all (aborted requests' rows are
        dropped on every rank with the next plan, which a call with nothing else to run still ships). An add that
        can never run, or whose key is already live or repeated, raises RequestRejected naming it before anything
        is queued or aborted."""
        e = self.engine
        with e.lock:
            seen: set[str] = set()
            for key, _, _ in adds:
                if key in self._served or key in seen:
                    raise RequestRejected(key, f"request {key}: the key is already in use"
                                          if key in self._served else f"request {key}: the key is added twice")
                seen.add(key)
            new: dict[str, RequestState] = {}
            try:
                for key, ids, params in adds:
                    new[key] = self._track(e.add(ids, params, f"request {key}"))
            except ValueError as err:
                for r in new.values():
                    e.abort(r.request)
                raise RequestRejected(key, str(err)) from None
            self._served.update(new)
            for key in aborts:
                r = self._served.pop(key, None)
                if r is not None:
                    e.abort(r.request)
            if e.busy:
                e.step()
            for key in [k for k, r in self._served.items() if r.request.finished]:
                del self._served[key]
        return new

    def engine_stats(self) -> EngineStats:
        """The engine's load now: requests running and waiting, the KV pool's usage (rank 0's, the group's)."""
        self.tp.check("engine_stats")
        return self.engine.stats()

    @leader_call
    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[int]:
        """Yield one request's tokens as they are accepted (several per step when drafts are accepted)."""
        for out in self._steps(prompt, params):
            yield from out.token_ids

    @leader_call
    def stream_text(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Yield one request's text as it is accepted (needs a tokenizer); the pieces join to RequestOutput.text."""
        if self.tokenizer is None:
            raise ValueError(f"{self.path}: no tokenizer.json, so there is no text to stream (use stream())")
        for out in self._steps(prompt, params):
            if out.text:
                yield out.text

    # --- logits -----------------------------------------------------------------------------------------------

    @leader_call
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """float32 [T, vocab]: the main model's logits at every position."""
        return self.engine.score(Score(self._check_ids(token_ids)))

    @leader_call
    def mtp_logits(self, token_ids: list[int], depth: int = 0) -> torch.Tensor:
        """float32 [T-1-depth, vocab]. Row i is MTP layer `depth`'s logits for token i+2+depth, chaining layers
        0..depth teacher-forced: layer j sees token i+1+j and layer j-1's hidden state (layer 0: the main model's
        hidden state at i)."""
        n_mtp = self.config.num_nextn_predict_layers
        if type(depth) is not int or not 0 <= depth < n_mtp:
            raise ValueError(f"depth={depth!r}: the checkpoint has {n_mtp} MTP layer(s)")
        ids = self._check_ids(token_ids)
        if len(ids) < depth + 2:
            raise ValueError(f"mtp_logits(depth={depth}) needs at least {depth + 2} tokens")
        return self.engine.score(Score(ids, depth))
