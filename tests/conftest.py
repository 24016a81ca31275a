"""Small generic fixtures: fresh seeds, a factory for random checkpoints in the released layout, and the agreeable
checkpoint several engine tests share."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from models import agreeable_checkpoint

from specdec.model.checkpoint import tiny_config, write_random_checkpoint

# Test shapes are tiny: extra intra-op threads only add OpenMP barrier waits, which cost 10-100x on a busy
# machine (measured: a 20-token forward 35 ms alone, 1 s with 2 threads under load).
torch.set_num_threads(1)


@pytest.fixture
def seed() -> int:
    """A fresh seed each run (put it in assertion messages so a failure can be replayed)."""
    return random.SystemRandom().randrange(2**31)


@pytest.fixture
def make_checkpoint(tmp_path_factory: pytest.TempPathFactory, seed: int) -> Callable[..., Path]:
    """make_checkpoint(config_dict=None, *, num_shards=3, **tiny_config_overrides) -> a new checkpoint directory
    with random weights (seeded by the `seed` fixture)."""

    def make(config: dict[str, Any] | None = None, *, num_shards: int = 3, **overrides: Any) -> Path:
        cfg = config if config is not None else tiny_config(**overrides)
        return write_random_checkpoint(tmp_path_factory.mktemp("ckpt"), cfg, seed=seed, num_shards=num_shards)

    return make


@pytest.fixture(scope="session")
def shared_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An agreeable checkpoint (its MTP drafts are often, not always, accepted), built once per session."""
    return agreeable_checkpoint(tmp_path_factory.mktemp("shared"), seed=1, noise=0.14)
