"""fp32 logits and MTP logits equal transformers' DeepseekV3ForCausalLM / MtpModel on random tiny checkpoints.

Run with -s to see the measured relative errors per config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from oracle import hf_logits, hf_models, hf_mtp_logits

from specdec import LLM
from specdec.kernels.attn_meta import AttnMeta
from specdec.kernels.backend import Backend
from specdec.model.cache import LatentCache
from specdec.model.checkpoint import tiny_config
from specdec.model.loader import load_model
from specdec.model.mla import MLA

TOL = 1e-4
FP8_32 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [32, 32]}


def _rope_parameters_config() -> dict[str, Any]:
    """The newer spelling: rope_theta inside `rope_parameters`, no rope_scaling / top-level rope_theta."""
    cfg = tiny_config(q_lora_rank=None, qk_rope_head_dim=4, n_group=1, topk_group=1)
    del cfg["rope_scaling"], cfg["rope_theta"]
    cfg["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 5000.0, "factor": 2.0, "beta_fast": 16,
                              "beta_slow": 2, "mscale": 0.707, "mscale_all_dim": 0.0,
                              "original_max_position_embeddings": 16}
    return cfg


YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 0.8}

# name -> (config.json, prompt length); prompts of 40 run past original_max_position_embeddings = 16
CONFIGS: dict[str, tuple[dict[str, Any], int]] = {
    "q_lora+groups2/1+dense1": (tiny_config(), 12),
    "no_q_lora+v24!=nope16+all_moe": (
        tiny_config(q_lora_rank=None, v_head_dim=24, n_group=1, topk_group=1, first_k_dense_replace=0,
                    num_experts_per_tok=3), 12),
    "yarn+groups4/2+dense2": (
        tiny_config(rope_scaling=YARN, n_group=4, topk_group=2, first_k_dense_replace=2, num_hidden_layers=3), 40),
    "rope_parameters+yarn": (_rope_parameters_config(), 40),
    "fp8_32x32+yarn": (tiny_config(quantization_config=FP8_32, moe_intermediate_size=48, rope_scaling=YARN), 40),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


NEAR_TIE = 1e-5  # a router margin below this may pick other experts than the oracle, by rounding alone


def decided_rows(ckpt: Path, ids: list[int]) -> int:
    """How many leading positions every MoE router decides by a margin of at least NEAR_TIE (the k-th
    against the (k+1)-th biased score, and the kept groups against the next): a random checkpoint sometimes holds a
    near tie, which 1e-7 of rounding flips to another expert, and that position's row (and every later one, through
    the cache) then differs by ~1e-2 from the oracle's for a reason that is not a defect. Measured on the reference
    path (plain torch, where the router is a module whose hooks run)."""
    llm = LLM(ckpt, dtype="float32", speculative=None, dequantize_fp8=True)
    margins: list[torch.Tensor] = []

    def hook(gate: torch.nn.Module, inp: tuple[torch.Tensor], _: object) -> None:
        c, x = gate.cfg, inp[0]
        scores = (x.float() @ gate.weight.t()).sigmoid() + gate.e_score_correction_bias
        top = scores.topk(c.num_experts_per_tok + 1, -1).values
        gap = top[:, -2] - top[:, -1]
        if 1 < c.n_group:
            groups = scores.view(x.shape[0], c.n_group, -1).topk(2, -1).values.sum(-1).sort(-1, descending=True)[0]
            gap = torch.minimum(gap, groups[:, c.topk_group - 1] - groups[:, min(c.topk_group, c.n_group - 1)] +
                                (9.0 if c.topk_group == c.n_group else 0.0))
        margins.append(gap)

    gates = [layer.mlp.gate for layer in llm.model.model.layers if hasattr(layer.mlp, "gate")]
    handles = [g.register_forward_hook(hook) for g in gates]
    try:
        llm.logits(ids)
    finally:
        for h in handles:
            h.remove()
    tied = (torch.stack(margins).min(0).values < NEAR_TIE).nonzero()
    return int(tied[0]) if len(tied) else len(ids)


def full_hidden(model, ids: list[int]) -> torch.Tensor:
    """[T, D]: one prefill over ids in a fresh cache at contiguous slots (the reference)."""
    t = len(ids)
    cache = LatentCache(model.cfg.num_hidden_layers, t, model.cfg.kv_cache_dim, torch.float32, torch.device("cpu"))
    with torch.inference_mode():
        meta = AttnMeta.build(torch.arange(t)[None], [0], [t])  # causal from scratch: MLA's fresh path
        return model(torch.tensor(ids), torch.arange(t), meta, cache)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_and_mtp_match_transformers(name: str, make_checkpoint, tmp_path: Path, seed: int) -> None:
    config, n = CONFIGS[name]
    ckpt = make_checkpoint(config)
    hf_main, hf_mtp = hf_models(ckpt, tmp_path / "hf")  # weights dequantized by the oracle, not by us
    llm = LLM(ckpt, dtype="float32", device="cpu", backend="torch")
    g = torch.Generator().manual_seed(seed)
    for _ in range(8):  # a prompt whose every routing decision is clear of a near tie (see decided_rows)
        ids = torch.randint(0, config["vocab_size"], (n,), generator=g).tolist()
        k = decided_rows(ckpt, ids)
        if k == n:
            break
    assert k >= n // 2, f"{name} seed={seed}: every prompt tried holds a router near tie early"
    ref = hf_logits(hf_main, ids)[:k]
    err = rel_err(llm.logits(ids)[:k], ref)
    ref_mtp = hf_mtp_logits(hf_main, hf_mtp, ids)[:k - 1]
    err_mtp = rel_err(llm.mtp_logits(ids, depth=0)[:k - 1], ref_mtp)
    print(f"\n[{name}] T={n} seed={seed}: logits rel err {err:.2e}, MTP logits rel err {err_mtp:.2e}"
          f"{f' (first {k} rows: a router near tie after)' if k < n else ''}")
    assert err < TOL, f"{name} seed={seed}: logits rel err {err:.2e}"
    assert err_mtp < TOL, f"{name} seed={seed}: MTP logits rel err {err_mtp:.2e}"


def test_fp8_weights_kept_fp8_match_transformers(make_checkpoint, tmp_path: Path, seed: int) -> None:
    """keep_fp8=True: FP8 weights + block scales at run time (partial edge blocks: 40 = kv_lora_rank + rope,
    48 = q_lora_rank and moe_intermediate_size with 32x32 blocks), dequantized inside the linear / MoE."""
    config = tiny_config(quantization_config=FP8_32, moe_intermediate_size=48)
    ckpt = make_checkpoint(config)
    hf_main, _ = hf_models(ckpt, tmp_path / "hf")
    model = load_model(ckpt, dtype=torch.float32, backend=Backend("torch"), keep_fp8=True, progress=False)
    assert model.model.layers[0].self_attn.kv_a_proj_with_mqa.weight.dtype == torch.float8_e4m3fn
    ids = torch.randint(0, config["vocab_size"], (10,), generator=torch.Generator().manual_seed(seed)).tolist()
    with torch.inference_mode():
        logits = model.logits(full_hidden(model, ids))
    err = rel_err(logits, hf_logits(hf_main, ids))
    print(f"\n[fp8 kept] seed={seed}: logits rel err {err:.2e}")
    assert err < TOL, f"seed={seed}: rel err {err:.2e}"


# --- the latent cache: naive == absorbed MLA, cached steps at shuffled slots == the full forward ---------------

CACHE_TOL = 1e-5


class Paged:
    """Sequences whose tokens live at shuffled, non-contiguous slots of one LatentCache."""

    def __init__(self, model, n_seqs: int, max_len: int, g: torch.Generator):
        cfg = model.cfg
        n_slots = 2 * n_seqs * max_len  # half the slots stay unused, so neighbours are rarely contiguous
        self.model = model
        self.cache = LatentCache(cfg.num_hidden_layers, n_slots, cfg.kv_cache_dim, torch.float32, torch.device("cpu"))
        self.table = torch.randperm(n_slots, generator=g)[: n_seqs * max_len].view(n_seqs, max_len)
        self.tokens: list[list[int]] = [[] for _ in range(n_seqs)]

    def step(self, new: dict[int, list[int]], tree_mask: torch.Tensor | None = None,
             depths: list[int] | None = None, commit: bool = True) -> dict[int, torch.Tensor]:
        """One forward of several sequences' new tokens; returns each sequence's hidden rows [n_b, D].

        Default: a causal chain per sequence appended after its cached tokens (commit=True keeps them)."""
        seqs = list(new)
        n_new = [len(new[b]) for b in seqs]
        ctx = [len(self.tokens[b]) for b in seqs]
        offs = depths if depths is not None else [j for n in n_new for j in range(n)]
        pos = torch.tensor(ctx).repeat_interleave(torch.tensor(n_new)) + torch.tensor(offs)
        ids = torch.tensor([t for b in seqs for t in new[b]])
        with torch.inference_mode():
            h = self.model(ids, pos, AttnMeta.build(self.table[seqs], ctx, n_new, tree_mask), self.cache)
        if commit:
            for b in seqs:
                self.tokens[b] += new[b]
        return dict(zip(seqs, h.split(n_new)))


def _check(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    err = rel_err(got, want)
    assert err < CACHE_TOL, f"{what}: rel err {err:.2e}"


@pytest.fixture
def models(make_checkpoint) -> dict[str, torch.nn.Module]:
    """naive; absorbed on the CPU layout (fused, pre-absorbed weights: MLA._absorbed_cpu, kernels/torch_backend.py);
    absorbed_ref on the checkpoint's layout (the reference path)."""
    ckpt = make_checkpoint(tiny_config(rope_scaling=YARN))
    out = {m: load_model(ckpt, dtype=torch.float32, mla_mode=m, progress=False) for m in ("naive", "absorbed")}
    out["absorbed_ref"] = load_model(ckpt, dtype=torch.float32, mla_mode="absorbed", progress=False,
                                     cpu_layout=False)
    assert out["absorbed"].model.layers[0].self_attn.w_q_abs is not None
    assert out["absorbed_ref"].model.layers[0].self_attn.w_q_abs is None
    return out


