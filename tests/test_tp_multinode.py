"""A multi-node launch, as DeepSeek-V3 runs on 16 GPUs of two nodes: two torchrun launches (--node-rank 0 and 1) of
two ranks each on 127.0.0.1, rendezvous on the "head node", the bundled model at TP=4 over gloo. Rank 0 (on node 0)
makes the calls, the three others (one on node 0, two on node 1) follow its plans; the tokens, acceptance and logits
equal one rank's."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from test_tp import assert_equals_one_rank, torchrun
from tp_torchrun import CHAIN

from specdec import BUNDLED_MODEL, LLM


@pytest.mark.slow  # ~20-30 s on 2 cores: .ci/run runs it
def test_two_nodes_of_two_ranks_decode_as_one_rank(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    head = ["--nnodes", "2", "--nproc-per-node", "2", "--master-addr", "127.0.0.1", "--master-port", str(port)]
    ranks = torchrun(BUNDLED_MODEL, tmp_path, head, nodes=2)
    assert len(ranks) == 4
    assert_equals_one_rank(ranks[0], LLM(BUNDLED_MODEL, dtype="float32", speculative=CHAIN))
