"""Small generic fixtures: seeds, a factory for random checkpoints in the released layout, and the agreeable
checkpoint several engine tests share.

Seeds: each run draws a fresh base seed, so every run tries new random inputs; SPECDEC_TEST_SEED=N fixes it (CI sets
it, so a CI run is reproducible). Every test gets its own seed from the base seed and its node id: the `seed`
fixture returns it, and the global RNGs (random, torch, numpy) and hypothesis are seeded with it before the test
runs. The header prints the base seed, and a failing test's report shows its seed and how to replay the run."""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import settings
from models import agreeable_checkpoint

from specdec.model.checkpoint import tiny_config, write_random_checkpoint

pytest_plugins = ["serving"]  # the server tests' fixtures: ckpt, alone and url (one each per test module)

# Test shapes are tiny: extra intra-op threads only add OpenMP barrier waits, which cost 10-100x on a busy
# machine (measured: a 20-token forward 35 ms alone, 1 s with 2 threads under load).
torch.set_num_threads(1)


def _base_seed() -> int:
    env = os.environ.get("SPECDEC_TEST_SEED")
    if env is None:
        return random.SystemRandom().randrange(2**31)
    try:
        return int(env)
    except ValueError:
        raise pytest.UsageError(f"SPECDEC_TEST_SEED={env!r} is not an integer") from None


BASE_SEED = _base_seed()
# a fixed base seed also fixes hypothesis's examples; a fresh one lets it search anew
settings.register_profile("specdec", derandomize="SPECDEC_TEST_SEED" in os.environ)
settings.load_profile("specdec")


def test_seed(nodeid: str) -> int:
    """The seed of one test in this run: the base seed and the test's node id hashed to 31 bits."""
    return int.from_bytes(hashlib.blake2b(f"{BASE_SEED}:{nodeid}".encode(), digest_size=4).digest()) >> 1


test_seed.__test__ = False  # a helper, not a test


def pytest_report_header() -> str:
    return f"specdec test seed: {BASE_SEED} (SPECDEC_TEST_SEED={BASE_SEED} replays this run)"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    terminalreporter.write_line(pytest_report_header())  # -q drops the header; the summary always shows


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    report = yield
    if report.failed:
        report.sections.append(("seed", f"test seed {test_seed(item.nodeid)}; replay with "
                                        f"SPECDEC_TEST_SEED={BASE_SEED} pytest '{item.nodeid}'"))
    return report


def seed_global_rngs(s: int) -> None:
    random.seed(s)
    torch.manual_seed(s)
    np.random.seed(s)


@pytest.fixture(autouse=True)
def _seed_global_rngs(request: pytest.FixtureRequest) -> None:
    """Tests that draw from the global RNGs draw the same numbers under the same base seed."""
    seed_global_rngs(test_seed(request.node.nodeid))


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """This test's seed (see the module docstring); put it in assertion messages."""
    return test_seed(request.node.nodeid)


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
