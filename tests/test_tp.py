"""Tensor/expert parallelism on CPU (gloo): N ranks give one rank's logits and tokens, each rank loads only its
slices, bad splits fail before any process starts, and a dead worker is an error, never a hang.

The spawned groups (2 and 3 ranks, this process as rank 0) are module fixtures shared by the tests; the last test of
each group stops it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from models import agreeable_checkpoint
from tp_torchrun import CHAIN, GREEDY, PROMPTS, SAMPLED

from specdec import LLM, SamplingParams, SpecConfig
from specdec.draft_policy import DraftPolicy
from specdec.engine_config import EngineConfig
from specdec.kernels.backend import Backend
from specdec.model.checkpoint import tiny_config
from specdec.model.config import ModelConfig
from specdec.model.loader import Checkpoint, load_model
from specdec.model.parallel import DistInfo, get_dist
from specdec.model.plan import rank_shapes, weight_bytes_per_rank
from specdec.model.transformer import DeepseekV3

# divisible by 2 and 3: 6 heads, 6 experts, vocab 264, MLP widths on 8-blocks
SHAPE = dict(vocab_size=264, num_attention_heads=6, num_key_value_heads=6, n_routed_experts=6,
             moe_intermediate_size=48)
FP8 = lambda block: {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                     "weight_block_size": [block, block]}
TREE = SpecConfig(num_speculative_tokens=3, topk=2)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return agreeable_checkpoint(tmp_path_factory.mktemp("tp"), seed=0, noise=0.14, **SHAPE)


@pytest.fixture(scope="module")
def single(ckpt: Path) -> LLM:
    return LLM(ckpt, dtype="float32", speculative=TREE)


@pytest.fixture(scope="module", params=[2, 3], ids=["tp2", "tp3"])
def tp(request: pytest.FixtureRequest, ckpt: Path):
    llm = LLM(ckpt, dtype="float32", speculative=TREE, tensor_parallel_size=request.param)
    yield llm
    procs = list(llm.tp.driver.procs)
    llm.close()  # a clean close: every worker exits 0 and this process leaves the group
    assert [p.exitcode for p in procs] == [0] * len(procs)
    assert get_dist() == DistInfo() and not dist.is_initialized()
    llm.close()


# -- in process: sharded loading and bad splits (no group needed: building and loading use no collective) ------


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("quant", [None, FP8(8)], ids=["bf16", "fp8"])
def test_each_rank_reads_only_its_slices(make_checkpoint, monkeypatch: pytest.MonkeyPatch, world: int,
                                         quant: dict | None) -> None:
    """Every rank reads exactly the bytes `specdec inspect` counts for one rank, and its parameters are its slice
    of the one-rank model's (FP8 weights and their block scales included)."""
    ck = make_checkpoint(quantization_config=quant, **SHAPE) if quant else make_checkpoint(**SHAPE)
    full = load_model(ck, dtype=torch.float32, keep_fp8=True, progress=False).state_dict()
    cfg = Checkpoint(ck).config
    expect = weight_bytes_per_rank(cfg, world)
    read = Checkpoint.read
    for rank in range(world):
        nbytes = []

        def counting(self, *args, nbytes=nbytes, **kwargs):
            t = read(self, *args, **kwargs)
            nbytes.append(t.numel() * t.element_size())
            return t

        monkeypatch.setattr(Checkpoint, "read", counting)
        part = load_model(ck, dtype=torch.float32, keep_fp8=True, dist=DistInfo(rank, world), progress=False)
        monkeypatch.setattr(Checkpoint, "read", read)
        assert sum(nbytes) == expect, (rank, sum(nbytes), expect)
        for name, p in part.state_dict().items():
            q = full[name]
            split = [d for d in range(q.dim()) if p.shape[d] != q.shape[d]]
            if split:
                (d,), k = split, p.shape[split[0]]
                assert q.shape[d] == world * k, name
                q = q.narrow(d, rank * k, k)
            same = torch.equal(p.view(torch.uint8), q.view(torch.uint8)) if p.dtype == torch.float8_e4m3fn \
                else torch.equal(p, q)
            assert same, (rank, name)


