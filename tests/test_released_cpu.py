"""Weights kept as released on a CPU (kernels/cpu_ops.py): FP8 linears and experts stay FP8 with their block scales,
BF16 tensors stay BF16, one copy shared by the MTP layer; the logits equal the float32-dequantized reference path's,
speculative decoding stays lossless on it, and tensor-parallel shards may cut scale blocks."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from models import agreeable_checkpoint
from test_tp import FP8, SHAPE

from specdec import BUNDLED_MODEL, LLM, SamplingParams, SpecConfig
from specdec.kernels import cpu_ops
from specdec.model.layers import Linear

pytestmark = pytest.mark.skipif(not cpu_ops.available(), reason=f"no CPU kernels: {cpu_ops.unavailable_reason()}")
GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def resident_bytes(model: torch.nn.Module) -> int:
    """Bytes of every tensor the model's modules hold (parameters, buffers, derived weights), each storage once."""
    seen: dict[int, int] = {}
    for m in model.modules():
        for t in [*m._parameters.values(), *m._buffers.values(), *vars(m).values()]:
            if isinstance(t, torch.Tensor):
                seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """FP8 with 16-blocks: partial edge blocks, and shares that cut blocks at TP 2 (q_b: 144 rows -> 72)."""
    return agreeable_checkpoint(tmp_path_factory.mktemp("fp8"), seed=0, noise=0.14, quantization_config=FP8(16),
                                **SHAPE)


@pytest.fixture(scope="module")
def pair(ckpt: Path) -> tuple[LLM, LLM]:
    kw = dict(dtype="float32", speculative=SpecConfig(num_speculative_tokens=3))
    return LLM(ckpt, **kw), LLM(ckpt, dequantize_fp8=True, **kw)


def test_weights_stay_as_released(pair: tuple[LLM, LLM]) -> None:
    released, reference = pair
    assert released.backend.cpu_kernels and released.backend.keep_fp8 and not reference.backend.keep_fp8
    model = released.model
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    eh = [layer.eh_proj for layer in model.mtp_layers]
    assert all(m.weight.dtype == torch.float8_e4m3fn and m.weight_scale_inv.dtype == torch.float32
               for m in linears if not any(m is e for e in eh))
    assert all(m.weight.dtype == torch.bfloat16 for m in eh)
    assert model.lm_head.weight.dtype == model.model.embed_tokens.weight.dtype == torch.bfloat16
    moes = [layer.mlp for layer in model.model.layers if hasattr(layer.mlp, "w13")]
    assert moes and all(m.w13.dtype == m.w2.dtype == torch.float8_e4m3fn for m in moes)
    heads = [p for p in model.parameters() if p.shape == model.lm_head.weight.shape]
    assert len(heads) == 2, "the MTP layer reads the main model's head and embedding: no copy of its own"
    assert resident_bytes(model) < 0.45 * resident_bytes(reference.model)


def test_logits_and_greedy_tokens_equal_the_dequantized_path(pair: tuple[LLM, LLM], seed: int) -> None:
    released, reference = pair
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 264, (40,), generator=g).tolist()
    assert rel(released.logits(ids), reference.logits(ids)) < 1e-5, f"seed {seed}"
    assert rel(released.mtp_logits(ids), reference.mtp_logits(ids)) < 1e-5, f"seed {seed}"
    prompts = [torch.randint(2, 264, (n,), generator=g).tolist() for n in (3, 17, 33)]
    plain = reference.with_speculative(None).generate(prompts, GREEDY)
    assert [o.token_ids for o in released.with_speculative(None).generate(prompts, GREEDY)] == \
        [o.token_ids for o in plain], f"seed {seed}"


@pytest.mark.parametrize("spec", [SpecConfig(num_speculative_tokens=3),
                                  SpecConfig(num_speculative_tokens=3, topk=2, num_draft_tokens=6)],
                         ids=["chain", "tree"])
def test_speculation_stays_lossless(pair: tuple[LLM, LLM], spec: SpecConfig, seed: int) -> None:
    released = pair[0]
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(2, 264, (n,), generator=g).tolist() for n in (5, 12, 30, 1)]
    want = released.with_speculative(None).generate(prompts, GREEDY)
    got = released.with_speculative(spec).generate(prompts, GREEDY)
    assert [o.token_ids for o in got] == [o.token_ids for o in want], f"seed {seed}"
    assert sum(o.metrics.num_accepted for o in got) > 0, "nothing was accepted: the test would prove nothing"


@pytest.mark.parametrize("dequantize", [False, True], ids=["released", "dequantized"])
def test_tensor_parallel_shards_may_cut_scale_blocks(ckpt: Path, pair: tuple[LLM, LLM], dequantize: bool) -> None:
    """At TP 2 q_b's 144 rows split into 72 (16-blocks cut at row 64): each rank keeps its part of the cut block and
    a copy of its scale (released), or slices after dequantizing; logits equal one rank's."""
    one = pair[dequantize]
    ids = list(range(5, 45))
    with LLM(ckpt, dtype="float32", speculative=None, tensor_parallel_size=2, dequantize_fp8=dequantize) as tp:
        assert rel(tp.logits(ids), one.logits(ids)) < 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("tp", [2, 4])
def test_the_bundled_model_at_tp(tp: int) -> None:
    """The bundled model's shares cut 128-blocks at TP 2 (the shared expert's 128 rows) and 4 (q_b's 768 rows)."""
    one = LLM(BUNDLED_MODEL, dtype="float32", speculative=None)
    ids = one.encode("import os\nimport sys\n\ndef main():\n")
    with LLM(BUNDLED_MODEL, dtype="float32", speculative=None, tensor_parallel_size=tp) as llm:
        assert rel(llm.logits(ids), one.logits(ids)) < 1e-5
        out = llm.generate([ids], GREEDY)[0].token_ids
    assert out == one.generate([ids], GREEDY)[0].token_ids


def test_the_bundled_model_resident_as_released() -> None:
    """Issue 22's memory target: at most 0.3x of the float32 path's resident bytes."""
    released = LLM(BUNDLED_MODEL, dtype="float32", speculative=None)
    reference = LLM(BUNDLED_MODEL, dtype="float32", speculative=None, dequantize_fp8=True)
    assert resident_bytes(released.model) <= 0.3 * resident_bytes(reference.model)
