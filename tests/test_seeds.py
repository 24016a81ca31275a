"""SPECDEC_TEST_SEED: a fixed base seed replays every test's seed and random draws (CI sets one); without it each
run draws new ones. Loads fresh copies of this suite's conftest under each setting."""

from __future__ import annotations

import importlib.util
import os
import random
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from hypothesis import settings

FIXED = "SPECDEC_TEST_SEED" in os.environ  # this run's own setting, restored after the copies change hypothesis's



def _conftest(monkeypatch: pytest.MonkeyPatch, base: str | None) -> ModuleType:
    if base is None:
        monkeypatch.delenv("SPECDEC_TEST_SEED", raising=False)
    else:
        monkeypatch.setenv("SPECDEC_TEST_SEED", base)
    spec = importlib.util.spec_from_file_location("conftest_copy", Path(__file__).with_name("conftest.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _draws(mod: ModuleType, nodeid: str) -> tuple:
    s = mod.test_seed(nodeid)
    mod.seed_global_rngs(s)
    return s, random.random(), float(torch.rand(())), float(np.random.rand())


@pytest.fixture
def restore_hypothesis():
    yield
    settings.register_profile("specdec", derandomize=FIXED)
    settings.load_profile("specdec")


def test_a_fixed_seed_replays_and_the_default_draws_anew(monkeypatch: pytest.MonkeyPatch, restore_hypothesis) -> None:
    a, b = _conftest(monkeypatch, "7"), _conftest(monkeypatch, "7")
    assert a.BASE_SEED == 7 and _draws(a, "t.py::x") == _draws(b, "t.py::x")
    assert settings().derandomize, "a fixed seed fixes hypothesis's examples too"
    assert _draws(a, "t.py::x") != _draws(a, "t.py::y"), "each test has a seed of its own"
    assert _draws(a, "t.py::x") != _draws(_conftest(monkeypatch, "8"), "t.py::x")
    fresh = [_conftest(monkeypatch, None) for _ in range(2)]
    assert not settings().derandomize
    assert _draws(fresh[0], "t.py::x") != _draws(fresh[1], "t.py::x"), "without it every run draws anew"
    with pytest.raises(pytest.UsageError, match="SPECDEC_TEST_SEED='x'"):
        _conftest(monkeypatch, "x")