@pytest.mark.parametrize("overrides,world,match", [
    (dict(vocab_size=264), 3, "num_attention_heads: 4 does not divide evenly over tensor_parallel_size=3"),
    (dict(SHAPE, n_routed_experts=8), 3, "n_routed_experts .*8 does not divide evenly"),
    (dict(SHAPE, vocab_size=256), 3, r"embed_tokens \(vocab_size\): 256 does not divide"),
    (dict(SHAPE, quantization_config=FP8(16)), 2, "q_b_proj: a 2-way split of 144 into parts of 72 cuts FP8 16-blocks"),
    (dict(SHAPE, quantization_config=FP8(32)), 3, "cuts FP8 32-blocks"),
], ids=["heads", "experts", "vocab", "fp8-block", "fp8-block-3"])
def test_bad_splits_raise_clearly(overrides: dict, world: int, match: str) -> None:
    """Uneven splits never build; a share that cuts an FP8 scale block builds only where its kernels read partial
    blocks: the torch backend (weights dequantized at load, or kept for cpu_ops), not the GPU W8A8 kernels."""
    cfg = ModelConfig.from_dict(tiny_config(**overrides))
    cuts = "cuts FP8" in match
    for rank in range(world):  # every rank refuses alike (rank 0's share always starts on a block boundary)
        with torch.device("meta"), pytest.raises(ValueError, match=match):
            DeepseekV3(cfg, backend=Backend("triton"), keep_fp8=cuts, dist=DistInfo(rank, world))
        if cuts:
            with torch.device("meta"):
                for backend, keep in ((Backend("torch"), False), (Backend("torch", cpu_kernels=True), True)):
                    DeepseekV3(cfg, backend=backend, keep_fp8=keep, dist=DistInfo(rank, world))


@pytest.mark.parametrize("rank", [0, 15])
def test_the_release_over_two_nodes_of_8_gpus(rank: int) -> None:
    """DeepSeek-V3 at TP 16, the plan `specdec inspect --tp 16` reports (model/plan.py): each rank holds 8 of the
    128 attention heads, 16 of the 256 routed experts of each MoE layer (expert parallel over 16), and a 16th of the
    vocabulary."""
    cfg = ModelConfig.from_file(Path(__file__).parent / "data" / "deepseek-v3-config.json")
    shapes = rank_shapes(cfg, 16, rank)
    attn = "model.layers.3.self_attn."
    assert shapes[attn + "q_b_proj.weight"][0] == 8 * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    assert shapes[attn + "kv_b_proj.weight"][0] == 8 * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    assert shapes[attn + "o_proj.weight"][1] == 8 * cfg.v_head_dim
    experts = {int(name.split(".")[5]) for name in shapes if name.startswith("model.layers.3.mlp.experts.")}
    assert experts == set(range(16 * rank, 16 * rank + 16))
    assert shapes["model.embed_tokens.weight"][0] * 16 == cfg.vocab_size


def test_configs_differ_by_field_not_by_gpu_index(tmp_path: Path) -> None:
    """What a torchrun rank compares with rank 0's config at start (launcher.Group.agree): every field, the device's
    type but not its index (each rank takes its own GPU)."""
    a = EngineConfig(tmp_path, device="cpu", max_num_seqs=32)
    assert a.differences(EngineConfig(tmp_path, device="cpu", max_num_seqs=32)) == []
    assert a.differences(EngineConfig(tmp_path, device="cpu", max_num_seqs=64, speculative=None)) == [
        "speculative=SpecConfig(num_speculative_tokens=3, topk=1, num_draft_tokens=None, acceptance='exact', "
        "relaxed_topk=3, relaxed_delta=0.5, adaptive=True) vs None", "max_num_seqs=32 vs 64"]
    if torch.cuda.is_available():
        assert EngineConfig(tmp_path, device="cuda:0").differences(EngineConfig(tmp_path, device="cuda")) == []


def test_llm_refuses_a_bad_split_before_starting_workers(make_checkpoint) -> None:
    import multiprocessing as mp

    ck = make_checkpoint(vocab_size=264, num_shards=1)  # 4 heads
    with pytest.raises(ValueError, match="num_attention_heads: 4 does not divide evenly over tensor_parallel"):
        LLM(ck, dtype="float32", tensor_parallel_size=3)
    assert not mp.active_children() and get_dist() == DistInfo() and not dist.is_initialized()


# -- spawned groups: this process is rank 0 ----------------------------------------------------------------------


def test_logits_equal_one_rank(tp: LLM, single: LLM) -> None:
    ids = PROMPTS[0] + PROMPTS[2]
    assert rel_err(tp.logits(ids), single.logits(ids)) < 1e-5
    assert rel_err(tp.mtp_logits(ids), single.mtp_logits(ids)) < 1e-5


