"""Tensor parallelism for `LLM`: join a process group, or start one on this node and serve rank 0's calls.

This module never imports the API: rank 0 hands `Driver.launch` a picklable factory (`functools.partial(LLM,
**kwargs)`) with which each spawned worker builds its own shard.

`join` makes the process one rank of an N-rank group, in one of three ways:
- already in one (a spawned worker, or a caller that ran `init_distributed` / its own `init_process_group`);
- under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set): every rank builds the LLM and makes the same calls;
- neither: this process becomes rank 0 and spawns ranks 1..N-1 here (TCP store on 127.0.0.1). Each worker builds
  its shard and runs every call rank 0 makes (tp_worker.py). `Driver` sends each call (method name, args, kwargs)
  down a pipe to every worker before running it, then waits for each worker's acknowledgement.

Two planes: the layers' collectives run over torch.distributed (gloo on CPU, NCCL on CUDA); calls and
acknowledgements travel over multiprocessing pipes, which never time out while the user is idle, and each
worker's process sentinel shows its death at once. A ValueError raised by every rank (bad input) leaves the
group in step and usable. A worker that fails otherwise exits, which fails rank 0's pending collective; rank 0
then raises TensorParallelError with the worker's error and stops the others. Ctrl-C on rank 0 stops the
workers; a worker whose rank 0 was killed leaves without a word.
Scripts that build an `LLM(tensor_parallel_size=N)` outside torchrun need the usual `if __name__ == "__main__":`
guard (workers start with multiprocessing's spawn).

Every rank makes the same decisions: the engine broadcasts rank 0's sampled first token and each step's
acceptance, and drafts come from all-gathered logits, identical bits on every rank.
"""

from __future__ import annotations

import functools
import inspect
import multiprocessing as mp
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from .model.config import ModelConfig
from .model.parallel import (
    DistInfo,
    adopt_distributed,
    default_backend,
    get_dist,
    init_distributed,
    shutdown_distributed,
)
from .model.plan import rank_shapes
from .tp_worker import recv, worker

_driving = False  # this process is rank 0 of a group it spawned (one at a time)


class TensorParallelError(RuntimeError):
    """A tensor-parallel worker died or failed; the group is stopped and the LLM cannot be used again."""


@dataclass(frozen=True)
class Membership:
    """How this process takes part: its DistInfo, its device, and (rank 0 of a spawned group only) the Driver
    that forwards calls to the workers."""

    dist: DistInfo
    device: torch.device
    driver: Driver | None = None


def join(tp: int, device: torch.device, model_path: str | Path, factory: Callable[[], Any]) -> Membership:
    """Join (or start) a `tp`-rank group for an LLM of `model_path` on `device`'s type; `factory()` builds a
    spawned worker's LLM (picklable: functools.partial of the class and its keyword arguments). Raises ValueError
    for a split the model cannot take or a group of another size, before any process starts."""
    if tp == 1:
        return Membership(DistInfo(), device)
    info = get_dist()
    if _driving:
        raise ValueError(f"this process already drives a {info.world_size}-rank tensor-parallel LLM: close() it "
                         "before building another")
    if info.world_size == 1 and dist.is_initialized():
        info = adopt_distributed(local_rank(device))
    elif info.world_size == 1 and "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if int(os.environ["WORLD_SIZE"]) != tp:
            raise ValueError(f"tensor_parallel_size={tp} but torchrun started WORLD_SIZE={os.environ['WORLD_SIZE']}")
        info = init_distributed(tp, int(os.environ["RANK"]), default_backend(device), "env://",
                                local_rank=local_rank(device))
    elif info.world_size == 1:
        driver, info = Driver.launch(tp, device, model_path, factory)
        return Membership(info, rank_device(device, info), driver)
    if info.world_size != tp:
        raise ValueError(f"tensor_parallel_size={tp} but this process is rank {info.rank} of {info.world_size}")
    return Membership(info, rank_device(device, info))


def local_rank(device: torch.device) -> int:
    """This process's device index on its node: LOCAL_RANK (torchrun sets it), else the CUDA device the caller
    selected. The global rank is no stand-in: across nodes it exceeds the local device count."""
    if "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    return torch.cuda.current_device() if device.type == "cuda" else 0


def rank_device(device: torch.device, info: DistInfo) -> torch.device:
    """CUDA ranks use their local GPU; CPU ranks share the CPU."""
    return torch.device("cuda", info.local_rank) if device.type == "cuda" else device


def check_split(path: str | Path, tp: int) -> None:
    """Plan rank 0's share of `tp` (model/plan.py): a split that does not divide (heads, experts, vocabulary, MLP
    widths) or cuts FP8 blocks raises its ValueError here, before workers start."""
    config = Path(path) / "config.json"
    if config.is_file():  # else the load itself reports what is missing
        rank_shapes(ModelConfig.from_file(config), tp)