@pytest.mark.parametrize("mode, fresh, cached", [("naive", "causal", "naive"), ("absorbed", "absorbed", "cpu"),
                                                  ("absorbed_ref", "absorbed", "absorbed")])
def test_each_mode_runs_the_paths_it_was_built_with(models, mode: str, fresh: str, cached: str,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt from scratch runs the layer's fresh path and a step over cached rows its cached path (the tests
    below check that the paths agree), chosen from the AttnMeta's host fields alone."""
    ran: list[str] = []
    for name, method in (("causal", "_causal"), ("naive", "_naive"), ("absorbed", "_absorbed"),
                         ("cpu", "_absorbed_cpu")):
        real = getattr(MLA, method)
        monkeypatch.setattr(MLA, method, lambda self, *a, _real=real, _name=name: ran.append(_name) or _real(self, *a))
    kv = Paged(models[mode], n_seqs=1, max_len=8, g=torch.Generator().manual_seed(0))
    kv.step({0: [5, 6, 7]})
    n_layers = models[mode].cfg.num_hidden_layers
    assert ran == [fresh] * n_layers
    kv.step({0: [8]})
    assert ran[n_layers:] == [cached] * n_layers


def test_naive_equals_absorbed_on_prefill(models, seed: int) -> None:
    ids = torch.randint(0, 256, (20,), generator=torch.Generator().manual_seed(seed)).tolist()
    _check(full_hidden(models["absorbed"], ids), full_hidden(models["naive"], ids), f"seed={seed}")


