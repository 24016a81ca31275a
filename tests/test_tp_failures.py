"""Tensor parallelism when a worker dies: the group stops with an error naming the rank, and one-rank LLMs in the
same process keep working. In a module of its own, so it starts only after test_tp.py's groups have closed (a
process drives one spawned group at a time)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch.distributed as dist
from models import agreeable_checkpoint
from tp_torchrun import GREEDY, PROMPTS

from specdec import LLM, SpecConfig
from specdec.launcher import TensorParallelError
from specdec.model.parallel import DistInfo, get_dist

SHAPE = dict(vocab_size=264, num_attention_heads=6, num_key_value_heads=6, n_routed_experts=6,
             moe_intermediate_size=48)


def test_a_dead_worker_stops_the_group(tmp_path: Path) -> None:
    ckpt = agreeable_checkpoint(tmp_path / "ckpt", seed=0, noise=0.14, **SHAPE)
    tp = LLM(ckpt, dtype="float32", speculative=SpecConfig(3, topk=2), tensor_parallel_size=2)
    procs = list(tp._driver.procs)
    it = tp.stream(PROMPTS[0], GREEDY)
    next(it)
    os.kill(procs[0].pid, signal.SIGKILL)
    with pytest.raises(TensorParallelError, match=r"rank 1 died \(exit code -9\) during stream\(\)"):
        list(it)
    with pytest.raises(TensorParallelError, match="group is down"):
        tp.logits(PROMPTS[0])
    assert get_dist() == DistInfo() and not dist.is_initialized()
    single = LLM(ckpt, dtype="float32", speculative=None)
    assert single.generate([PROMPTS[1]], GREEDY)[0].finish_reason == "length"  # one rank still works here
