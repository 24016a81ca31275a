"""Adaptive speculation (issue 18): the cost model's fits and calibration, the policy's choices from them, and end
to end: whatever the policy chooses (gated, ragged, some steps plain), greedy output is the main model's alone, and
the engine, /metrics and the CLI expose its estimates and choices (a ragged chain's acceptance: test_verify.py)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from specdec import LLM, SamplingParams, SpecConfig
from specdec.cost_model import (
    BUCKETS,
    CALIBRATION_SIZE,
    Calibration,
    CostModel,
    Estimates,
    LinearFit,
    bucket,
    gate_code,
)
from specdec.draft_policy import EXPLORE, MARGIN, WARMUP, DraftPolicy
from specdec.step_plan import DraftShape


def test_linear_fit_recovers_a_line_and_forgets() -> None:
    f = LinearFit(decay=0.9)
    assert f.line() == (0.0, 0.0) and not f.seen
    f.add(3, 2.5)
    assert f.line() == (2.5, 0.0)  # x has not varied: no slope
    for x in (1, 2, 4, 8):
        f.add(x, 1.0 + 0.5 * x)
    assert f.line() == pytest.approx((1.0, 0.5)) and f.at(6) == pytest.approx(4.0)
    for _ in range(200):  # the machine got slower: the old points fade
        for x in (1, 4):
            f.add(x, 2.0 + x)
    assert f.line() == pytest.approx((2.0, 1.0), abs=1e-3)
    f2 = LinearFit(0.9)
    for x, y in ((1, 3.0), (2, 1.0)):
        f2.add(x, y)
    assert f2.line()[1] == 0.0  # never a negative slope


def test_cost_model_estimates() -> None:
    cm = CostModel(decay=1.0)
    assert [bucket(b) for b in (1, 2, 3, 4, 5, 16, 17, 64, 65, 1000)] == [0, 1, 2, 2, 3, 4, 5, 6, 7, 7]
    assert len(BUCKETS) == 8
    for _ in range(3):
        cm.add_plain(4, 0.010)
    assert not cm.draft[bucket(4)].seen
    for tokens, steps in ((8, 1), (12, 2), (16, 3)):  # verify 10 ms + 1 ms a token beyond the plain step's 4
        cm.add_drafting(4, tokens, steps, emitted=10, draft_s=0.001 * steps, verify_s=0.006 + 0.001 * tokens,
                        head_s=0.002)  # the head, apart: not a draft step
    assert cm.draft[bucket(4)].seen and not cm.draft[bucket(1)].seen
    e = cm.estimates(4)
    assert e.per_token == pytest.approx(0.001, rel=0.2) and e.draft_step == pytest.approx(0.001)
    assert e.throughput == pytest.approx(30 / (0.001 * 6 + 0.006 + 0.036 + 0.018))
    cm = CostModel()
    for _ in range(50):  # the gate kept 3 draft steps: a line had no slope (0 ms a step); through the origin, 1 ms
        cm.add_drafting(4, 12, 3, emitted=10, draft_s=0.003, verify_s=0.018)
    assert cm.estimates(4).draft_step == pytest.approx(0.001)


def test_plain_step_is_read_from_plain_steps() -> None:
    """A bucket's plain step comes from the verify line until it runs plain steps, then from theirs: a line through
    drafting steps of ~100 tokens (1 ms + 0.3 ms a token) puts 32 tokens at 10.6 ms where plain steps take 14."""
    cm = CostModel(decay=1.0)
    for tokens in (90, 100, 110):
        cm.add_drafting(32, tokens, 1, emitted=80, draft_s=0.004, verify_s=0.001 + 0.0003 * tokens)
    assert cm.estimates(32).plain_step == pytest.approx(0.001 + 0.0003 * 32)
    cm.add_plain(32, 0.014)
    e = cm.estimates(32)
    assert e.plain_step == pytest.approx(0.014) and e.per_token < 0.0003  # the verify line saw the plain step too


def test_drafting_rate_forgets_through_plain_steps() -> None:
    """Drafting steps once yielded 1000 tok/s, then the bucket decoded plainly; an explore step at 400 tok/s after
    32 plain steps carries a fifth of the rate's weight (forgotten per drafting step alone, a twentieth: 967)."""
    cm = CostModel(decay=0.95)
    for _ in range(50):
        cm.add_drafting(4, 12, 2, emitted=10, draft_s=0.002, verify_s=0.008)
    for _ in range(32):
        cm.add_plain(4, 0.01)
    cm.add_drafting(4, 12, 2, emitted=4, draft_s=0.002, verify_s=0.008)
    assert cm.estimates(4).throughput == pytest.approx(38.0 / 0.044, rel=0.01)


