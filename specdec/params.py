"""User-facing parameters: SamplingParams (vLLM's names) and SpecConfig (SGLang/vLLM's meaning)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingParams:
    """Per-request sampling. temperature 0 is greedy; top_k 0 means no top-k cut."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] | None = None
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"SamplingParams.max_tokens must be a positive integer, got {self.max_tokens!r}")
        if not self.temperature >= 0:
            raise ValueError(f"SamplingParams.temperature must be >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k must be an integer >= 0, got {self.top_k!r}")
        if self.stop_token_ids is not None:
            object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in self.stop_token_ids))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class SpecConfig:
    """MTP speculative decoding: k draft steps; `topk` children per expanded node (1 = chain);
    `num_draft_tokens` the tree's node budget (default k for a chain, else k * topk).

    acceptance="exact" is lossless. "relaxed" (TensorRT-LLM's relaxed acceptance: a greedy draft token is accepted
    when it is among the target's top `relaxed_topk` and within `relaxed_delta` of the top-1 log-probability) is
    lossy: output no longer equals the main model's alone. Off by default.
    """

    num_speculative_tokens: int = 3
    topk: int = 1
    num_draft_tokens: int | None = None
    method: str = "mtp"
    acceptance: str = "exact"
    relaxed_topk: int = 3
    relaxed_delta: float = 0.5

    def __post_init__(self) -> None:
        if self.method != "mtp":
            raise ValueError(f"SpecConfig.method {self.method!r} unsupported (only 'mtp')")
        if not isinstance(self.num_speculative_tokens, int) or self.num_speculative_tokens < 1:
            raise ValueError(f"SpecConfig.num_speculative_tokens must be >= 1, got {self.num_speculative_tokens!r}")
        if not isinstance(self.topk, int) or self.topk < 1:
            raise ValueError(f"SpecConfig.topk must be >= 1, got {self.topk!r}")
        if self.num_draft_tokens is not None and not (1 <= self.num_draft_tokens <= self.max_tree_nodes):
            raise ValueError(f"SpecConfig.num_draft_tokens must be in [1, {self.max_tree_nodes}] "
                             f"(k * topk), got {self.num_draft_tokens!r}")
        if self.acceptance not in ("exact", "relaxed"):
            raise ValueError(f"SpecConfig.acceptance must be 'exact' or 'relaxed', got {self.acceptance!r}")

    @property
    def max_tree_nodes(self) -> int:
        return self.num_speculative_tokens * self.topk

    @property
    def budget(self) -> int:
        """Draft nodes verified per step (the root, i.e. the last accepted token, not counted)."""
        if self.num_draft_tokens is not None:
            return self.num_draft_tokens
        return self.num_speculative_tokens if self.topk == 1 else self.max_tree_nodes
