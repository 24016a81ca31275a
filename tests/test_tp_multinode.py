"""Multi-node launches, as DeepSeek-V3 runs on 16 GPUs of two nodes: torchrun launches with --node-rank 0 and 1 on
127.0.0.1, rendezvous on the "head node", over gloo. Rank 0 (on node 0) makes the calls or serves HTTP; every other
rank follows its plans."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from serving import client, server_checkpoint
from test_tp import assert_equals_one_rank, torchrun
from tp_torchrun import CHAIN

from specdec import BUNDLED_MODEL, LLM, SamplingParams, SpecConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # ~20-30 s on 2 cores: .ci/run runs it
def test_two_nodes_of_two_ranks_decode_as_one_rank(tmp_path: Path) -> None:
    """Two launches of two ranks, the bundled model at TP=4: rank 0 (node 0) makes the calls, the three others (one
    on node 0, two on node 1) follow; the tokens, acceptance and logits equal one rank's."""
    head = ["--nnodes", "2", "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    ranks = torchrun(BUNDLED_MODEL, tmp_path, head, nodes=2)
    assert len(ranks) == 4
    assert_equals_one_rank(ranks[0], LLM(BUNDLED_MODEL, dtype="float32", speculative=CHAIN))


@pytest.mark.slow  # ~15 s on 2 cores: .ci/run runs it
def test_serve_across_two_nodes(tmp_path: Path) -> None:
    """`specdec serve --tp 2` as two torchrun launches of one rank each (--node-rank 0 and 1): rank 0 alone binds the
    port and answers, equal to one rank; rank 1 follows, and leaves cleanly when rank 0 is terminated."""
    ckpt = server_checkpoint(tmp_path / "ckpt")
    head = ["--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    serve = ["-m", "specdec", "serve", "--model", str(ckpt), "--tp", "2", "--port", "0", "--served-model-name", "tiny"]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *head, "--node-rank", str(n), *serve],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for n in (0, 1)]
    try:
        line = nodes[0].stdout.readline()
        assert " at http://127.0.0.1:" in line, line
        url = line.rsplit(" at ", 1)[1].strip()
        ids = [5, 6, 7, 8]
        got = client(url).completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0,
                                             extra_body={"ignore_eos": True}).choices[0].token_ids
        want = LLM(ckpt, dtype="float32", speculative=SpecConfig()).generate(
            [ids], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].token_ids
        assert got == want
        nodes[0].send_signal(signal.SIGTERM)
        assert nodes[1].wait(timeout=60) == 0, nodes[1].stderr.read()[-3000:]
        nodes[0].wait(timeout=60)
        assert nodes[1].stdout.read() == "", "only rank 0 prints"
    finally:
        for p in nodes:
            p.kill()


def test_launch_lines_that_differ_are_refused_on_every_node(tmp_path: Path) -> None:
    """Node 1 is launched with another --seed: at start every rank compares its configuration with rank 0's, and
    both fail at once with a one-line error, node 1's naming the field."""
    ckpt = server_checkpoint(tmp_path / "ckpt")
    head = ["--nnodes", "2", "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(free_port())]
    run = ["-m", "specdec", "generate", "--model", str(ckpt), "--tp", "2", "--prompt", "x", "--max-tokens", "2"]
    env = dict(os.environ, GLOO_SOCKET_IFNAME="lo", OMP_NUM_THREADS="1")
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", *head, "--node-rank", str(n), *run,
                               "--seed", str(n)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in (0, 1)]
    errs = [p.communicate(timeout=120)[1] for p in nodes]
    assert all(p.returncode != 0 for p in nodes)
    assert "rank 1: its configuration differs from rank 0's: seed=0 vs 1" in errs[1], errs[1][-2000:]
    assert "rank 0: another rank's configuration differs from rank 0's" in errs[0], errs[0][-2000:]
