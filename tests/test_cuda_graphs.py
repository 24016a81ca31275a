"""CUDA graphs for the decode step (specdec/cuda_graphs.py), checked on the CPU where nothing is captured: the same
buckets, static buffers and padding run eagerly, each replay under the host-read guard. The padded path decodes
what the eager path decodes, token for token, for plain steps, k=3 chains (verify and draft steps), trees and
adaptive drafts (ragged verify batches), on the torch backend and on the Triton backend under the interpreter; a
padding row writes only the spare slot; a host read inside the region raises; graphs are the CUDA default, and
enforce_eager / --enforce-eager turn them off."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from _interp import DEVICE  # sets TRITON_INTERPRET=1 without a GPU

from specdec.api import LLM
from specdec.cli import main as cli_main
from specdec.cuda_graphs import Key, StepGraphs, capture_sizes, graphs_wanted
from specdec.engine import Engine
from specdec.host_reads import HostReadError
from specdec.kernels.attn_meta import AttnMeta
from specdec.kernels.backend import Backend
from specdec.model.cache import LatentCache
from specdec.model.loader import load_model
from specdec.model.transformer import DeepseekV3
from specdec.params import SamplingParams, SpecConfig

PROMPTS = [[0, 5, 9, 13, 21], [0, 7, 3], [0, 11, 12, 14, 15, 16, 40, 41]]
MAX_TOKENS = [10, 6, 3]  # three requests (bucket 4, one padding row), then two, then one
# the shapes as given at every step (adaptive speculation would draft fewer nodes where they would not pay)
CHAIN = SpecConfig(num_speculative_tokens=3, adaptive=False)
TREE = SpecConfig(num_speculative_tokens=3, topk=2, num_draft_tokens=5, adaptive=False)


def model_for(ckpt: Path, backend: str) -> DeepseekV3:
    """The model as a GPU holds it: the backend's own paths, no CPU layout."""
    b = Backend(backend)
    return load_model(ckpt, dtype=torch.float32, device=DEVICE, backend=b, keep_fp8=b.keep_fp8, progress=False,
                      cpu_layout=False)


def decode(model: DeepseekV3, spec: SpecConfig | None, graphs: bool,
           temperature: float = 0.0) -> tuple[list[list[int]], StepGraphs | None]:
    engine = Engine(model, spec, DEVICE, torch.float32, kv_cache_tokens=1024, max_num_seqs=8)
    if graphs:
        engine.runner.use_graphs(8)
    reqs = [engine.add(p, SamplingParams(max_tokens=m, temperature=temperature, seed=i, ignore_eos=True))
            for i, (p, m) in enumerate(zip(PROMPTS, MAX_TOKENS))]
    while engine.has_unfinished:
        engine.step()
    return [r.generated for r in reqs], engine.runner.graphs


@pytest.fixture(scope="module")
def torch_model(shared_ckpt: Path) -> DeepseekV3:
    return model_for(shared_ckpt, "torch")


def test_capture_sizes_are_vllms() -> None:
    assert capture_sizes(1) == [1]
    assert capture_sizes(3) == [1, 2, 4]
    assert capture_sizes(20) == [1, 2, 4, 8, 16, 24]
    assert capture_sizes(64) == [1, 2, 4, *range(8, 65, 8)]