@pytest.mark.parametrize("mode", ["naive", "absorbed", "absorbed_ref"])
def test_cached_steps_at_shuffled_slots_equal_full_forward(models, mode: str, seed: int) -> None:
    """Prefill, a one-token step, then a three-token chain step; a batch of three sequences of different
    lengths (one prefilling, one decoding, one chain) in one forward."""
    model, g = models[mode], torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(0, 256, (n,), generator=g).tolist()
    kv = Paged(model, n_seqs=3, max_len=24, g=g)
    out = kv.step({0: rand(7), 2: rand(4)})  # two prompts of different lengths in one prefill
    for b in (0, 2):
        _check(out[b], full_hidden(model, kv.tokens[b]), f"{mode} seed={seed} prefill seq {b}")
    out = kv.step({0: rand(1)})
    _check(out[0], full_hidden(model, kv.tokens[0])[-1:], f"{mode} seed={seed} one-token step")
    out = kv.step({0: rand(3)})
    _check(out[0], full_hidden(model, kv.tokens[0])[-3:], f"{mode} seed={seed} three-token step")
    out = kv.step({1: rand(5), 0: rand(1), 2: rand(3)})  # prefill + decode + chain, mixed in one batch
    for b, n in ((1, 5), (0, 1), (2, 3)):
        _check(out[b], full_hidden(model, kv.tokens[b])[-n:], f"{mode} seed={seed} mixed batch seq {b}")


