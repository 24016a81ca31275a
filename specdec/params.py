"""User-facing parameters: SamplingParams (vLLM's names) and SpecConfig (SGLang/vLLM's meaning).

Both validate types as well as ranges at construction: a bad value raises ValueError naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

GREEDY_EPS = 1e-5  # temperatures below this decode greedily (as vLLM does): dividing by them overflows
MAX_SEED = 2**64  # torch.Generator seeds are unsigned 64-bit
MAX_LOGPROBS = 20  # top log-probabilities per token, as OpenAI's top_logprobs and vLLM's default max_logprobs


def _int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_seed(seed: Any, what: str) -> None:
    if not (_int(seed) and 0 <= seed < MAX_SEED):
        raise ValueError(f"{what} must be an integer in [0, 2**64), got {seed!r}")


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. temperature 0 (or below 1e-5) is greedy; top_k 0 (or -1) means no top-k cut.

    stop: strings that end the request when the generated text contains one (the text then ends before it);
    stop_token_ids: tokens that end it (kept in token_ids, not rendered in text), as EOS does unless ignore_eos.
    logprobs: also return, for each generated token, its log-probability and those of the `logprobs` most likely
    tokens (0: its own only), under the main model's raw distribution (before temperature, top-k and top-p), as
    vLLM does; None returns none. prompt_logprobs: the same for each prompt token after the first (the request then
    prefills its whole prompt: the prefix cache holds no logits).
    presence_penalty / frequency_penalty in [-2, 2] (OpenAI's) subtract from a token's logit for having appeared
    in the output / per appearance; repetition_penalty > 0 (vLLM's) divides the positive logits and multiplies
    the negative ones of tokens seen in the prompt or the output. logit_bias (OpenAI's): {token id: a bias in
    [-100, 100]} added to its logit. min_tokens (vLLM's): EOS and stop_token_ids cannot end the request before
    that many tokens (stop strings still can). MTP stays lossless under all of them (penalties.py)."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: tuple[str, ...] | None = None
    stop_token_ids: tuple[int, ...] | None = None
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    min_tokens: int = 0

    def __post_init__(self) -> None:
        def bad(field: str, want: str) -> ValueError:
            return ValueError(f"SamplingParams.{field} must be {want}, got {getattr(self, field)!r}")

        if not (_int(self.max_tokens) and self.max_tokens >= 1):
            raise bad("max_tokens", "a positive integer")
        if not (_real(self.temperature) and self.temperature >= 0):
            raise bad("temperature", "a finite number >= 0")
        if not (_real(self.top_p) and 0 < self.top_p <= 1):
            raise bad("top_p", "a number in (0, 1]")
        if not (_int(self.top_k) and self.top_k >= -1):
            raise bad("top_k", "an integer >= 0 (0 or -1: off)")
        if self.top_k == -1:
            object.__setattr__(self, "top_k", 0)
        if self.seed is not None:
            check_seed(self.seed, "SamplingParams.seed")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if stop is not None:
            if not (isinstance(stop, (list, tuple)) and all(isinstance(s, str) and s for s in stop)):
                raise bad("stop", "a string or a list of non-empty strings")
            object.__setattr__(self, "stop", tuple(stop) or None)
        ids = self.stop_token_ids
        if ids is not None:
            if not (isinstance(ids, (list, tuple)) and all(_int(t) and t >= 0 for t in ids)):
                raise bad("stop_token_ids", "a list of non-negative integers")
            object.__setattr__(self, "stop_token_ids", tuple(ids))
        if not isinstance(self.ignore_eos, bool):
            raise bad("ignore_eos", "True or False")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and not (_int(v) and 0 <= v <= MAX_LOGPROBS):
                raise bad(name, f"None or an integer in [0, {MAX_LOGPROBS}]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not (_real(getattr(self, name)) and -2 <= getattr(self, name) <= 2):
                raise bad(name, "a number in [-2, 2]")
        if not (_real(self.repetition_penalty) and self.repetition_penalty > 0):
            raise bad("repetition_penalty", "a finite number > 0 (1: off)")
        bias = self.logit_bias
        if bias is not None:
            if not (isinstance(bias, dict) and all(_int(t) and t >= 0 and _real(v) and -100 <= v <= 100
                                                   for t, v in bias.items())):
                raise bad("logit_bias", "a dict of token ids (>= 0) to biases in [-100, 100]")
            object.__setattr__(self, "logit_bias", {t: float(v) for t, v in bias.items()} or None)
        if not (_int(self.min_tokens) and 0 <= self.min_tokens <= self.max_tokens):
            raise bad("min_tokens", f"an integer in [0, max_tokens={self.max_tokens}]")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_EPS

    @property
    def adjusts_target(self) -> bool:
        """Whether penalties, a logit bias or min_tokens change the main model's distribution (penalties.py)."""
        return (self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1
                or self.logit_bias is not None or self.min_tokens > 0)