def test_graphs_are_the_cuda_default(shared_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA unless enforce_eager, naive MLA or the torch backend says eager; never on a CPU. LLM checks the flag,
    and `--enforce-eager` reaches it."""
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert graphs_wanted(cuda, False, "auto", "triton") and graphs_wanted(cuda, False, "absorbed", "flashinfer")
    assert not any([graphs_wanted(cuda, True, "auto", "triton"), graphs_wanted(cuda, False, "naive", "triton"),
                    graphs_wanted(cuda, False, "auto", "torch"), graphs_wanted(cpu, False, "auto", "triton")])
    assert LLM(shared_ckpt, dtype="float32", speculative=None).runner.graphs is None
    with pytest.raises(ValueError, match="enforce_eager must be True or False, got 'yes'"):
        LLM(shared_ckpt, dtype="float32", enforce_eager="yes")
    seen: list[object] = []

    def fake_llm(path: Path, **kw: object) -> None:
        seen.append(kw["enforce_eager"])
        raise ValueError("stopped")

    monkeypatch.setattr("specdec.cli.common.LLM", fake_llm)
    for flag in (["--enforce-eager"], []):
        cli_main(["generate", "--model", str(shared_ckpt), "--prompt", "x", *flag])
    assert seen == [True, False]


# (spec, the graphs whose replays must have padded three requests to four); "adaptive": each request drafts what
# pays (measured costs: which graphs run is not fixed), so verify batches may be ragged
RUNS = {"plain": (None, [Key(None, 4, 1)]),
        "chain k=3": (CHAIN, [Key(None, 4, 4), Key(0, 4, 1)]),  # verify: 4 nodes each; draft steps: one token each
        "tree": (TREE, [Key(None, 4, 6), Key(0, 8, 1)]),  # 5 drafted nodes + the root; 2 frontier nodes each
        "adaptive": (SpecConfig(num_speculative_tokens=3), [])}


@pytest.mark.parametrize("run", list(RUNS))
def test_padded_graph_path_decodes_as_eager_torch(torch_model: DeepseekV3, run: str) -> None:
    spec, keys = RUNS[run]
    want, _ = decode(torch_model, spec, graphs=False)
    got, graphs = decode(torch_model, spec, graphs=True)
    assert got == want
    assert all(graphs.replays[k] for k in keys), graphs.replays


def test_padded_graph_path_samples_as_eager(torch_model: DeepseekV3) -> None:
    """Sampled drafts and acceptance draw the same uniforms on both paths (the forwards are what differs)."""
    want, _ = decode(torch_model, CHAIN, graphs=False, temperature=0.8)
    got, _ = decode(torch_model, CHAIN, graphs=True, temperature=0.8)
    assert got == want


@pytest.mark.interpreter
@pytest.mark.parametrize("run", ["plain", "chain k=3", "adaptive"])
def test_padded_graph_path_decodes_as_eager_triton(shared_ckpt: Path, run: str) -> None:
    model = model_for(shared_ckpt, "triton")
    spec, keys = RUNS[run]
    want, _ = decode(model, spec, graphs=False)
    got, graphs = decode(model, spec, graphs=True)
    assert got == want
    assert all(graphs.replays[k] for k in keys), graphs.replays


@pytest.mark.parametrize("where", ["main", "mtp"])
def test_a_host_read_inside_the_region_raises(torch_model: DeepseekV3, monkeypatch: pytest.MonkeyPatch,
                                              where: str) -> None:
    """The same host read runs outside the region (the prefill's forward, eager) and raises inside it."""
    name = "logits" if where == "main" else "mtp_forward"
    real = getattr(torch_model, name)

    def reads(*args: object) -> torch.Tensor:
        out = real(*args)
        return out * (out.sum().item() * 0 + 1)

    monkeypatch.setattr(torch_model, name, reads)
    decode(torch_model, CHAIN, graphs=False)
    with pytest.raises(HostReadError, match=r"aten\.(_local_scalar_dense|item) .* inside a no-host-reads region"):
        decode(torch_model, None if where == "main" else CHAIN, graphs=True)


def test_padding_rows_write_only_the_spare_slot(torch_model: DeepseekV3, seed: int) -> None:
    """Four sequences, then three in the same bucket: the fourth row's stale inputs must be reset, or it would
    write the slot of the earlier fourth sequence. The second call changes only its own three slots and the spare
    one, and gives what the eager forward gives."""
    g = torch.Generator().manual_seed(seed)
    cfg = torch_model.cfg
    cache = LatentCache(cfg.num_hidden_layers, 256, cfg.kv_cache_dim, torch.float32, DEVICE)
    cache.kv.copy_(torch.randn(cache.kv.shape, generator=g))  # other requests' rows
    graphs = StepGraphs(torch_model, cache, None, max_num_seqs=4, rows=1, draft_width=1, width=64, device=DEVICE)

    def step(ctx: list[int]) -> tuple[torch.Tensor, torch.Tensor, AttnMeta]:
        b = len(ctx)
        table = torch.randperm(256, generator=g)[:b * 64].view(b, 64).to(DEVICE)
        meta = AttnMeta.build(table[:, :max(ctx) + 1], ctx, [1] * b, torch.ones(b, 1, dtype=torch.bool))
        return torch.randint(0, cfg.vocab_size, (b,), generator=g).to(DEVICE), meta.ctx_lens, meta

    graphs.main(*step([30, 7, 12, 50]))
    tokens, pos, meta = step([3, 40, 21])
    before = cache.kv.clone()
    hidden, logits = graphs.main(tokens, pos, meta)
    assert graphs.replays == {Key(None, 4, 1): 2}
    _matches_eager(torch_model, cache, before, tokens, pos, meta, hidden, logits)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_a_ragged_verify_batch_pads_each_sequence(shared_ckpt: Path, torch_model: DeepseekV3, seed: int,
                                                  backend: str) -> None:
    """Three sequences of 2, 1 and 3 new tokens (a tree, a root alone, a chain) run in the graph of four sequences
    of three: each short sequence's padding tokens write only the spare slot, and its real tokens' hidden states,
    logits and cache rows are the eager forward's."""
    model = torch_model if backend == "torch" else model_for(shared_ckpt, backend)
    g = torch.Generator().manual_seed(seed)
    cfg = model.cfg
    cache = LatentCache(cfg.num_hidden_layers, 256, cfg.kv_cache_dim, torch.float32, DEVICE)
    cache.kv.copy_(torch.randn(cache.kv.shape, generator=g))
    before = cache.kv.clone()
    graphs = StepGraphs(model, cache, None, max_num_seqs=4, rows=4, draft_width=1, width=64, device=DEVICE)
    # the second sequence's padding tokens' keys lie past the caller's table: the static one's spare-slot entries,
    # which the padding sequence's tokens wrote (finite: each sees at least itself; 0 * NaN would reach real rows)
    ctx, n_new = [9, 32, 4], [2, 1, 3]
    table = torch.randperm(256, generator=g)[:3 * 64].view(3, 64).to(DEVICE)
    mask = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 0, 0], [1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    meta = AttnMeta.build(table[:, :33], ctx, n_new, mask)
    tokens = torch.randint(0, cfg.vocab_size, (6,), generator=g).to(DEVICE)
    pos = torch.tensor([9, 10, 32, 4, 5, 6], device=DEVICE)
    hidden, logits = graphs.main(tokens, pos, meta)
    assert graphs.replays == {Key(None, 4, 3): 1}
    _matches_eager(model, cache, before, tokens, pos, meta, hidden, logits)


def _matches_eager(model: DeepseekV3, cache: LatentCache, before: torch.Tensor, tokens: torch.Tensor,
                   pos: torch.Tensor, meta: AttnMeta, hidden: torch.Tensor, logits: torch.Tensor) -> None:
    """The graph path's forward changed only its own slots and the spare one, and gave what the eager forward gives
    on a copy of the cache as it was before."""
    changed = set((cache.kv != before).any(-1).any(0).nonzero()[:, 0].tolist())
    assert changed <= set(meta.slots.tolist()) | {cache.pad_slot}, changed
    eager_cache = LatentCache(model.cfg.num_hidden_layers, cache.num_slots, model.cfg.kv_cache_dim, torch.float32,
                              DEVICE)
    eager_cache.kv.copy_(before)
    want = model(tokens, pos, meta, eager_cache)
    torch.testing.assert_close(hidden, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits, model.logits(want), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.kv[:, :cache.num_slots], eager_cache.kv[:, :cache.num_slots], rtol=1e-5,
                               atol=1e-5)


def test_forwards_that_no_graph_fits_run_eager(torch_model: DeepseekV3) -> None:
    """More new tokens than a verify step's, more sequences than the largest bucket, a block table wider than the
    static one, a short sequence whose padding tokens would reach past the static table."""
    cfg = torch_model.cfg
    cache = LatentCache(cfg.num_hidden_layers, 256, cfg.kv_cache_dim, torch.float32, DEVICE)
    graphs = StepGraphs(torch_model, cache, None, max_num_seqs=2, rows=2, draft_width=1, width=32, device=DEVICE)
    table = torch.arange(256, device=DEVICE).view(4, 64)
    tok = torch.zeros(4, dtype=torch.long, device=DEVICE)
    assert graphs.main(tok[:4], tok[:4], AttnMeta.build(table[:2, :8], [3, 4], [1, 3])) is None
    assert graphs.main(tok[:3], tok[:3], AttnMeta.build(table[:3, :8], [3, 4, 5], [1, 1, 1])) is None
    assert graphs.main(tok[:2], tok[:2], AttnMeta.build(table[:2, :40], [3, 39], [1, 1])) is None
    assert graphs.main(tok[:3], tok[:3], AttnMeta.build(table[:2, :32], [31, 3], [1, 2])) is None
    assert graphs.main(tok[:3], tok[:3], AttnMeta.build(table[:2, :32], [30, 3], [1, 2])) is not None
    assert graphs.main(tok[:4], tok[:4], AttnMeta.build(table[:2, :8], [3, 4], [2, 2])) is not None


def test_captured_metadata_has_no_host_lengths() -> None:
    table = torch.arange(24).view(3, 8)
    meta = AttnMeta.captured(table, torch.tensor([2, 0, 5]), torch.ones(6, 2, dtype=torch.bool),
                             torch.zeros(6, dtype=torch.long), 2)
    meta.fill_slots()
    assert meta.slots.tolist() == [2, 3, 8, 9, 21, 22] and meta.host_cu_q == (0, 2, 4, 6)
    meta.fill_slots(torch.tensor([2, 0, 1]), 99)  # padding tokens past each sequence's real ones: the spare slot
    assert meta.slots.tolist() == [2, 3, 99, 99, 21, 99]
    assert meta.longest == 8 and not meta.from_scratch
    for what, call in (("seq_mask", lambda: meta.seq_mask(0)), ("seq_slots", lambda: meta.seq_slots(0)),
                       ("seq_rows", lambda: meta.seq_rows(torch.zeros(24, 4), 0))):
        with pytest.raises(ValueError, match=f"AttnMeta.{what}: a captured step's metadata has no host lengths"):
            call()