def test_calibration_shrinks_unseen_cells_to_the_mean() -> None:
    c = Calibration(decay=1.0)
    assert c.mean() == 0.5 and set(c.table()) == {0.5}
    hi, lo = gate_code(0, 10), gate_code(0, 0)  # greedy first sibling: a wide margin, a narrow one
    c.add([(0, hi, True)] * 30 + [(0, lo, False)] * 30 + [(0, lo, True)] * 10)
    t = c.table()
    assert len(t) == CALIBRATION_SIZE
    assert t[hi] > 0.9 and t[lo] < 0.3
    assert t[gate_code(1, 5)] == pytest.approx(c.mean(0))  # never seen: its mode's mean
    assert t[CALIBRATION_SIZE // 2] == pytest.approx(0.5)  # no sampled outcome yet


def _req(max_tokens: int = 100, generated: int = 0, greedy: bool = True, seed: int | None = None):
    params = SimpleNamespace(max_tokens=max_tokens, greedy=greedy, seed=seed)
    return SimpleNamespace(params=params, generated=[0] * generated)


def test_policy_warms_up_then_decides_from_its_costs() -> None:
    shape = DraftShape(3, 1, 3)
    p = DraftPolicy(shape, adaptive=True)
    reqs = [_req(), _req()]
    seen = []
    for _ in range(2 * WARMUP):  # depths 1..k in turn, ungated, until WARMUP drafting steps were timed
        s, depth, floor = p.plan(reqs, [False, False])
        seen.append(depth[0])
        assert s.gate is not None and floor == [None, None]
    assert seen == [1 + i % 3 for i in range(2 * WARMUP)]
    # verifying costs 1 ms a token over a plain step of 10 ms; drafting steps yield 5 tokens in 15 ms: 333 tok/s
    for tokens in (2, 4, 6, 8) * (WARMUP // 4):
        p.costs.add_plain(2, 0.010)
        p.costs.add_drafting(2, tokens, tokens // 2, emitted=5, draft_s=0.003, verify_s=0.008 + 0.001 * tokens)
    s, depth, floor = p.plan(reqs, [False, False])
    assert depth == [3, 3] and floor[0] == floor[1] and 0 < floor[0] < 1
    assert floor[0] == pytest.approx(max(2 / 0.010, p.costs.estimates(2).throughput) * 0.001, rel=0.05)
    # verification got expensive: a plain step (200 tok/s) now beats drafting
    for _ in range(100):
        p.costs.add_drafting(2, 8, 3, emitted=3, draft_s=0.01, verify_s=0.05)
    assert p.plan(reqs, [False, False]) == (None, None, None)


def _warm(p: DraftPolicy, b: int) -> None:
    """WARMUP timed drafting steps (and planned ones) in b's bucket: its estimates decide there from now on."""
    for steps in range(WARMUP):
        p.plan([_req()] * b, [False] * b)
        p.costs.add_drafting(b, 2 * b + steps, steps % 3, emitted=2 * b, draft_s=0.002, verify_s=0.01)


def _estimates(monkeypatch: pytest.MonkeyPatch, **kw: float) -> None:
    """Pin what the cost model estimates, at any batch."""
    base = dict(plain_step=0.01, per_token=0.001, draft_step=0.001, throughput=0.0)
    monkeypatch.setattr(CostModel, "estimates", lambda self, batch: Estimates(**{**base, **kw}))


def test_cold_bucket_decides_as_its_warm_neighbour(monkeypatch: pytest.MonkeyPatch) -> None:
    """A bucket without WARMUP timed drafting steps of its own decides as the nearest one with them would, at that
    one's mean batch, instead of sweeping depths (a batch that wanders between small sizes kept warming up)."""
    p = DraftPolicy(DraftShape(3, 1, 3), adaptive=True)
    _warm(p, 4)
    asked = []
    _estimates(monkeypatch, throughput=500.0)
    monkeypatch.setattr(CostModel, "estimates", lambda self, batch, f=CostModel.estimates:
                        asked.append(batch) or f(self, batch))
    s, depth, floor = p.plan([_req()] * 2, [False] * 2)
    assert depth == [3, 3] and floor == [pytest.approx(0.5)] * 2 and asked == [4]  # 500 tok/s x 1 ms a token
    _estimates(monkeypatch, throughput=300.0)  # the neighbour's 4 requests in 10 ms (400 tok/s) beat drafting
    assert p.plan([_req()] * 2, [False] * 2) == (None, None, None)


@pytest.mark.parametrize("catch_up", [0.0, 0.002])
def test_plain_decoding_needs_a_margin_both_ways(monkeypatch: pytest.MonkeyPatch, catch_up: float) -> None:
    """A drafting bucket turns plain only when plain steps beat drafting by MARGIN, and drafts again only when
    drafting beats them by MARGIN; a plain step's cost counts the catch-up of the MTP row it leaves per request."""
    p = DraftPolicy(DraftShape(3, 1, 3), adaptive=True)
    _warm(p, 4)
    reqs = [_req()] * 4
    plain = 4 / (0.01 + 4 * catch_up)  # tokens/s of plain steps, their catch-up counted
    for rate, drafts in ((plain / (1 + MARGIN / 2), True), (plain / (1 + 2 * MARGIN), False),
                         (plain * (1 + MARGIN / 2), False), (plain * (1 + 2 * MARGIN), True)):
        _estimates(monkeypatch, throughput=rate, catch_up=catch_up)
        assert (p.plan(reqs, [False] * 4)[0] is not None) is drafts, (rate, plain)


def test_policy_explores_gated_and_leaves_seeded_sampling_alone() -> None:
    """A bucket where drafting never pays decodes plainly but drafts every EXPLORE-th step, gated as drafting
    would be (so its drafting rate stays measured); a seeded sampled request drafts the whole shape every step."""
    shape = DraftShape(3, 2, 6)
    p = DraftPolicy(shape, adaptive=True)
    for _ in range(WARMUP):
        p.costs.add_plain(3, 0.010)
        p.costs.add_drafting(3, 3, 1, emitted=3, draft_s=0.01, verify_s=0.05)  # drafting never pays
    p.costs.add_drafting(3, 9, 2, emitted=3, draft_s=0.01, verify_s=0.06)
    seeded = _req(max_tokens=5, generated=4, greedy=False, seed=7)  # one token left, drafts the whole shape
    reqs = [_req(max_tokens=10, generated=8), _req(), seeded]
    choices = [p.plan(reqs, [False] * 3) for _ in range(2 * EXPLORE)]
    e = p.costs.estimates(3)
    gated = max(3 / e.plain_step, e.throughput) * e.per_token  # the floor at the best rate known (plain's)
    for i, (s, depth, floor) in enumerate(choices):
        assert s is not None and depth[2] == 3 and floor[2] is None  # seeded sampling: its seed decides alone
        if i % EXPLORE == 0:  # explore: gated at the cap (max_tokens caps the first), the floor from the plain rate
            assert depth[:2] == [1, 3] and floor[:2] == [pytest.approx(gated)] * 2 and gated > 0
        else:
            assert depth[:2] == [0, 0]  # plain for the others
    fixed = DraftPolicy(shape, adaptive=False)
    assert fixed.plan(reqs, [False] * 3) == (shape, None, None)
    assert fixed.stats().buckets[0].depth == 3 and not fixed.stats().adaptive


def _pin(monkeypatch: pytest.MonkeyPatch, floor: float, plain_every: int = 0) -> None:
    """Pin the policy's timing-driven choice: full depth gated at `floor`, and every plain_every-th step plain."""
    def choose(self: DraftPolicy, b: int, step: int) -> tuple[int, float | None, float]:
        return (0, None, 0.0) if plain_every and step % plain_every == 1 else (self.shape.k, floor, 0.5)

    monkeypatch.setattr(DraftPolicy, "_choose", choose)


@pytest.mark.parametrize("topk", [1, 2], ids=["chain", "tree"])
def test_gated_ragged_drafts_decode_as_the_main_model(shared_ckpt: Path, monkeypatch: pytest.MonkeyPatch,
                                                      topk: int) -> None:
    """Requests of one batch draft what their confidence allows (ragged), some steps decode plainly: the greedy
    output is the main model's alone, the drafts really were ragged (fewer nodes than the shape, unequal), and the
    catch-ups after plain steps were timed."""
    _pin(monkeypatch, floor=0.45, plain_every=4)
    spec = SpecConfig(num_speculative_tokens=3, topk=topk)
    llm = LLM(shared_ckpt, dtype="float32", speculative=spec)
    plain = llm.with_speculative(None)
    prompts = [[5, 6, 7], [100], [9, 8, 7, 6, 5, 4], [42, 43]]
    p = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    out = llm.generate(prompts, p)
    assert [o.token_ids for o in out] == [o.token_ids for o in plain.generate(prompts, p)]
    drafted = [o.metrics.num_drafted for o in out]
    steps = [o.metrics.num_decode_steps for o in out]
    assert sum(drafted) < sum(steps) * spec.budget and len(set(drafted)) > 1, (drafted, steps)
    assert sum(o.metrics.num_accepted for o in out) > 0
    assert llm.engine.policy.costs.catch_up.n > 0  # the engine told the policy what the catch-ups extended


@pytest.mark.parametrize("temperature", [0.0, 0.7], ids=["greedy", "sampled"])
def test_every_draft_gated_out(shared_ckpt: Path, monkeypatch: pytest.MonkeyPatch, temperature: float) -> None:
    """A floor above any node's acceptance: every chain of the batch is its root alone, which verifies as a plain
    step does (a sampled batch crashed in the chain acceptance, which assumed at least one draft)."""
    _pin(monkeypatch, floor=1.01)
    llm = LLM(shared_ckpt, dtype="float32", speculative=SpecConfig(num_speculative_tokens=3))
    p = SamplingParams(max_tokens=12, temperature=temperature, ignore_eos=True, seed=None)
    out = llm.generate([[5, 6, 7], [100]], p)
    assert [len(o.token_ids) for o in out] == [12, 12] and sum(o.metrics.num_drafted for o in out) == 0
    if temperature == 0:
        assert [o.token_ids for o in out] == [o.token_ids for o in llm.with_speculative(None).generate(
            [[5, 6, 7], [100]], p)]


def test_stats_expose_estimates_and_choices(shared_ckpt: Path) -> None:
    llm = LLM(shared_ckpt, dtype="float32", speculative=SpecConfig(num_speculative_tokens=3))
    llm.generate([[5, 6, 7], [100]], SamplingParams(max_tokens=60, temperature=0, ignore_eos=True))
    d = llm.engine.stats().drafting
    assert d.adaptive and len(d.calibration) == CALIBRATION_SIZE and 0 < d.acceptance < 1
    rows = {r.batch: r for r in d.buckets}
    assert set(rows) <= {"1", "2"} and rows["2"].steps >= WARMUP
    e = rows["2"].estimates
    assert e is not None and e.plain_step > 0 and e.throughput > 0 and e.draft_step > 0  # the runner's marks reach it
    assert rows["2"].drafted > 0 and 0 <= rows["2"].accepted <= rows["2"].drafted
    assert LLM(shared_ckpt, dtype="float32", speculative=None).engine.stats().drafting is None


def test_metrics_show_the_choices_and_estimates_by_load(shared_ckpt: Path) -> None:
    """/metrics: adaptive on, the decode steps per batch size add up to the engine's, and the buckets that drafted
    show the cost model's estimates."""
    import httpx
    from serving import scrape, serving

    with serving(shared_ckpt, speculative=SpecConfig(3)) as u, httpx.Client(timeout=60) as client:
        for n in (1, 2):  # one request, then two at once
            bodies = [{"prompt": [5 + i, 6, 7], "max_tokens": 40, "temperature": 0, "ignore_eos": True}
                      for i in range(n)]
            with ThreadPoolExecutor(n) as pool:
                assert all(r.status_code == 200 for r in pool.map(
                    lambda b: client.post(f"{u}/v1/completions", json=b), bodies))
        m = scrape(u)
    p = "specdec:spec_decode_"
    assert m[p + "adaptive"] == 1 and 0 < m[p + "acceptance_estimate"] < 1
    steps = {k: v for k, v in m.items() if k.startswith(p + "batch_steps_total")}
    assert steps[p + "batch_steps_total{batch=1}"] >= WARMUP and sum(steps.values()) >= 39
    for b in ("1",):
        assert m[f"{p}draft_depth{{batch={b}}}"] in range(4)
        assert 0 <= m[f"{p}draft_tokens_per_request_step{{batch={b}}}"] <= 3
        assert m[f"{p}cost_seconds{{batch={b},part=plain_step}}"] > 0
        assert m[f"{p}cost_seconds{{batch={b},part=per_draft_step}}"] > 0
        assert m[f"{p}cost_seconds{{batch={b},part=per_caught_up_row}}"] >= 0
        assert m[f"{p}drafting_throughput{{batch={b}}}"] > 0


@pytest.mark.parametrize("flags, adaptive", [([], True), (["--speculative-adaptive"], True),
                                             (["--no-speculative-adaptive"], False)])
def test_cli_flag(flags: list[str], adaptive: bool) -> None:
    import argparse

    from specdec.cli import common

    p = argparse.ArgumentParser()
    common.add_spec_args(p)
    assert common.spec_config(p.parse_args(flags)).adaptive is adaptive
    with pytest.raises(ValueError, match="drop --speculative-adaptive"):
        common.spec_config(p.parse_args(["--no-mtp", "--no-speculative-adaptive"]))


def test_phase_marks_feed_the_fits() -> None:
    """A drafting step's marks (start, after the catch-up, after the first head, after propose, after commit, after
    the MTP extend): the draft fit sees the propose phase after the first head alone (the head runs whenever a step
    drafts; the extend follows acceptance, the catch-up earlier plain steps, not drafting), the throughput every
    phase but the catch-up, the catch-up fit the catch-up against the rows it extended; a plain step's two marks
    feed the plain fit."""
    from specdec.step_clock import StepClock

    p = DraftPolicy(DraftShape(3, 1, 3), adaptive=True)
    clock = StepClock(torch.device("cpu"))
    for steps in (0, 1, 2):  # a 1 ms head, 2 ms an MTP forward after it; the extend grows as acceptance does
        c = 0.001 + 0.005 * (2 - steps)  # a catch-up of 2 - steps rows, longest where the fewest steps ran
        h = c + 0.001
        t1 = h + 0.002 * steps
        p.timed(clock, 1, (0.0, c, h, t1, t1 + 0.004, t1 + 0.004 + 0.003 * steps), 2 + steps, steps, 1 + steps,
                2 - steps)
    p.timed(clock, 1, (0.0, 0.005), 1, 0, 1, 0)
    e = p.costs.estimates(1)
    assert e.draft_step == pytest.approx(0.002)
    assert e.catch_up == pytest.approx(0.005) and p.costs.catch_up.n == 2  # a step without a catch-up: no point
    assert e.plain_step == pytest.approx(0.005, rel=0.3)
    assert e.throughput == pytest.approx(6 / (0.005 + 0.010 + 0.015), rel=0.05)


def test_chain_gate_keeps_what_pays() -> None:
    """Three chains: gated at 0.5 (its second node's path falls to 0.4), capped at depth 1, and without a floor;
    the cells follow the margins (greedy rows: mode 0), a step runs while a chain without a floor goes on or the
    gated ones' next nodes are expected to yield the step cost beyond their floors (path times mean acceptance,
    less the floor, summed where positive)."""
    from specdec.cost_model import MARGIN_EDGES, NUM_BINS
    from specdec.draft_gate import ChainGate
    from specdec.step_plan import Gate

    table = [0.5] * CALIBRATION_SIZE
    wide, narrow = gate_code(0, NUM_BINS - 1), gate_code(0, 0)
    table[wide], table[narrow] = 0.8, 0.5
    g = ChainGate(Gate(tuple(table), acceptance=0.6, step_cost=0.15), depth=[3, 1, 3], floor=[0.5, 0.5, None],
                  greedy=[True, True, True])
    big, small = MARGIN_EDGES[-1] + 1, MARGIN_EDGES[0] / 2
    g.add([[-0.1, -0.1 - big], [-0.1, -0.1 - big], [-1.0, -1.0 - small]])
    assert g.lens == [1, 1, 1] and g.live == [True, False, True] and g.p == pytest.approx([0.8, 0.8, 0.5])
    assert g.go()  # the chain without a floor goes on
    g.floor[2] = 0.2  # all gated: chain 0's next node (0.8 * 0.6 = 0.48) misses its floor 0.5, chain 2's
    assert not g.go()  # (0.5 * 0.6 = 0.3) clears its 0.2 by 0.1: short of the step cost 0.15
    g.step_cost = 0.09
    assert g.go()
    g.floor[2] = None
    g.add([[-0.2, -0.2 - small], [-0.2, -0.2], [-0.2, -0.2 - small]])
    assert g.lens == [1, 1, 2] and g.codes == [[wide], [wide], [narrow, narrow]] and g.live == [False, False, True]
    g.floor[2] = 0.1  # now gated: its next node (0.25 * 0.6 = 0.15) clears 0.1 by 0.05, short of 0.09
    assert not g.go()
    g.step_cost, g.live = 0.0, [False] * 3
    assert not g.go()  # a step with no chain to extend never pays, whatever its cost


def test_tree_gate_go_matches_the_chain_rule(seed: int) -> None:
    """TreeGate.go on the device: over random frontiers, path acceptances and floors, a step runs exactly when a
    request without a floor can go on or the gated frontier's surplus (ChainGate.go's sum) reaches the step cost."""
    from types import SimpleNamespace

    from specdec.draft_gate import TreeGate
    from specdec.step_plan import Gate

    gen = torch.Generator().manual_seed(seed)
    for _ in range(50):
        b, f = 3, 2
        floor = [float(x) for x in torch.rand(b, generator=gen) * 0.5]
        if torch.rand(1, generator=gen) < 0.3:
            floor[0] = None
        gate = Gate((0.5,) * CALIBRATION_SIZE, acceptance=0.7, step_cost=float(torch.rand(1, generator=gen)) * 0.5)
        tg = TreeGate(gate, [3] * b, floor, SimpleNamespace(greedy=torch.ones(b, dtype=torch.bool)),
                      torch.device("cpu"))
        p = torch.rand(b, f, generator=gen, dtype=torch.float64)
        can = torch.rand(b, f, generator=gen) < 0.7
        gated = [(i, j) for i in range(b) for j in range(f) if can[i, j] and floor[i] is not None]
        want = any(floor[i] is None and bool(can[i].any()) for i in range(b)) or bool(gated) and sum(
            max(float(p[i, j]) * 0.7 - floor[i], 0.0) for i, j in gated) >= gate.step_cost
        assert tg.go(can, p) == want