def test_greedy_tree_speculation_equals_one_rank(tp: LLM, single: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    """Adaptive speculation (on) decides on rank 0 and ships its choices in the plans. Its timing-driven choice is
    pinned here (this process is rank 0), so that N ranks and one see the same: some steps plain (the MTP rows
    then catch up), the others gated at a floor (ragged trees); N ranks then draft, verify and accept what one does
    (a rank drafting from its own choice would desynchronize the group or change the acceptance)."""
    monkeypatch.setattr(DraftPolicy, "_choose",
                        lambda self, b, step: (0, None, 0.0) if step % 3 == 1 else (self.shape.k, 0.3, 0.5))
    for x in (tp, single):
        x.engine.policy = DraftPolicy(x.engine.shape, adaptive=True)  # fresh calibration and step counts
    out, ref = tp.generate(PROMPTS, GREEDY), single.generate(PROMPTS, GREEDY)
    assert [o.token_ids for o in out] == [r.token_ids for r in ref]
    for field in ("num_steps", "num_drafted", "num_accepted", "drafted_per_position"):
        assert [getattr(o.metrics, field) for o in out] == [getattr(r.metrics, field) for r in ref], field
    assert 0 < sum(o.metrics.num_accepted for o in out) < sum(o.metrics.num_drafted for o in out)
    budget = TREE.budget
    assert sum(o.metrics.num_drafted for o in out) < sum(o.metrics.num_decode_steps for o in out) * budget


def test_seeded_sampling_equals_one_rank(tp: LLM, single: LLM) -> None:
    out, ref = tp.generate(PROMPTS, SAMPLED), single.generate(PROMPTS, SAMPLED)
    assert [o.token_ids for o in out] == [r.token_ids for r in ref]


def test_penalties_and_logprobs_equal_one_rank(tp: LLM, single: LLM) -> None:
    """Every rank penalizes from its own copy of the requests; rank 0's logprobs are the single rank's."""
    params = SamplingParams(max_tokens=12, temperature=0.8, seed=5, ignore_eos=True, presence_penalty=1.0,
                            repetition_penalty=1.3, logprobs=2)
    out, ref = tp.generate(PROMPTS, params), single.generate(PROMPTS, params)
    assert [o.token_ids for o in out] == [r.token_ids for r in ref]
    for o, r in zip(out, ref):
        assert list(map(list, o.logprobs)) == list(map(list, r.logprobs))
        assert [v for d in o.logprobs for v in d.values()] == pytest.approx(
            [v for d in r.logprobs for v in d.values()], abs=1e-4)


def test_stream_errors_and_early_close_keep_the_group_in_step(tp: LLM, single: LLM) -> None:
    want = single.generate([PROMPTS[0]], GREEDY)[0].token_ids
    assert list(tp.stream(PROMPTS[0], GREEDY)) == want
    steps = list(tp.stream_steps(PROMPTS[0], GREEDY))
    assert [t for s in steps for t in s.token_ids] == want and steps[-1].metrics.num_generated == len(want)
    with pytest.raises(ValueError, match="outside the vocabulary"):  # every rank rejects it; the group carries on
        tp.generate([[1000]], GREEDY)
    it = tp.stream(PROMPTS[0], GREEDY)
    assert next(it) == want[0]
    del it  # abandoned midway: rank 0 aborts its request; the worker drops its rows with the next plan
    assert tp.generate([PROMPTS[0]], GREEDY)[0].token_ids == want
    with pytest.raises(ValueError, match="already drives"):
        LLM(tp.path, dtype="float32", tensor_parallel_size=2)


# -- torchrun: every rank builds the LLM and makes the same calls ------------------------------------------------


def test_torchrun_chain_equals_one_rank(ckpt: Path, tmp_path: Path) -> None:
    """Under torchrun rank 0 makes the calls and rank 1 follows its plans: the same tokens, acceptance and logits
    as one rank, and every draft identical on both ranks."""
    ranks = torchrun(ckpt, tmp_path, ["--standalone", "--nproc-per-node", "2"])
    assert_equals_one_rank(ranks[0], LLM(ckpt, dtype="float32", speculative=CHAIN))


def assert_equals_one_rank(rank0: dict, one: LLM) -> None:
    """tests/tp_torchrun.py's rank 0 output equals one rank's: greedy tokens and acceptance, seeded samples, logits."""
    greedy = one.generate(PROMPTS, GREEDY)
    assert rank0["greedy"] == [o.token_ids for o in greedy]
    assert rank0["accepted"] == [o.metrics.accepted_per_position for o in greedy]
    assert rank0["sampled"] == [o.token_ids for o in one.generate(PROMPTS, SAMPLED)]
    assert rel_err(torch.tensor(rank0["logits"]), one.logits(PROMPTS[0])) < 1e-5


def torchrun(ckpt: Path, out: Path, launch: list[str], nodes: int = 1, timeout: float = 180) -> list[dict]:
    """tests/tp_torchrun.py on ckpt under `nodes` torchrun launches on this host (--node-rank 0.. of one group when
    nodes > 1; `launch`: the rest of each launch line); every rank's output, checked: each rank drafted as the
    others did."""
    script = Path(__file__).with_name("tp_torchrun.py")
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    runs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *launch,
                              *(["--node-rank", str(n)] if nodes > 1 else []), str(script), str(ckpt), str(out)],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in range(nodes)]
    for run in runs:
        _, err = run.communicate(timeout=timeout)
        assert run.returncode == 0, err[-3000:]
    ranks = [json.loads(p.read_text()) for p in sorted(out.glob("rank*.json"), key=lambda p: int(p.stem[4:]))]
    assert all(r["drafts_same"] and all(r["drafts_same"]) for r in ranks)
    assert len({len(r["drafts_same"]) for r in ranks}) == 1, "every rank drafted in every step"
    return ranks
