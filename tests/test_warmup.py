"""kernels/warmup.py: the kernel cases of a model and the load-time warm-up that runs them."""

from __future__ import annotations

import pytest
import torch
from _interp import DEVICE, rel

from specdec.kernels.backend import Backend
from specdec.kernels.warmup import Gemm, Mla, ModelShape, Moe, model_cases, run_case, warmup
from specdec.model.checkpoint import tiny_config
from specdec.model.config import ModelConfig

FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [32, 32]}


def _shape() -> ModelShape:
    return ModelShape.of(ModelConfig.from_dict(tiny_config(quantization_config=FP8)))


def test_model_shape_of_a_config() -> None:
    s = _shape()
    assert (s.hidden, s.heads, s.q_lora, s.kv_lora, s.rope, s.experts, s.topk, s.fp8_block) == \
        (64, 4, 48, 32, 8, 8, 2, (32, 32))


def test_model_cases() -> None:
    s = ModelShape(hidden=256, heads=8, q_lora=96, kv_lora=64, nope=16, rope=8, v_head=24, inter=320, moe_inter=40,
                   experts=8, shared=2, topk=2, fp8_block=(32, 32))  # every linear of its own shape
    cases = model_cases(s, 2, [(3, 1, 10), (1, 6, 0), (3, 1, 10)], fp8=True)
    assert len(cases) == len(set(cases)), "one case per distinct call"
    per_rank = {(72, 256), (256, 96), (160, 256), (256, 160), (96, 256), (96, 96), (40, 256), (256, 40)}
    # kv_a, o_proj (4 heads x 24), gate = up, down, q_a, q_b (4 heads x 24), shared gate = up, shared down
    assert {(c.n, c.k) for c in cases if isinstance(c, Gemm) and c.m == 3} == per_rank
    assert {(c.n, c.k) for c in cases if isinstance(c, Gemm) and c.m == 6} == per_rank | {(160, 64)}, \
        "kv_b (4 heads x 40) only when prefilling"
    assert [c for c in cases if isinstance(c, Mla)] == [Mla(3, 10, 1, 4, 64, 8)], "MLA only over a cache"
    assert [c for c in cases if isinstance(c, Moe)] == [Moe(3, 4, 8, 2, 256, 40, (32, 32)),
                                                          Moe(6, 4, 8, 2, 256, 40, (32, 32))], "experts split whole"
    plain = model_cases(s, 1, [(1, 4, 10)], fp8=False)
    assert plain == [Moe(4, 8, 8, 2, 256, 40, None), Mla(1, 10, 4, 8, 64, 8), Mla(1, 10, 4, 8, 64, 8, tree=True)], \
        "dequantized linears run in torch"


@pytest.mark.interpreter
def test_run_case_feeds_each_backend_the_same_call() -> None:
    """The Triton and torch backends get the same placeholder inputs, so their outputs agree to W8A8 error."""
    s = _shape()
    for case in model_cases(s, 1, [(2, 3, 5)], fp8=True)[:1] + [Moe(3, 8, 8, 2, 64, 32, (32, 32)),
                                                                 Moe(3, 8, 8, 2, 64, 32, None), Mla(2, 5, 3, 4, 32, 8)]:
        got = run_case(Backend("triton"), case, DEVICE, torch.float32)
        want = run_case(Backend("torch"), case, DEVICE, torch.float32)
        assert got.isfinite().all() and rel(got, want) < 5e-2, case


@pytest.mark.interpreter
def test_warmup_runs_every_case() -> None:
    calls = []

    class Counting(Backend):
        def fp8_linear(self, *args):
            calls.append("gemm")
            return super().fp8_linear(*args)

    cases = model_cases(_shape(), 4, [(1, 1, 3)], fp8=True)
    assert warmup(Counting("triton"), cases, DEVICE, torch.float32) >= 0
    assert len(calls) == sum(isinstance(c, Gemm) for c in cases)
