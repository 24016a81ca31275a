"""`serve` under tensor parallelism (--tp 2 in process: rank 0 serves and schedules, the spawned worker follows its step
plans), driven by the official openai client: 16 concurrent clients are lossless, and clients that disconnect
mid-stream free their requests' rows on every rank. (A module of its own: a process drives one spawned group at a
time.)"""

from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from models import VOCAB
from serving import client, idle, scrape, serving, wait_for

from specdec import LLM, SamplingParams
from specdec.runner import Runner
from specdec.step_plan import StepPlan


def _greedy_request(c, ids: list[int], max_tokens: int, stream: bool) -> list[int]:
    extra = {"ignore_eos": True}
    if not stream:
        r = c.completions.create(model="tiny", prompt=ids, max_tokens=max_tokens, temperature=0, extra_body=extra)
        return r.choices[0].token_ids
    chunks = c.completions.create(model="tiny", prompt=ids, max_tokens=max_tokens, temperature=0, stream=True,
                                  extra_body=extra)
    return [t for ch in chunks if ch.choices for t in ch.choices[0].token_ids]


def test_sixteen_openai_clients_under_tp_2_are_lossless(ckpt: Path, alone: LLM, seed: int) -> None:
    """16 greedy requests of different lengths from 16 threads, arriving over 0.4 s, half of them streamed: each
    gets the tokens it gets alone, although they ran batched over two ranks."""
    rng = random.Random(seed)
    reqs = [([rng.randrange(2, VOCAB) for _ in range(rng.randint(1, 60))], rng.randint(1, 40), rng.uniform(0, 0.4))
            for _ in range(16)]
    with serving(ckpt, tensor_parallel_size=2) as u:
        c = client(u)

        def one(i: int) -> list[int]:
            ids, max_tokens, delay = reqs[i]
            time.sleep(delay)
            return _greedy_request(c, ids, max_tokens, stream=bool(i % 2))

        with ThreadPoolExecutor(len(reqs)) as ex:
            got = list(ex.map(one, range(len(reqs))))
        wait_for(lambda: idle(u), "the pool to empty")
    for i, ((ids, max_tokens, _), toks) in enumerate(zip(reqs, got)):
        want = alone.generate([ids], SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True))[0]
        assert toks == want.token_ids, f"seed={seed} request {i}"


def test_disconnects_under_tp_free_rows_on_every_rank(ckpt: Path, alone: LLM,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """4 long streams whose clients go away after a few events: rank 0 aborts them and frees their blocks, and the
    next plan, shipped though nothing else runs, tells the worker to drop their rows (each rank checks, at every
    plan, that it holds exactly the requests rank 0 holds, so a row left behind would fail the group). The group
    then serves on, equal to one rank."""
    plans: list[StepPlan] = []
    send = Runner.send
    monkeypatch.setattr(Runner, "send", lambda self, msg: plans.append(msg) or send(self, msg))
    body = dict(model="tiny", prompt=[5, 6, 7], max_tokens=1500, temperature=0, stream=True,
                extra_body={"ignore_eos": True})
    with serving(ckpt, tensor_parallel_size=2) as u:
        c = client(u)

        def leave(_: int) -> None:
            stream = c.completions.create(**body)
            for _, chunk in zip(range(3), stream):
                assert chunk.choices
            stream.close()

        with ThreadPoolExecutor(4) as ex:
            list(ex.map(leave, range(4)))
        wait_for(lambda: idle(u), "the aborted streams' blocks")
        wait_for(lambda: plans[-1].held == 0, "a plan that drops their rows on the worker")
        assert len({i for p in plans for i in p.freed}) == 4 and not plans[-1].prefill and not plans[-1].decode
        m = scrape(u)
        assert m["specdec:request_success_total{finished_reason=abort}"] == 4
        assert m["specdec:generation_tokens_total"] < 4 * 1500
        ids = [9, 8, 7, 6]
        want = alone.generate([ids], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0].token_ids
        assert _greedy_request(c, ids, 20, stream=False) == want