def collective(fn: Callable) -> Callable:
    """Decorates LLM's public calls: on rank 0 of a spawned group every worker runs the same call (the result is
    rank 0's), one call at a time under the LLM's `_lock` (a stream holds it until it ends or is closed);
    elsewhere the call runs as written. Generator methods (stream) stay lazy."""
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def start(self: Any, *args: Any, **kwargs: Any) -> Iterator:
            driver = self._driver
            return fn(self, *args, **kwargs) if driver is None else _locked_stream(self, driver, fn, args, kwargs)
        return start

    @functools.wraps(fn)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        driver = self._driver
        if driver is None:
            return fn(self, *args, **kwargs)
        with self._lock:
            return driver.call(fn, self, args, kwargs)
    return call


def _locked_stream(llm: Any, driver: Driver, fn: Callable, args: tuple, kwargs: dict) -> Iterator:
    with llm._lock:
        yield from driver.stream(fn, llm, args, kwargs)


class Driver:
    """Rank 0's handle on the workers it spawned. Not thread-safe: one call at a time, as the ranks must."""

    def __init__(self, procs: list[mp.process.BaseProcess], conns: list[Connection], backend: str):
        self.procs, self.conns, self.backend = procs, conns, backend
        self.down: str | None = None  # why the group cannot serve any more calls
        self._running: Iterator | None = None  # the stream in progress, if any
        self._closing = False
        if backend == "nccl":  # gloo collectives fail by themselves when a peer's socket closes; NCCL's hang
            threading.Thread(target=self._watch, daemon=True, name="specdec-tp-watch").start()

    @classmethod
    def launch(cls, tp: int, device: torch.device, model_path: str | Path,
               factory: Callable[[], Any]) -> tuple[Driver, DistInfo]:
        """Spawn ranks 1..tp-1 and join the group as rank 0. The workers then build their shards with factory();
        `ready()` waits for them."""
        check_split(model_path, tp)
        backend = default_backend(device)
        _keep_sockets_on_loopback()
        store = dist.TCPStore("127.0.0.1", 0, tp, is_master=True, wait_for_workers=False)
        ctx = mp.get_context("spawn")  # fork is unsafe with CUDA and with torch's threads
        procs, conns = [], []
        for rank in range(1, tp):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=worker, name=f"specdec-tp{rank}", daemon=True,
                            args=(rank, tp, store.port, backend, factory, child, torch.get_num_threads()))
            p.start()
            child.close()
            procs.append(p)
            conns.append(parent)
        driver = cls(procs, conns, backend)
        try:
            driver._expect("started", "while starting")  # imported: what is left to fail is joining the group
            info = init_distributed(tp, 0, backend, store=store, local_rank=0)
        except BaseException:
            driver.abandon("could not start")
            raise
        global _driving
        _driving = True
        return driver, info

    def ready(self) -> None:
        """Wait until every worker has built its shard; raises TensorParallelError with a worker's error."""
        self._expect("ready", "while loading the model")

    def call(self, fn: Callable, llm: Any, args: tuple, kwargs: dict) -> Any:
        """fn(llm, *args, **kwargs) here and on every worker; returns rank 0's result."""
        self._begin(fn.__name__, args, kwargs)
        try:
            out = fn(llm, *args, **kwargs)
        except BaseException as e:
            self._failed(fn.__name__, e)
        self._expect("ok", f"during {fn.__name__}()")
        return out

    def stream(self, fn: Callable, llm: Any, args: tuple, kwargs: dict) -> Iterator:
        """The generator method fn, run lazily here and on every worker; yields rank 0's items."""
        cell: list[Iterator] = []
        gen = self._stream(fn, llm, args, kwargs, cell)
        cell.append(gen)
        return gen

    def _stream(self, fn: Callable, llm: Any, args: tuple, kwargs: dict, cell: list[Iterator]) -> Iterator:
        """Rank 0's side of a stream. Closing it early (break, or a new call) still runs the call to its end:
        the workers cannot stop midway without going out of step."""
        name = fn.__name__
        self._begin(name, args, kwargs)
        self._running = cell[0]
        inner = fn(llm, *args, **kwargs)
        try:
            for item in inner:  # noqa: UP028 (`yield from` would close `inner` on GeneratorExit)
                yield item
        except GeneratorExit:
            try:
                for _ in inner:
                    pass
            except BaseException as e:
                self._failed(name, e)
            self._expect("ok", f"during {name}()")
            raise
        except BaseException as e:
            self._failed(name, e)
        else:
            self._expect("ok", f"during {name}()")
        finally:
            if self._running is cell[0]:
                self._running = None

    def close(self) -> None:
        """Finish any open stream, ask the workers to leave, stop any that do not, leave the group. Idempotent."""
        if self.down is not None:
            return
        try:
            if self._running is not None:
                self._running.close()
        except BaseException as e:  # the group broke while finishing the stream: it is down already
            print(f"specdec: tensor-parallel close: {e}", file=sys.stderr)
        if self.down is not None:
            return
        self._closing = True
        for c in self.conns:
            try:
                c.send(None)
            except OSError:
                pass
        for p in self.procs:
            p.join(timeout=30)
        self._stop("closed")

    def abandon(self, reason: str) -> None:
        """Stop every worker now (after an error; they may be stuck in a collective) and leave the group."""
        if self.down is None:
            self._closing = True
            for p in self.procs:
                if p.is_alive():
                    p.terminate()
            for p in self.procs:
                p.join(timeout=5)
            self._stop(reason)

    def _stop(self, reason: str) -> None:
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join()
        for c in self.conns:
            c.close()
        self.down = reason
        global _driving
        _driving = False
        try:
            shutdown_distributed()
        except Exception as e:  # a group broken by a dead peer may fail to tear down; it is gone either way
            print(f"specdec: tensor-parallel shutdown: {e}", file=sys.stderr)

    def _begin(self, name: str, args: tuple, kwargs: dict) -> None:
        if self._running is not None:
            self._running.close()
        if self.down is not None:
            raise TensorParallelError(f"the tensor-parallel group is down ({self.down}): build a new LLM")
        for rank, (p, c) in enumerate(zip(self.procs, self.conns), 1):
            try:
                if _exited(p):
                    raise OSError
                c.send((name, args, kwargs))
            except OSError:
                self._raise_failed(rank, f"before {name}()")

    def _failed(self, name: str, e: BaseException) -> None:
        """Rank 0's call raised e. A ValueError (bad input, a KV pool too large) that every worker raised too
        leaves the ranks in step: the workers are told to carry on. Anything else stops the group; a worker's death
        or error (whose collectives then fail on rank 0) is reported as the cause."""
        if isinstance(e, ValueError):
            replies = self._replies(timeout=60)
            if all(r is not None and r[0] == "error" for r in replies):
                for c in self.conns:
                    c.send("continue")
                raise e
        else:  # a peer's death reaches rank 0 as a RuntimeError from its collective, maybe before the exit
            wait([p.sentinel for p in self.procs], timeout=5 if isinstance(e, RuntimeError) else 0)
            replies = self._replies(timeout=0)
        for rank, (p, r) in enumerate(zip(self.procs, replies), 1):
            if _exited(p) or (r is not None and r[0] != "ok"):
                self._raise_failed(rank, f"during {name}()", r, cause=e)
        self.abandon(f"rank 0 failed during {name}() ({type(e).__name__})")
        raise e

    def _replies(self, timeout: float) -> list[tuple[str, Any] | None]:
        """One message from each worker, waiting up to `timeout` seconds in all (None: none came)."""
        deadline = time.monotonic() + timeout
        out = []
        for p, c in zip(self.procs, self.conns):
            wait([c, p.sentinel], max(0.0, deadline - time.monotonic()))
            out.append(recv(c))
        return out

    def _expect(self, kind: str, during: str) -> None:
        """Wait for message `kind` from every worker; if one reports an error or dies instead, stop the group
        and raise TensorParallelError."""
        for rank, (p, c) in enumerate(zip(self.procs, self.conns), 1):
            wait([c, p.sentinel])
            msg = recv(c)
            if msg is None or msg[0] != kind:
                self._raise_failed(rank, during, msg)

    def _raise_failed(self, rank: int, during: str, msg: tuple[str, Any] | None = None,
                      cause: BaseException | None = None) -> None:
        p = self.procs[rank - 1]
        p.join(timeout=5 if msg is None else 1)
        what = "died" if msg is None else "failed"
        code = f" (exit code {p.exitcode})" if p.exitcode is not None else ""
        detail = f":\n{msg[1]}" if msg is not None and msg[0] in ("error", "fatal") else ""
        reason = f"rank {rank} {what}{code} {during}"
        self.abandon(reason)
        raise TensorParallelError(f"tensor-parallel {reason}; the other ranks were stopped{detail}") from cause

    def _watch(self) -> None:
        """NCCL only: a dead peer leaves NCCL collectives waiting until their timeout. Abort the group instead,
        so rank 0's pending collective raises and the call reports the dead worker."""
        wait([p.sentinel for p in self.procs])
        if not self._closing:
            try:
                dist.distributed_c10d._abort_process_group()
            except Exception:
                pass


def _exited(p: mp.process.BaseProcess) -> bool:
    """Whether p has exited, judged by its sentinel: is_alive() can still say True for a moment after."""
    return bool(wait([p.sentinel], 0))


def _keep_sockets_on_loopback() -> None:
    """Every rank runs on this host: keep gloo's and NCCL's sockets on the loopback interface (unless set)."""
    lo = next((n for _, n in socket.if_nameindex() if n in ("lo", "lo0")), None)
    if lo is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", lo)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", lo)
