"""A spawned tensor-parallel rank (launcher.py starts it): join the group, build the LLM's shard, then run each call
rank 0 sends down the pipe and acknowledge it, until told to stop or rank 0 is gone."""

from __future__ import annotations

import inspect
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

CARRY_ON_WAIT_S = 30  # a worker whose call raised ValueError waits this long for rank 0 to have raised it too


def worker(rank: int, world: int, port: int, backend: str, factory: Callable[[], Any], conn: Connection,
           num_threads: int) -> None:
    """A spawned rank: join the group, build the LLM's shard with factory(), then run rank 0's calls until told
    to stop or rank 0 is gone. Ctrl-C is rank 0's to handle (it stops the workers). A worker that rank 0 stops
    (terminate) or leaves behind (rank 0 killed) exits without a word: rank 0 reports, or its own end says enough."""
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
    except BaseException:
        _report(conn, ("fatal", traceback.format_exc()))
        sys.exit(1)
    _report(conn, ("ready", None))
    _serve(llm, conn)
    shutdown_distributed()


def _report(conn: Connection, msg: tuple[str, Any]) -> None:
    """Send msg to rank 0. When rank 0 is gone (killed: its end of the pipe is closed, and the collective this
    rank was in failed because of it), there is no one to tell: exit quietly instead of printing a traceback."""
    try:
        conn.send(msg)
    except OSError:
        sys.exit(1)


def _serve(llm: Any, conn: Connection) -> None:
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # rank 0 is gone
        if msg is None:
            return
        name, args, kwargs = msg
        try:
            out = getattr(llm, name)(*args, **kwargs)
            if inspect.isgenerator(out):
                for _ in out:
                    pass
        except ValueError as e:
            # Bad input fails alike on every rank, before any collective: rank 0 then says carry on. If it does not
            # (it is waiting in a collective this rank skipped), leave: that ends its wait with an error.
            _report(conn, ("error", f"{type(e).__name__}: {e}"))
            if conn.poll(CARRY_ON_WAIT_S) and recv(conn) == "continue":
                continue
            sys.exit(1)
        except BaseException:  # out of step with the other ranks: leave, so that rank 0 sees it and stops
            _report(conn, ("fatal", traceback.format_exc()))
            sys.exit(1)
        _report(conn, ("ok", None))


def recv(c: Connection) -> tuple[str, Any] | None:
    """The next message on c, or None when there is none yet or its worker is gone."""
    try:
        return c.recv() if c.poll() else None
    except (EOFError, OSError):
        return None
