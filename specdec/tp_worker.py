"""A spawned tensor-parallel rank (launcher.py starts it): join the group, build the LLM's shard, then follow the step
plans rank 0 sends down its pipe until rank 0 closes its LLM or is gone."""

from __future__ import annotations

import signal
import sys
import threading
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import torch
import torch.distributed as dist
from tqdm import tqdm

from .model.parallel import init_distributed, shutdown_distributed


def worker(rank: int, world: int, port: int, backend: str, factory: Callable[[], Any], conn: Connection,
           num_threads: int) -> None:

    """A spawned rank: join the group, build the LLM's shard with factory(), then run rank 0's plans until told to
    stop. Ctrl-C is rank 0's to handle (it stops the workers). A failure is reported to rank 0 with its traceback
    before the worker exits; a worker that rank 0 stops (terminate) or leaves behind (rank 0 killed) exits without
    a word: rank 0 reports, or its own end says enough."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # tqdm's default lock is a named semaphore registered with multiprocessing's resource tracker; a worker that rank
    # 0 terminates cannot unregister it, and the tracker then warns of a "leaked semaphore" at exit
    tqdm.set_lock(threading.RLock())
    torch.set_num_threads(num_threads)
    _report(conn, ("started", None))
    try:
        store = dist.TCPStore("127.0.0.1", port, world, is_master=False)
        init_distributed(world, rank, backend, store=store, local_rank=rank)
        llm = factory()
        _report(conn, ("ready", None))
        llm.follow(PipeChannel([conn]))
    except BaseException:
        _report(conn, ("fatal", traceback.format_exc()))
        sys.exit(1)
    shutdown_distributed()


class PipeChannel:
    """Rank 0's messages to the workers it spawned, over their pipes (a worker receives on its own): a plan is one
    pickle a worker, which its kernel buffers, so rank 0 never waits for a worker to be ready to receive."""

    def __init__(self, conns: list[Connection]):
        self.conns = conns

    def send(self, obj: Any) -> None:
        for c in self.conns:
            c.send(obj)

    def recv(self) -> Any:
        return self.conns[0].recv()


def _report(conn: Connection, msg: tuple[str, Any]) -> None:
    """Send msg to rank 0. When rank 0 is gone (killed: its end of the pipe is closed, and the collective this
    rank was in failed because of it), there is no one to tell: exit quietly instead of printing a traceback."""
    try:
        conn.send(msg)
    except OSError:
        sys.exit(1)


def recv(c: Connection) -> tuple[str, Any] | None:
    """The next message on c, or None when there is none yet or its worker is gone."""
    try:
        return c.recv() if c.poll() else None
    except (EOFError, OSError):
        return None
