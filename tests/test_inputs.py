"""Bad input through the Python API: each kind gets a ValueError naming what is wrong (or the right result), never a
raw torch error, silent garbage or a wrong type accepted. Also: non-finite logits, corrupt weights, the greedy
epsilon, generate([]), the position limit, mtp_logits at depth >= 1."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from models import agreeable_checkpoint, byte_bpe

from specdec import LLM, SamplingParams, SpecConfig
from specdec.engine import NonFiniteLogitsError
from specdec.model.loader import CheckpointError


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return agreeable_checkpoint(tmp_path_factory.mktemp("inputs"), seed=5)


@pytest.fixture(scope="module")
def llm(ckpt: Path) -> LLM:
    return LLM(ckpt, dtype="float32", speculative=SpecConfig(3))


@pytest.mark.parametrize("kwargs, field", [
    ({"max_tokens": True}, "max_tokens"), ({"max_tokens": 2.0}, "max_tokens"), ({"max_tokens": 0}, "max_tokens"),
    ({"temperature": float("nan")}, "temperature"), ({"temperature": float("inf")}, "temperature"),
    ({"temperature": "0.5"}, "temperature"), ({"top_p": float("nan")}, "top_p"), ({"top_k": 1.5}, "top_k"),
    ({"top_k": -2}, "top_k"), ({"seed": -1}, "seed"), ({"seed": 2**64}, "seed"), ({"seed": "1"}, "seed"),
    ({"seed": 1.0}, "seed"), ({"seed": True}, "seed"), ({"stop_token_ids": "15"}, "stop_token_ids"),
    ({"stop_token_ids": [1, -1]}, "stop_token_ids"), ({"stop_token_ids": [True]}, "stop_token_ids"),
    ({"stop": [""]}, "stop"), ({"stop": [3]}, "stop"), ({"ignore_eos": "no"}, "ignore_eos"),
    ({"ignore_eos": 1}, "ignore_eos"),
])
def test_sampling_params_check_types_and_ranges(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"SamplingParams.{field} must be"):
        SamplingParams(**kwargs)


def test_sampling_params_normalize() -> None:
    p = SamplingParams(stop="END", stop_token_ids=[3, 4], top_k=-1)
    assert p.stop == ("END",) and p.stop_token_ids == (3, 4) and p.top_k == 0
    assert SamplingParams(temperature=1e-40).greedy and SamplingParams(temperature=0).greedy
    assert not SamplingParams(temperature=1e-4).greedy


@pytest.mark.parametrize("kwargs, field", [
    ({"num_draft_tokens": 2.5}, "num_draft_tokens"), ({"num_draft_tokens": True}, "num_draft_tokens"),
    ({"num_speculative_tokens": 3.0}, "num_speculative_tokens"), ({"num_speculative_tokens": 10**6},
                                                                   "num_speculative_tokens"),
    ({"topk": 0}, "topk"), ({"relaxed_topk": -1}, "relaxed_topk"), ({"relaxed_topk": 0}, "relaxed_topk"),
    ({"relaxed_delta": float("nan")}, "relaxed_delta"), ({"acceptance": "lossy"}, "acceptance"),
])
def test_spec_config_checks_types_and_ranges(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=f"SpecConfig.{field} must be"):
        SpecConfig(**kwargs)


def test_draft_widths_beyond_the_vocabulary(ckpt: Path) -> None:
    with pytest.raises(ValueError, match="topk 300 exceeds the vocabulary"):
        LLM(ckpt, dtype="float32", speculative=SpecConfig(2, topk=300))
    with pytest.raises(ValueError, match="relaxed_topk 1000000 exceeds the vocabulary"):
        LLM(ckpt, dtype="float32", speculative=SpecConfig(2, acceptance="relaxed", relaxed_topk=10**6))


@pytest.mark.parametrize("kwargs, needle", [
    ({"device": "cuda"}, "no CUDA device"), ({"device": "cuda:3"}, "no CUDA device"),
    ({"device": "nonsense"}, "not a torch device"), ({"device": "meta"}, "cpu or cuda"),
    ({"seed": -3}, "seed"), ({"seed": "7"}, "seed"), ({"threads": 0}, "threads"), ({"threads": 1.5}, "threads"),
    ({"tensor_parallel_size": True}, "tensor_parallel_size"), ({"dtype": "int8"}, "dtype"),
    ({"speculative": 3}, "speculative must be a SpecConfig"),
])
def test_llm_arguments(ckpt: Path, kwargs: dict, needle: str) -> None:
    if "cuda" in str(kwargs.get("device", "")) and torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ValueError, match=needle):
        LLM(ckpt, **({"dtype": "float32"} | kwargs))


@pytest.mark.parametrize("prompts, needle", [
    ({"a": [1, 2]}, "list of strings or of token-id lists, got dict"),
    ("just one string", "got str"),
    ([1, 2, 3], r"wrap one token-id list in a list"),
    ([[1, True, 3]], "prompt 0: token 1 is True"),
    ([[1, 2], [3.0]], "prompt 1: token 0 is 3.0"),
    ([[1, 2], []], "prompt 1: expected a non-empty list"),
    ([[10_000]], "token id 10000"),
    ((p for p in [[1]]), "got generator"),
])
def test_bad_prompts(llm: LLM, prompts: object, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        llm.generate(prompts, SamplingParams(max_tokens=2))


def test_empty_batch_and_bad_params(llm: LLM) -> None:
    assert llm.generate([]) == [] and llm.generate(()) == []
    with pytest.raises(ValueError, match="params must be a SamplingParams"):
        llm.generate([[1, 2]], {"max_tokens": 3})
    with pytest.raises(ValueError, match="got 2 SamplingParams for 1 prompts"):
        llm.generate([[1, 2]], [SamplingParams(), SamplingParams()])


def test_text_prompts_must_be_valid_utf8(ckpt: Path, tmp_path: Path) -> None:
    path = agreeable_checkpoint(tmp_path / "tok", seed=5, vocab_size=300)
    byte_bpe(["some text to learn merges from"]).save(str(path / "tokenizer.json"))
    llm = LLM(path, dtype="float32", speculative=None)
    with pytest.raises(ValueError, match=r"prompt 1: not valid UTF-8 text \(character 2"):
        llm.generate(["fine", "ab\udcff"], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="prompt 0: the prompt is empty"):
        llm.generate([""], SamplingParams(max_tokens=2))
    (path / "tokenizer.json").write_text("garbage, not JSON")
    with pytest.raises(ValueError, match="tokenizer.json: not a valid tokenizer.json"):
        LLM(path, dtype="float32", speculative=None)


def test_tiny_temperatures_decode_greedily(llm: LLM) -> None:
    """1e-40 and 1e-50 (which underflows to 0 in float32) used to give NaN probabilities (token 0) or sample at
    temperature 1; below 1e-5 they are greedy now, chain and tree alike."""
    prompts = [[5, 9, 200], [17, 3]]
    greedy = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    tree = llm.with_speculative(SpecConfig(3, topk=2))
    for t in (1e-40, 1e-50, 1e-6):
        for x in (llm, tree):
            out = x.generate(prompts, SamplingParams(max_tokens=12, temperature=t, ignore_eos=True))
            assert [o.token_ids for o in out] == [g.token_ids for g in greedy], t


def test_position_limit(llm: LLM) -> None:
    limit = llm.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"exceed the context of {limit}"):
        llm.logits([1] * (limit + 1))
    with pytest.raises(ValueError, match=f"exceed the context of {limit}"):
        llm.mtp_logits([1] * (limit + 1))
    assert llm.logits([1] * 8).shape == (8, llm.config.vocab_size)


def test_non_finite_logits_name_the_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Finite weights whose logits overflow float32 (lm_head at 3e38, finite in BF16): an error naming the request,
    not token 0 with 'acceptance 100%'. Then only prompt 1's rows non-finite: the error names prompt 1."""
    from safetensors.torch import load_file, save_file

    path = agreeable_checkpoint(tmp_path / "big", seed=2)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    f = path / index["weight_map"]["lm_head.weight"]
    tensors = load_file(f)
    good = tensors["lm_head.weight"].clone()
    tensors["lm_head.weight"] = torch.full_like(good, 3e38)
    save_file(tensors, str(f), metadata={"format": "pt"})
    for spec in (None, SpecConfig(2)):
        with pytest.raises(NonFiniteLogitsError, match="prompt 0: the main model's logits are not finite"):
            LLM(path, dtype="float32", speculative=spec).generate([[1, 2], [3]], SamplingParams(max_tokens=4))
    tensors["lm_head.weight"] = good
    save_file(tensors, str(f), metadata={"format": "pt"})
    for spec in (None, SpecConfig(2)):
        llm = LLM(path, dtype="float32", speculative=spec)
        real = llm.model.logits

        def second_half_nan(hidden: torch.Tensor, real=real) -> torch.Tensor:  # rows grouped by request, 2 requests
            out = real(hidden)
            out[out.shape[0] // 2:, 5] = float("nan")
            return out

        monkeypatch.setattr(llm.model, "logits", second_half_nan)
        with pytest.raises(NonFiniteLogitsError, match="prompt 1: the main model's logits are not finite"):
            llm.generate([[1, 2], [3]], SamplingParams(max_tokens=4))
    assert issubclass(NonFiniteLogitsError, ValueError)


def test_nan_weights_are_refused_at_load(tmp_path: Path, seed: int) -> None:
    """Corrupted FP8 bytes (the e4m3fn NaN pattern) name the tensor and file at load."""
    fp8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [32, 32]}
    path = agreeable_checkpoint(tmp_path / "nan", seed=seed % 100, quantization_config=fp8)
    from safetensors.torch import load_file, save_file

    index = json.loads((path / "model.safetensors.index.json").read_text())
    name = "model.layers.1.self_attn.o_proj.weight"
    f = path / index["weight_map"][name]
    tensors = load_file(f)
    raw = tensors[name].view(torch.uint8).clone()
    raw.view(-1)[random.Random(seed).randrange(raw.numel())] = 0x7F
    tensors[name] = raw.view(torch.float8_e4m3fn)
    save_file(tensors, str(f), metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=f"{f.name}: tensor {name} holds NaN"):
        LLM(path, dtype="float32", speculative=None)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_scales_are_refused_at_load(tmp_path: Path, seed: int, bad: float) -> None:
    """An FP8 block scale that is NaN or infinite names the tensor and file at load, on the path that keeps the
    weights as released (the kernels never check scales per call) and on the dequantizing one."""
    fp8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [32, 32]}
    path = agreeable_checkpoint(tmp_path / "scale", seed=seed % 100, quantization_config=fp8)
    from safetensors.torch import load_file, save_file

    index = json.loads((path / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.experts.3.down_proj.weight_scale_inv"
    f = path / index["weight_map"][name]
    tensors = load_file(f)
    tensors[name].view(-1)[random.Random(seed).randrange(tensors[name].numel())] = bad
    save_file(tensors, str(f), metadata={"format": "pt"})
    for dequantize in (False, True):
        with pytest.raises(CheckpointError, match=f"{f.name}: tensor {name} holds NaN or infinite"):
            LLM(path, dtype="float32", speculative=None, dequantize_fp8=dequantize)


def test_mtp_logits_at_depth_one_chain_the_layers(tmp_path: Path, seed: int) -> None:
    """A 2-MTP-layer checkpoint: depth=1 runs layer 0 then layer 1 teacher-forced (it used to index a one-layer
    cache). Row i of depth 1 depends on tokens up to i+2 only, and differs from depth 0's next row."""
    path = agreeable_checkpoint(tmp_path / "mtp2", seed=seed % 100, num_nextn_predict_layers=2)
    llm = LLM(path, dtype="float32", speculative=SpecConfig(3))
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, 256, (12,), generator=g).tolist()
    d0, d1 = llm.mtp_logits(ids, depth=0), llm.mtp_logits(ids, depth=1)
    assert d0.shape == (11, 256) and d1.shape == (10, 256) and torch.isfinite(d1).all()
    prefix = llm.mtp_logits(ids[:7], depth=1)  # causal: rows 0..4 see tokens 0..6 only
    assert (prefix - d1[:5]).norm() / d1[:5].norm() < 1e-5, f"seed={seed}"
    assert not torch.allclose(d1, d0[1:]), "layer 1 must change the logits"
    with pytest.raises(ValueError, match="depth=2: the checkpoint has 2 MTP layer"):
        llm.mtp_logits(ids, depth=2)


def test_with_speculative_honours_the_seed(llm: LLM) -> None:
    p = SamplingParams(max_tokens=20, temperature=1.0)
    same = llm.with_speculative(llm.speculative)
    other = llm.with_speculative(llm.speculative, seed=12345)
    assert same is llm and other is not llm and other.seed == 12345
    a, b = llm.generate([[4, 5]], p)[0].token_ids, other.generate([[4, 5]], p)[0].token_ids
    assert a != b, "a different engine seed gives different default request seeds"
    again = llm.with_speculative(llm.speculative, 12345)  # a fresh engine with that seed draws the same
    assert again.generate([[4, 5]], p)[0].token_ids == b


def test_no_mtp_checkpoint_error_speaks_to_both_interfaces(tmp_path: Path) -> None:
    path = agreeable_checkpoint(tmp_path / "nomtp", num_nextn_predict_layers=0)
    with pytest.raises(ValueError, match="no MTP layer .* decode without speculation"):
        LLM(path, dtype="float32")
    assert LLM(path, dtype="float32", speculative=None).generate([[1]], SamplingParams(max_tokens=2))


def test_kv_pool_error_names_no_missing_option() -> None:
    from specdec.model.cache import KVPoolError, LatentCache

    with pytest.raises(KVPoolError) as e:
        LatentCache(1, 2**40, 1024, torch.float32, torch.device("cpu"))
    assert "max_model_len" not in str(e.value) and "fewer or shorter requests" in str(e.value)


@pytest.mark.parametrize("model", [123, ["ckpt"], b"/path"])
def test_model_must_be_a_path(model: object) -> None:
    with pytest.raises(ValueError, match=f"model must be a checkpoint directory .* got {type(model).__name__}"):
        LLM(model)


def test_with_speculative_checks_its_argument(llm: LLM) -> None:
    with pytest.raises(ValueError, match="speculative must be a SpecConfig or None, got dict"):
        llm.with_speculative({"num_speculative_tokens": 2})


def test_threads_beyond_the_cores_are_capped(ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("specdec.api.usable_cores", lambda: 1)
    with pytest.warns(UserWarning, match="threads=1000 exceeds the 1 CPU cores this process may use; using 1"):
        llm = LLM(ckpt, dtype="float32", speculative=None, threads=1000)
    assert llm.threads == 1 and torch.get_num_threads() == 1


def test_relaxed_acceptance_refuses_sampled_requests(llm: LLM) -> None:
    """Relaxed acceptance is defined for greedy rows only (verify.py): a sampled request would silently get exact
    acceptance, so the engine refuses it, naming the request; greedy requests run."""
    relaxed = llm.with_speculative(SpecConfig(3, acceptance="relaxed"))
    with pytest.raises(ValueError, match="prompt 1: relaxed acceptance applies to greedy decoding only .* 0.7"):
        relaxed.generate([[4, 5], [6, 7]], [SamplingParams(temperature=0), SamplingParams(temperature=0.7)])
    assert relaxed.generate([[4, 5]], SamplingParams(max_tokens=4, temperature=0))[0].finish_reason == "length"
