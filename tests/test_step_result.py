"""StepResult: a step's decisions as one packed transfer, parsed back by name (vLLM's [B, k+1] accepted tokens
padded with -1): each request's emitted tokens, accepted path and finite flag; one transfer per engine step."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from specdec import LLM, SamplingParams, SpecConfig
from specdec.step_result import StepResult
from specdec.tree import chain_tree
from specdec.verify import Acceptance


def test_a_verify_step_parses_to_each_requests_tokens_path_and_flag() -> None:
    tokens = torch.tensor([[10, 11, 12, 13, 14], [20, 21, 22, 23, 24], [30, 31, 32, 33, 34]])
    tree = dataclasses.replace(chain_tree(tokens[:, 0], tokens[:, 1:]), tokens=tokens)  # only tokens are read
    path = torch.tensor([[0, 2, 4, -1], [0, -1, -1, -1], [0, 1, 3, 4]])  # k = 3: some, none, all accepted
    acc = Acceptance(path, torch.tensor([2, 0, 3]), torch.tensor([99, 98, 97]))
    logits = torch.zeros(3, 5, 7)
    logits[1, 3, 2] = float("nan")  # a node request 1 did not even accept still fails it
    dev = StepResult.verified(tree, acc, logits)
    host = dev.host()
    assert host.tokens == [[12, 14, 99], [98], [31, 33, 34, 97]]
    assert host.path == [[0, 2, 4], [0], [0, 1, 3, 4]]
    assert host.finite == [True, False, True]
    assert dev.tokens.tolist() == [[12, 14, 99, -1], [98, -1, -1, -1], [31, 33, 34, 97]]
    assert torch.equal(dev.path, path)


def test_sampled_tokens_parse_without_a_path() -> None:
    logits = torch.tensor([[0.0, 1.0], [float("inf"), 0.0]])
    dev = StepResult.sampled(torch.tensor([5, 6]), logits)
    host = dev.host()
    assert host.tokens == [[5], [6]] and host.finite == [True, False] and host.path is None and dev.path is None


@pytest.mark.parametrize("spec", [None, SpecConfig(3), SpecConfig(3, topk=2)], ids=["plain", "chain", "tree"])
def test_each_step_moves_its_decisions_to_the_host_once(shared_ckpt: Path, spec: SpecConfig | None,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    syncs = []
    host = StepResult.host
    monkeypatch.setattr(StepResult, "host", lambda self: syncs.append(1) or host(self))
    llm = LLM(shared_ckpt, dtype="float32", speculative=spec)
    out = llm.generate([[5, 6, 7]], SamplingParams(max_tokens=12, temperature=0.5, seed=1, ignore_eos=True))[0]
    assert len(syncs) == out.metrics.num_steps > 1
