"""Latent KV cache: per layer, one [kv_lora_rank + qk_rope_head_dim] row per token slot."""

from __future__ import annotations

import torch


class KVPoolError(ValueError):
    """The KV pool cannot be allocated (too large for the device)."""


class LatentCache:
    """kv[layer] is [num_slots + 1, kv_lora_rank + qk_rope_head_dim]; any set of slots can be written and read.
    Slot `pad_slot` (= num_slots) belongs to no request: the padding rows of a captured step write and read it."""

    def __init__(self, num_layers: int, num_slots: int, row_dim: int, dtype: torch.dtype, device: torch.device):
        nbytes = num_layers * num_slots * row_dim * torch.empty((), dtype=dtype).element_size()
        try:
            self.kv = torch.zeros(num_layers, num_slots + 1, row_dim, dtype=dtype, device=device)
        except (RuntimeError, MemoryError) as e:  # torch.OutOfMemoryError is a RuntimeError
            raise KVPoolError(
                f"KV pool of {num_layers} layers x {num_slots} slots x {row_dim} ({nbytes / 2**30:.2f} GiB) does not "
                f"fit on {device}: ask for fewer or shorter requests ({type(e).__name__})") from None
        self.num_slots = self.pad_slot = num_slots

    def layer(self, i: int) -> torch.Tensor:
        return self.kv[i]

    def copy_slots(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Move rows src -> dst in every layer (compacts an accepted tree path into contiguous slots)."""
        self.kv[:, dst] = self.kv[:, src]
