"""`specdec serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over one model, continuously batched, with
MTP speculative decoding unless --no-mtp.

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions (the checkpoint's chat
template from tokenizer_config.json, a plain one otherwise), GET /metrics (Prometheus; vLLM's names under
`specdec:`). Streams send one event per verify step, so the tokens MTP got accepted arrive together. Binds to
127.0.0.1 unless --host says otherwise; logs one line per request. Bodies over --max-request-body-mb get 413. SIGTERM
or Ctrl-C aborts the open requests at once (streams end with finish reason "abort") and exits.

With --tp N it starts N-1 workers on this node; under torchrun (one node or several, docs/tensor_parallel.md) rank 0
alone binds the port and serves, and every other rank follows its step plans until it exits.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
import threading

from ..api import LLM
from ..launcher import launch_rank
from ..server.limits import DEFAULT_MAX_REQUEST_BODY_MB
from ..server.loop import DEFAULT_MAX_QUEUED
from . import common


def add_server_args(p: argparse.ArgumentParser) -> None:
    """The engine and queue flags a server takes (also `bench serve`'s for the server it starts)."""
    p.add_argument("--max-num-seqs", type=int, default=64, metavar="N",
                   help="requests running at once; more wait their turn (default 64)")
    p.add_argument("--kv-cache-tokens", type=int, default=None, metavar="N",
                   help="KV cache rows over all running requests (default: 90%% of a GPU's free memory, 10%% of a "
                        "CPU's available memory)")
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse the KV rows of full 64-token blocks a new prompt shares with earlier requests "
                        "(default on)")
    p.add_argument("--max-queued-requests", type=int, default=DEFAULT_MAX_QUEUED, metavar="N",
                   help=f"requests allowed to wait for a slot; past it new ones get 503 (default {DEFAULT_MAX_QUEUED})")


def load_server_llm(args: argparse.Namespace) -> LLM:
    for flag, v in (("--max-num-seqs", args.max_num_seqs), ("--kv-cache-tokens", args.kv_cache_tokens),
                    ("--max-queued-requests", args.max_queued_requests)):
        if v is not None and v < 1:
            raise ValueError(f"{flag} {v}: must be a positive integer")
    return common.load_llm(args, common.spec_config(args), kv_cache_tokens=args.kv_cache_tokens,
                           max_num_seqs=args.max_num_seqs, enable_prefix_caching=args.enable_prefix_caching)


def listen(host: str, port: int) -> socket.socket:
    """A bound socket, so that a port in use is a one-line error before the model loads."""
    if not 0 <= port < 65536:
        raise ValueError(f"--port {port}: must be in [0, 65536)")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ValueError(f"--host {host}: cannot resolve it ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
    except OSError as e:
        sock.close()
        raise ValueError(f"cannot listen on {host}:{port} ({e.strerror})") from None
    return sock


class _Terminated(Exception):
    """SIGTERM, re-raised by uvicorn once it has shut down."""


def _terminated(signum: int, frame: object) -> None:
    raise _Terminated


def run(args: argparse.Namespace) -> int:
    from ..server.app import create_app
    from ..server.background import make_server

    if args.served_model_name is not None and not args.served_model_name.strip():
        raise ValueError(f"--served-model-name {args.served_model_name!r}: must name the model")
    sock = listen(args.host, args.port) if launch_rank() == 0 else None
    llm = load_server_llm(args)  # under torchrun, ranks other than 0 follow rank 0 in here until it exits
    terminated = False
    try:
        app = create_app(llm, args.served_model_name, args.max_queued_requests, args.max_request_body_mb * 2**20)
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
        host, port = sock.getsockname()[:2]
        print(f"specdec serve: {app.state.server.name} ({common.describe(llm.speculative)}, tp {args.tp}) at "
              f"http://{host}:{port}", flush=True)
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, _terminated)
        make_server(app, args.host, port).run(sockets=[sock])
    except _Terminated:
        terminated = True
    finally:
        sock.close()
        llm.close()
    if terminated:
        # every request has ended and the LLM is closed: skip the interpreter's teardown of torch and the weights
        # (0.5-1.3 s on an idle machine, about 3 s on a busy one), which a finished server has no use for
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with MTP speculative decoding",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_model_args(p)
    common.add_spec_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    p.add_argument("--served-model-name", default=None, metavar="NAME",
                   help="the model name requests give and /v1/models lists (default: the checkpoint folder's name)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sampling streams of requests without a seed "
                                                       "(default 0)")
    p.add_argument("--max-request-body-mb", type=common.positive_int, default=DEFAULT_MAX_REQUEST_BODY_MB, metavar="MB",
                   help=f"larger request bodies get 413 (default {DEFAULT_MAX_REQUEST_BODY_MB} MiB)")
    add_server_args(p)
    p.set_defaults(func=run)
