"""Backend choice and the Triton backend end to end: LLM(backend="triton") against backend="torch"."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _interp import DEVICE, rel

from specdec import LLM
from specdec.kernels.attn_meta import AttnMeta
from specdec.kernels.backend import Backend
from specdec.kernels.fp8 import weight_quant_ref
from specdec.model.cache import LatentCache
from specdec.model.checkpoint import tiny_config, write_random_checkpoint

FP8_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [32, 32]}


def test_resolve(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert Backend.resolve("auto", cpu).name == "torch"
    assert Backend.resolve("torch", cpu) == Backend("torch", cpu_kernels=True), "weights as released on a CPU"
    assert Backend.resolve("torch", cpu, dequantize=True) == Backend("torch"), "the reference path"
    assert Backend.resolve("torch", cpu).keep_fp8 and not Backend("torch").keep_fp8
    with pytest.raises(ValueError, match="choose one of"):
        Backend.resolve("cuda", cpu)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        Backend.resolve("flashinfer", cpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert Backend.resolve("triton", cpu).name == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        Backend.resolve("triton", cpu)


def test_backend_choice_reaches_every_layer(tmp_path: Path) -> None:
    """The backend resolved once is the one every Linear, MLA and MoE of the built model calls (no layer keeps a
    default of its own)."""
    from specdec.model.checkpoint import write_random_checkpoint
    from specdec.model.layers import Linear
    from specdec.model.mla import MLA
    from specdec.model.moe import MoE

    llm = LLM(write_random_checkpoint(tmp_path / "c"), dtype="float32", device="cpu", speculative=None)
    mods = [m for m in llm.model.modules() if isinstance(m, (Linear, MLA, MoE))]
    assert mods and all(m.backend is llm.backend for m in mods)


def test_import_specdec_does_not_import_triton() -> None:
    """So TRITON_INTERPRET may be set any time before the first kernel launch (see kernels/triton_util.py)."""
    code = "import sys, specdec; sys.exit(any(m.split('.')[0] == 'triton' for m in sys.modules))"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.interpreter
def test_fp8_linear_w8a8(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 96, generator=g).to(DEVICE)
    w, s = weight_quant_ref(torch.randn(40, 96, generator=g).to(DEVICE), 32, 32)
    y = Backend("triton").fp8_linear(x, w, s, (32, 32))
    assert y.shape == (2, 3, 40) and y.dtype == x.dtype
    assert rel(y, Backend("torch").fp8_linear(x, w, s, (32, 32))) < 5e-2, f"seed {seed}"  # activation quantization


def _checkpoint(tmp_path: Path, seed: int, fp8: bool) -> Path:
    cfg = tiny_config(quantization_config=FP8_CONFIG) if fp8 else tiny_config()
    return write_random_checkpoint(tmp_path / "ckpt", cfg, seed=seed, num_shards=1)


def _llm(path: Path, backend: str) -> LLM:
    # absorbed: the latent-cache attention kernel runs even for a prefill
    return LLM(path, dtype="float32", device=DEVICE, backend=backend, mla_mode="absorbed", speculative=None)


@pytest.mark.interpreter
@pytest.mark.parametrize("fp8,tol", [(False, 1e-4), (True, 3e-2)])
def test_llm_triton_logits_equal_torch(tmp_path: Path, seed: int, fp8: bool, tol: float) -> None:
    """BF16 checkpoint: the same math. FP8: the Triton backend keeps the weights FP8 and runs W8A8, the torch one
    dequantizes them, so they differ by activation-quantization error."""
    path = _checkpoint(tmp_path, seed, fp8)
    ids = torch.randint(0, 256, (12,), generator=torch.Generator().manual_seed(seed)).tolist()
    want = _llm(path, "torch").logits(ids)
    got = _llm(path, "triton").logits(ids)
    assert rel(got, want) < tol, f"seed {seed}"
    assert got.argmax(-1).eq(want.argmax(-1)).float().mean() > (0.99 if not fp8 else 0.8), f"seed {seed}"


@pytest.mark.interpreter
def test_model_prefill_then_tree_step(tmp_path: Path, seed: int) -> None:
    """A cached prefix plus a token tree (the verification step), through every layer, both backends."""
    g = torch.Generator().manual_seed(seed)
    path = _checkpoint(tmp_path, seed, fp8=False)
    prompt, nodes = torch.randint(0, 256, (9,), generator=g), torch.randint(0, 256, (5,), generator=g)
    tree = torch.tensor([[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0], [1, 1, 0, 1, 0], [1, 0, 1, 0, 1]],
                        dtype=torch.bool)  # root, two children, one grandchild under each
    depth = torch.tensor([0, 1, 1, 2, 2])
    slots = torch.randperm(20, generator=g)[None].to(DEVICE)
    out = []
    for backend in ("torch", "triton"):
        llm = _llm(path, backend)
        cache = LatentCache(llm.config.num_hidden_layers, 20, llm.config.kv_cache_dim, torch.float32, DEVICE)
        meta = AttnMeta.build(slots, [0], [9])  # causal
        with torch.inference_mode():
            llm.model(prompt.to(DEVICE), torch.arange(9, device=DEVICE), meta, cache)
            meta = AttnMeta.build(slots, [9], [5], tree.to(DEVICE))
            out.append(llm.model(nodes.to(DEVICE), (9 + depth).to(DEVICE), meta, cache))
    assert rel(out[1], out[0]) < 1e-4, f"seed {seed}"


@pytest.mark.interpreter
def test_generate_greedy_same_tokens(tmp_path: Path, seed: int) -> None:
    from specdec import SamplingParams

    path = _checkpoint(tmp_path, seed, fp8=False)
    prompt = torch.randint(0, 256, (6,), generator=torch.Generator().manual_seed(seed)).tolist()
    params = SamplingParams(temperature=0.0, max_tokens=6)
    outs = [LLM(path, dtype="float32", device=DEVICE, backend=b).generate([prompt], params)[0] for b in
            ("torch", "triton")]
    assert outs[0].token_ids == outs[1].token_ids, f"seed {seed}"
