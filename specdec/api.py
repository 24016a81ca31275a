"""The public entry point: `LLM`."""

from __future__ import annotations

import copy
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
from tokenizers import Tokenizer

from .distributed import collective, join
from .engine import Engine
from .kernels.attn_meta import AttnMeta
from .kernels.backend import Backend
from .model import LatentCache, load_model
from .model.transformer import DeepseekV3
from .outputs import Metrics, RequestOutput
from .params import SamplingParams, SpecConfig

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
BUNDLED_MODEL = Path(__file__).parent / "bundled"


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


class LLM:
    """DeepSeek-V3 (+ MTP drafter) loaded from a checkpoint directory in the released layout.

    tensor_parallel_size=N splits the model over N ranks (attention heads, MLP widths and the vocabulary split,
    routed experts spread whole; see specdec/distributed.py). Under torchrun every rank builds the LLM and makes
    the same calls. Otherwise this process becomes rank 0 and starts N-1 workers on this node that follow its
    calls; `close()` (or `with LLM(...) as llm:`, or exit) stops them. Output does not depend on N.
    """

    def __init__(self, model: str | Path | None = None, *, dtype: str | torch.dtype = "bfloat16",
                 device: str | torch.device | None = None, speculative: SpecConfig | None = SpecConfig(),
                 backend: str = "auto", tensor_parallel_size: int = 1, mla_mode: str = "auto", seed: int = 0,
                 progress: bool = False):
        self.path = Path(model) if model is not None else BUNDLED_MODEL
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = resolve_dtype(dtype)
        if not isinstance(tensor_parallel_size, int) or tensor_parallel_size < 1:
            raise ValueError(f"tensor_parallel_size must be a positive integer, got {tensor_parallel_size!r}")
        self.tp = join(tensor_parallel_size, self.device, dict(
            model=self.path, dtype=dtype, device=self.device.type, speculative=speculative, backend=backend,
            tensor_parallel_size=tensor_parallel_size, mla_mode=mla_mode, seed=seed))
        self._driver = self.tp.driver  # rank 0 of a group this LLM started: forwards each call to the workers
        if self._driver is not None:
            weakref.finalize(self, self._driver.close)
        self.device = self.tp.device
        try:
            self.backend = Backend.resolve(backend, self.device)
            self.speculative = speculative
            keep_fp8 = self.backend.name != "torch"
            self.model: DeepseekV3 = load_model(self.path, dtype=self.dtype, device=self.device,
                                                backend=self.backend, keep_fp8=keep_fp8, dist=self.tp.dist,
                                                mla_mode=mla_mode, progress=progress)
            self.config = self.model.cfg
            if speculative is not None and self.config.num_nextn_predict_layers == 0:
                raise ValueError(f"{self.path}: the checkpoint has no MTP layer (num_nextn_predict_layers=0); "
                                 "pass speculative=None")
            tok = self.path / "tokenizer.json"
            self.tokenizer = Tokenizer.from_file(str(tok)) if tok.is_file() else None
            self.engine = Engine(self.model, speculative, self.device, self.dtype, seed)
            if self._driver is not None:
                self._driver.ready()
        except BaseException:
            if self._driver is not None:
                self._driver.abandon("rank 0 failed to build its shard")
            raise

    def with_speculative(self, speculative: SpecConfig | None, seed: int = 0) -> LLM:
        """A view sharing this LLM's weights, tokenizer and workers that decodes with `speculative` (None: plain)
        in an engine of its own, for A/B comparisons on one loaded model. Raises ValueError for MTP without an MTP
        layer, and on rank 0 of a tensor-parallel group this process spawned (its workers replay this LLM's calls
        with their own engine; under torchrun every rank makes the same view, which works)."""
        if speculative == self.speculative:
            return self
        if speculative is not None and self.config.num_nextn_predict_layers == 0:
            raise ValueError(f"{self.path}: the checkpoint has no MTP layer; use speculative=None")
        if self._driver is not None:
            raise ValueError("comparing decoding configurations on one model needs every rank to switch engines, "
                             "which spawned tensor-parallel workers cannot: run under torchrun or with --tp 1")
        other = copy.copy(self)
        other.speculative = speculative
        other.engine = Engine(self.model, speculative, self.device, self.dtype, seed)
        return other

    def close(self) -> None:
        """Stop the tensor-parallel workers this LLM started (idempotent; nothing to do otherwise)."""
        if self._driver is not None:
            self._driver.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_ids(self, token_ids: list[int], what: str = "token_ids") -> torch.Tensor:
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError(f"{what} must be a non-empty list of token ids")
        if int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size:
            raise ValueError(f"{what}: ids must lie in [0, {self.config.vocab_size})")
        return ids.to(self.device)

    def _prefill(self, ids: torch.Tensor) -> torch.Tensor:
        """Final hidden states [T, D] of one sequence, through a throwaway cache."""
        t = ids.numel()
        cache = LatentCache(self.config.num_hidden_layers, t, self.config.kv_cache_dim, self.dtype, self.device)
        meta = AttnMeta.contiguous(torch.zeros(1, dtype=torch.long, device=self.device), [0], [t])
        return self.model(ids, torch.arange(t, device=self.device), meta, cache)

    def _encode(self, prompt: str | list[int], i: int) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"{self.path}: no tokenizer.json, so prompts must be token id lists")
            ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
            bos = self.config.bos_token_id
            return ([bos] if bos is not None else []) + ids
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) for t in prompt):
            raise ValueError(f"prompt {i} must be a string or a list of token ids")
        return list(prompt)

    def _decode(self, ids: list[int], stop: frozenset[int]) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode([t for t in ids if t not in stop])

    def _run(self, prompts: list[str] | list[list[int]], params: SamplingParams | list[SamplingParams]):
        if isinstance(prompts, (str, tuple)) or (isinstance(prompts, list) and prompts
                                                 and isinstance(prompts[0], int)):
            raise ValueError("prompts must be a list of strings or a list of token-id lists")
        ids = [self._encode(p, i) for i, p in enumerate(prompts)]
        if isinstance(params, SamplingParams):
            params = [params] * len(ids)
        if len(params) != len(ids):
            raise ValueError(f"got {len(params)} SamplingParams for {len(ids)} prompts")
        return self.engine.run(ids, list(params))

    @collective
    def generate(self, prompts: list[str] | list[list[int]],
                 params: SamplingParams | list[SamplingParams] | None = None) -> list[RequestOutput]:
        """Run every prompt together (speculatively unless speculative=None); one RequestOutput per prompt."""
        reqs: dict[int, object] = {}
        for step in self._run(prompts, params or SamplingParams()):
            for r, _ in step:
                reqs[r.index] = r
        return [RequestOutput(r.index, r.prompt, r.generated, r.finish_reason, r.metrics,
                              self._decode(r.generated, r.stop_ids)) for r in (reqs[i] for i in sorted(reqs))]

    @collective
    def stream_steps(self, prompt: str | list[int], params: SamplingParams | None = None
                     ) -> Iterator[tuple[list[int], Metrics]]:
        """Like `stream`, one item per engine step: the tokens that step emitted and the request's running
        metrics (final once the iterator ends)."""
        for step in self._run([prompt], [params or SamplingParams()]):
            for r, new in step:
                yield new, r.metrics

    @collective
    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[int]:
        """Yield one request's tokens as they are accepted (several per step when drafts are accepted)."""
        for step in self._run([prompt], [params or SamplingParams()]):
            for _, new in step:
                yield from new

    @collective
    @torch.inference_mode()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """float32 [T, vocab]: the main model's logits at every position."""
        hidden = self._prefill(self._check_ids(token_ids))
        return self.model.logits(hidden).cpu()

    @collective
    @torch.inference_mode()
    def mtp_logits(self, token_ids: list[int], depth: int = 0) -> torch.Tensor:
        """float32 [T-1-depth, vocab]. Row i is MTP layer `depth`'s logits for token i+2+depth, chaining layers
        0..depth teacher-forced: layer j sees token i+1+j and layer j-1's hidden state (layer 0: the main model's
        hidden state at i)."""
        n_mtp = self.config.num_nextn_predict_layers
        if not 0 <= depth < n_mtp:
            raise ValueError(f"depth={depth}: the checkpoint has {n_mtp} MTP layer(s)")
        ids = self._check_ids(token_ids)
        if ids.numel() < depth + 2:
            raise ValueError(f"mtp_logits(depth={depth}) needs at least {depth + 2} tokens")
        hidden = self._prefill(ids)
        for j in range(depth + 1):
            n = ids.numel() - 1 - j
            cache = LatentCache(1, n, self.config.kv_cache_dim, self.dtype, self.device)
            meta = AttnMeta.contiguous(torch.zeros(1, dtype=torch.long, device=self.device), [0], [n])
            pos = torch.arange(1 + j, 1 + j + n, device=self.device)
            hidden = self.model.mtp_forward(j, ids[1 + j:], hidden[:n], pos, meta, cache)
        return self.model.logits(hidden).cpu()