@pytest.mark.parametrize("mode", ["naive", "absorbed", "absorbed_ref"])
def test_tree_step_equals_full_forward_of_each_path(models, mode: str, seed: int) -> None:
    """A token tree verified in one forward after a cached prefix: node i's output equals the full forward of
    prefix + (root -> ... -> node i), for a tree that is not a chain, batched with a plain decode step."""
    model, g = models[mode], torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(0, 256, (n,), generator=g).tolist()
    parents = [-1, 0, 0, 1, 2, 1, 3]  # topological order, root first
    depth = [0] * len(parents)
    anc = torch.eye(len(parents), dtype=torch.bool)
    for i, p in enumerate(parents):
        if p >= 0:
            anc[i] |= anc[p]
            depth[i] = depth[p] + 1
    kv = Paged(model, n_seqs=2, max_len=24, g=g)
    kv.step({0: rand(9), 1: rand(5)})
    nodes, dec = rand(len(parents)), rand(1)
    mask = torch.zeros(len(parents) + 1, len(parents), dtype=torch.bool)
    mask[: len(parents)] = anc
    mask[-1, 0] = True  # the decode token sees itself only
    out = kv.step({0: nodes, 1: dec}, tree_mask=mask, depths=depth + [0], commit=False)
    for i in range(len(parents)):
        path = [j for j in range(len(parents)) if anc[i, j]]
        want = full_hidden(model, kv.tokens[0] + [nodes[j] for j in path])[-1]
        _check(out[0][i], want, f"{mode} seed={seed} tree node {i} (path {path})")
    _check(out[1], full_hidden(model, kv.tokens[1] + dec)[-1:], f"{mode} seed={seed} decode beside the tree")


@pytest.mark.parametrize("lens", [[6, 6, 6], [7, 2, 5], [1]])
def test_fused_causal_prefill_equals_naive(models, lens: list[int], seed: int) -> None:
    """MLA._causal (one fused causal attention per batch or sequence, used for fresh prompts and training) equals
    MLA._naive over the same latent rows written to a cache at contiguous slots."""
    attn = models["naive"].model.layers[1].self_attn
    cfg, g = attn.cfg, torch.Generator().manual_seed(seed)
    t = sum(lens)
    q_nope = torch.randn(t, attn.n_heads, cfg.qk_nope_head_dim, generator=g)
    q_pe = torch.randn(t, attn.n_heads, cfg.qk_rope_head_dim, generator=g)
    rows = torch.randn(t, cfg.kv_cache_dim, generator=g)
    meta = AttnMeta.contiguous(torch.tensor([0, *lens[:-1]]).cumsum(0), [0] * len(lens), lens)
    cache = torch.zeros(t, cfg.kv_cache_dim)
    cache[meta.slots] = rows
    with torch.inference_mode():
        _check(attn._causal(q_nope, q_pe, rows, meta), attn._naive(q_nope, q_pe, cache, meta), f"seed={seed} {lens}")


@pytest.mark.parametrize("q_lora", [48, None])
def test_cpu_layout_equals_the_checkpoint_layout(make_checkpoint, q_lora: int | None, seed: int) -> None:
    """Decode and tree steps, MTP forwards and logits on the CPU layout (fused projections, absorbed MLA weights,
    transposed expert/router/head storage) equal the checkpoint layout's, with and without q_lora."""
    ckpt = make_checkpoint(tiny_config(q_lora_rank=q_lora))
    fast, ref = (load_model(ckpt, dtype=torch.float32, progress=False, cpu_layout=c) for c in (True, False))
    g = torch.Generator().manual_seed(seed)
    rand = lambda n: torch.randint(0, 256, (n,), generator=g).tolist()
    kv = {m: Paged(model, n_seqs=2, max_len=24, g=torch.Generator().manual_seed(seed)) for m, model in
          (("fast", fast), ("ref", ref))}
    steps = [{0: rand(6), 1: rand(3)}, {0: rand(1), 1: rand(1)}, {0: rand(4)}, {1: rand(2), 0: rand(1)}]
    for i, new in enumerate(steps):
        out = {m: p.step(new) for m, p in kv.items()}
        for b in new:
            _check(out["fast"][b], out["ref"][b], f"seed={seed} step {i} seq {b}")
            with torch.inference_mode():
                _check(fast.logits(out["fast"][b]), ref.logits(out["ref"][b]), f"seed={seed} logits {i}")
    ids = torch.tensor(rand(7))
    h = torch.randn(7, fast.cfg.hidden_size, generator=g)
    with torch.inference_mode():
        outs = []
        for model in (fast, ref):
            cache = LatentCache(1, 16, model.cfg.kv_cache_dim, torch.float32, torch.device("cpu"))
            base = torch.zeros(1, dtype=torch.long)
            model.mtp_forward(0, ids[:5], h[:5], torch.arange(1, 6), AttnMeta.contiguous(base, [0], [5]), cache)
            outs.append(model.mtp_forward(0, ids[5:], h[5:], torch.arange(6, 8), AttnMeta.contiguous(base, [5], [2]),
                                          cache))
    _check(outs[0], outs[1], f"seed={seed} MTP decode")
