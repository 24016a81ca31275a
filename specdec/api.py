"""The public entry point: `LLM`."""

from __future__ import annotations

from pathlib import Path

import torch

from .kernels.backend import Backend
from .kernels.mla import AttnMeta, causal_tree_mask
from .model import LatentCache, load_model
from .model.transformer import DeepseekV3
from .params import SpecConfig

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
BUNDLED_MODEL = Path(__file__).parent / "bundled"


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


class LLM:
    """DeepSeek-V3 (+ MTP drafter) loaded from a checkpoint directory in the released layout."""

    def __init__(self, model: str | Path | None = None, *, dtype: str | torch.dtype = "bfloat16",
                 device: str | torch.device | None = None, speculative: SpecConfig | None = SpecConfig(),
                 backend: str = "auto", tensor_parallel_size: int = 1, mla_mode: str = "auto",
                 progress: bool = False):
        self.path = Path(model) if model is not None else BUNDLED_MODEL
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = resolve_dtype(dtype)
        self.backend = Backend.resolve(backend, self.device)
        if tensor_parallel_size != 1:
            raise ValueError("tensor_parallel_size > 1 is not supported yet")
        self.speculative = speculative
        keep_fp8 = self.backend.name != "torch"
        self.model: DeepseekV3 = load_model(self.path, dtype=self.dtype, device=self.device, backend=self.backend,
                                            keep_fp8=keep_fp8, mla_mode=mla_mode, progress=progress)
        self.config = self.model.cfg
        if speculative is not None and self.config.num_nextn_predict_layers == 0:
            raise ValueError(f"{self.path}: the checkpoint has no MTP layer (num_nextn_predict_layers=0); "
                             "pass speculative=None")

    def _check_ids(self, token_ids: list[int], what: str = "token_ids") -> torch.Tensor:
        ids = torch.as_tensor(token_ids, dtype=torch.long)
        if ids.dim() != 1 or ids.numel() == 0:
            raise ValueError(f"{what} must be a non-empty list of token ids")
        if int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size:
            raise ValueError(f"{what}: ids must lie in [0, {self.config.vocab_size})")
        return ids.to(self.device)

    def _prefill(self, ids: torch.Tensor) -> tuple[torch.Tensor, LatentCache]:
        t = ids.numel()
        cache = LatentCache(self.config.num_hidden_layers, t, self.config.kv_cache_dim, self.dtype, self.device)
        meta = AttnMeta.build(torch.arange(t, device=self.device)[None], [0], [t], causal_tree_mask([t]))
        return self.model(ids, torch.arange(t, device=self.device), meta, cache), cache

    @torch.inference_mode()
    def logits(self, token_ids: list[int]) -> torch.Tensor:
        """float32 [T, vocab]: the main model's logits at every position."""
        hidden, _ = self._prefill(self._check_ids(token_ids))
        return self.model.logits(hidden).cpu()

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
        hidden, _ = self._prefill(ids)
        for j in range(depth + 1):
            n = ids.numel() - 1 - j
            cache = LatentCache(1, n, self.config.kv_cache_dim, self.dtype, self.device)
            meta = AttnMeta.build(torch.arange(n, device=self.device)[None], [0], [n], causal_tree_mask([n]))
            pos = torch.arange(1 + j, 1 + j + n, device=self.device)
            hidden = self.model.mtp_forward(j, ids[1 + j:], hidden[:n], pos, meta, cache)
        return self.model.logits(hidden).cpu()