def check_spec_config(spec: Any, what: str) -> None:
    """Raise ValueError unless spec is a SpecConfig or None (plain decoding)."""
    if spec is not None and not isinstance(spec, SpecConfig):
        raise ValueError(f"{what} must be a SpecConfig or None, got {type(spec).__name__}")


ACCEPTANCE = ("exact", "relaxed")
MAX_DRAFT_STEPS = 32


@dataclass(frozen=True)
class SpecConfig:
    """MTP speculative decoding: k draft steps; `topk` children per expanded node (1 = chain);
    `num_draft_tokens` the tree's node budget (default k for a chain, else k * topk).

    adaptive=True (the default) makes that shape a cap (issue 18, draft_policy.py): each step rank 0 picks the
    batch's draft depth from the engine's own measured costs (none when verifying more tokens would not pay), and
    each request drafts only the tokens whose estimated acceptance, learned from the MTP's confidence, outweighs
    their measured cost; what is verified changes, never the acceptance rule. A sampled request with a seed drafts
    the capped shape (its output then depends on its seed alone, not on load). adaptive=False drafts the shape as
    given at every step.

    acceptance="exact" is lossless. "relaxed" (TensorRT-LLM's relaxed acceptance: a greedy draft token is accepted
    when it is among the target's top `relaxed_topk` and within `relaxed_delta` of the top-1 log-probability) is
    lossy: output no longer equals the main model's alone. Off by default. It is defined for greedy decoding only:
    an engine with relaxed acceptance refuses sampled requests (`check_request`).
    """

    num_speculative_tokens: int = 3
    topk: int = 1
    num_draft_tokens: int | None = None
    acceptance: str = "exact"
    relaxed_topk: int = 3
    relaxed_delta: float = 0.5
    adaptive: bool = True

    def __post_init__(self) -> None:
        def bad(field: str, want: str) -> ValueError:
            return ValueError(f"SpecConfig.{field} must be {want}, got {getattr(self, field)!r}")

        if not (_int(self.num_speculative_tokens) and 1 <= self.num_speculative_tokens <= MAX_DRAFT_STEPS):
            raise bad("num_speculative_tokens", f"an integer in [1, {MAX_DRAFT_STEPS}]")
        if not (_int(self.topk) and self.topk >= 1):
            raise bad("topk", "a positive integer")
        if self.num_draft_tokens is not None and not (
                _int(self.num_draft_tokens) and 1 <= self.num_draft_tokens <= self.max_tree_nodes):
            raise bad("num_draft_tokens", f"an integer in [1, {self.max_tree_nodes}] (k * topk)")
        if self.acceptance not in ACCEPTANCE:
            raise bad("acceptance", "'exact' or 'relaxed'")
        if not (_int(self.relaxed_topk) and self.relaxed_topk >= 1):
            raise bad("relaxed_topk", "a positive integer")
        if not (_real(self.relaxed_delta) and self.relaxed_delta >= 0):
            raise bad("relaxed_delta", "a finite number >= 0")
        if not isinstance(self.adaptive, bool):
            raise bad("adaptive", "True or False")

    @property
    def max_tree_nodes(self) -> int:
        return self.num_speculative_tokens * self.topk

    @property
    def budget(self) -> int:
        """Draft nodes verified per step (the root, i.e. the last accepted token, not counted)."""
        if self.num_draft_tokens is not None:
            return self.num_draft_tokens
        return self.num_speculative_tokens if self.topk == 1 else self.max_tree_nodes

    def check_request(self, params: SamplingParams, where: str) -> None:
        """Raise ValueError naming `where` for a request this drafting cannot serve as asked: relaxed acceptance
        has no sampling rule (verify.py applies it to greedy rows), so a sampled request would silently get exact
        acceptance."""
        if self.acceptance == "relaxed" and not params.greedy:
            raise ValueError(f"{where}: relaxed acceptance applies to greedy decoding only (temperature 0), got "
                             f"temperature {params.temperature:g}")

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ValueError for draft widths the vocabulary cannot supply."""
        if self.topk > vocab_size:
            raise ValueError(f"SpecConfig.topk {self.topk} exceeds the vocabulary ({vocab_size} tokens)")
        if self.acceptance == "relaxed" and self.relaxed_topk > vocab_size:
            raise ValueError(f"SpecConfig.relaxed_topk {self.relaxed_topk} exceeds the vocabulary "
                             f"({vocab_size} tokens)")
