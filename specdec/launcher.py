"""Tensor parallelism for `LLM`: join a process group, or start one on this node; stop it, cleanly or with an error
naming the rank that failed.

This module never imports the API: rank 0 hands `Driver.launch` a picklable factory (`functools.partial(
LLM.from_config, config)`) with which each spawned worker builds its shard.

`join` makes the process one rank of an N-rank group, in one of three ways:
- already in one (a caller that ran `init_distributed` or its own `init_process_group`);
- under torchrun (RANK, WORLD_SIZE, LOCAL_RANK set; one node or several): every rank builds the LLM, LOCAL_RANK
  picking its GPU;
- neither: this process becomes rank 0 and spawns ranks 1..N-1 here (TCP store on 127.0.0.1; tp_worker.py).
Rank 0 alone schedules and takes calls; the others follow its step plans (step_plan.py, runner.py) until it closes
its LLM. Plans and each phase's commits reach a spawned worker down its pipe (measured cheaper than a broadcast on
gloo: docs/tensor_parallel.md), which also carries its start-up handshake and, should it fail, its traceback; its
process sentinel shows its death at once. Under torchrun (no pipes) they travel on the control group
(model/parallel.py), where an idle follower waits without a timeout; the start-up checks use it in both cases.

Failures: bad input is refused on rank 0 before any plan ships, and the group carries on. A worker that dies or
fails breaks rank 0's next collective (gloo fails at once; on NCCL a watch thread aborts the group); rank 0 then
raises TensorParallelError naming the rank (with its traceback) and stops the others. Any error on rank 0 in the
middle of a step leaves the followers waiting for a step that never ends: the group is stopped and the error
raised. Ctrl-C on rank 0 stops the workers; a worker whose rank 0 was killed leaves without a word. Scripts that
build an `LLM(tensor_parallel_size=N)` outside torchrun need the usual `if __name__ == "__main__":` guard (workers
start with multiprocessing's spawn).
"""

from __future__ import annotations

import functools
import inspect
import multiprocessing as mp
import os
import socket
import sys
import threading
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from .engine_config import EngineConfig
from .model.config import ModelConfig
from .model.parallel import (
    DistInfo,
    GroupChannel,
    adopt_distributed,
    default_backend,
    get_dist,
    init_distributed,
    shutdown_distributed,
)
from .model.plan import rank_shapes
from .step_plan import Channel
from .tp_worker import PipeChannel, recv, worker

_driving = False  # this process is rank 0 of a group it spawned (one at a time)
FAILURE_REPORT_S = 5  # how long rank 0 waits for a worker's own report once a collective failed


class TensorParallelError(RuntimeError):
    """A tensor-parallel rank died or failed, or the group fell out of step; the group is stopped and the LLM
    cannot be used again."""


class Group:
    """This process's place in a tensor-parallel group, as LLM sees it: its DistInfo and device, the Driver of the
    workers it spawned (rank 0 of a spawned group only), and why the group is down (None while it serves)."""

    def __init__(self, dist_info: DistInfo, device: torch.device, driver: Driver | None = None):
        self.dist, self.device, self.driver = dist_info, device, driver
        self._down: str | None = None

    @property
    def down(self) -> str | None:
        return self._down if self._down is not None or self.driver is None else self.driver.down

    @property
    def leads(self) -> bool:
        """Rank 0: it schedules and takes calls."""
        return self.dist.rank == 0

    def channel(self) -> Channel | None:
        """Where rank 0's plans and commits travel: the pipes of the workers it spawned (measured cheaper on gloo:
        docs/tensor_parallel.md), else the control group (torchrun; one node or several); None on one rank."""
        if self.dist.world_size == 1:
            return None
        return PipeChannel(self.driver.conns) if self.driver is not None else GroupChannel(self.dist)

    # --- agreed at start: rank 0's configuration, the sizes every rank allocates --------------------------------

    def agree(self, config: EngineConfig) -> EngineConfig:
        """Rank 0's config, after every rank compared its own with it: a rank whose config differs (another launch
        line) makes every rank raise a ValueError, that rank's naming the fields."""
        info = self.dist
        if info.world_size == 1:
            return config
        ours = info.share_object(config if info.rank == 0 else None)
        diff = ours.differences(config)
        _, bad = info.min_max([int(bool(diff))])
        if diff:
            raise ValueError(f"rank {info.rank}: its configuration differs from rank 0's: {'; '.join(diff)}")
        if bad[0]:
            raise ValueError(f"rank {info.rank}: another rank's configuration differs from rank 0's (its error names "
                             "the fields)")
        return ours

    def smallest(self, n: int) -> int:
        """The smallest of every rank's n (e.g. the KV pool each rank's free memory allows)."""
        return self.dist.min_max([n])[0][0]

    def check_same(self, sizes: dict[str, int]) -> None:
        """Raise ValueError naming a size that differs between ranks (the MIN and the MAX over the ranks)."""
        lo, hi = self.dist.min_max(list(sizes.values()))
        for name, a, b in zip(sizes, lo, hi):
            if a != b:
                raise ValueError(f"tensor-parallel ranks disagree on the {name}: {a} on one, {b} on another")

    # --- calls ----------------------------------------------------------------------------------------------------

    def check(self, call: str) -> None:
        """Raise unless this process may make `call` now: ValueError on a follower, TensorParallelError once the
        group is down."""
        if not self.leads:
            raise ValueError(f"{call}(): rank {self.dist.rank} of a tensor-parallel group runs rank 0's step plans "
                             "(LLM.follow()); rank 0 makes the calls")
        if self.down is not None:
            raise TensorParallelError(f"the tensor-parallel group is down ({self.down}): build a new LLM")

    def failed(self, e: BaseException, call: str, out_of_step: bool) -> NoReturn:
        """Rank 0's `call` raised e; out_of_step: a step broke midway. Still in step (e.g. bad input, refused
        before any plan shipped) with every worker alive: raise e, the group carries on. Otherwise stop the group
        and raise TensorParallelError: naming the worker that died or failed, else wrapping e (KeyboardInterrupt
        is raised as it is)."""
        if not out_of_step and (self.driver is None or self.driver.alive()):
            raise e
        if self.driver is not None:
            self.driver.find_failed(e, f"during {call}()")  # raises naming the worker, when one died or failed
            self.driver.abandon(f"rank 0 failed during {call}() ({type(e).__name__})")
        else:  # torchrun: leaving the group ends the others' waits with an error of their own
            shutdown_distributed()
            self._down = f"rank 0 failed during {call}() ({type(e).__name__})"
        if isinstance(e, (KeyboardInterrupt, TensorParallelError)):
            raise e
        raise TensorParallelError(f"the tensor-parallel group stopped during {call}(): {brief(e)}") from e

    def close(self, stop_followers: Callable[[], None]) -> None:
        """Rank 0: tell the followers to leave (stop_followers ships them the end), and stop the workers it
        spawned. Idempotent; nothing to do on one rank or a follower."""
        if self.dist.world_size == 1 or not self.leads or self.down is not None:
            return
        if self.driver is not None:
            self.driver.close(stop_followers)
        else:
            self._down = "closed"
            _tell(stop_followers)


def join(tp: int, device: torch.device, model_path: str | Path, factory: Callable[[], Any]) -> Group:
    """Join (or start) a `tp`-rank group for an LLM of `model_path` on `device`'s type; `factory()` builds a
    spawned worker's LLM (picklable). Raises ValueError for a split the model cannot take or a group of another
    size, before any process starts."""
    if tp == 1:
        return Group(DistInfo(), device)
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
        return Group(info, rank_device(device, info), driver)
    if info.world_size != tp:
        raise ValueError(f"tensor_parallel_size={tp} but this process is rank {info.rank} of {info.world_size}")
    return Group(info, rank_device(device, info))


def launch_rank() -> int:
    """This process's rank as torchrun set it (0 outside torchrun), before any group is joined: a CLI knows whether
    it is rank 0 (which serves) before it loads anything."""
    return int(os.environ.get("RANK", 0))


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


def leader_call(fn: Callable) -> Callable:
    """Decorates LLM's public calls: rank 0's alone (the others follow its plans). Under tensor parallelism an error
    goes through Group.failed, which stops a group that fell out of step. Generator methods stay lazy."""
    name = fn.__name__
    if inspect.isgeneratorfunction(fn):
        @functools.wraps(fn)
        def start(self: Any, *args: Any, **kwargs: Any) -> Iterator:
            self.tp.check(name)
            gen = fn(self, *args, **kwargs)
            return gen if self.tp.dist.world_size == 1 else _guarded(self, gen, name)
        return start

    @functools.wraps(fn)
    def call(self: Any, *args: Any, **kwargs: Any) -> Any:
        self.tp.check(name)
        if self.tp.dist.world_size == 1:
            return fn(self, *args, **kwargs)
        try:
            return fn(self, *args, **kwargs)
        except BaseException as e:
            self.tp.failed(e, name, self.engine.runner.broken)
    return call


def _guarded(llm: Any, gen: Iterator, name: str) -> Iterator:
    try:
        yield from gen
    except GeneratorExit:
        raise
    except BaseException as e:
        llm.tp.failed(e, name, llm.engine.runner.broken)


class Driver:
    """Rank 0's handle on the workers it spawned: their processes, and the pipes of their start-up handshake and
    failure reports."""

    def __init__(self, procs: list[mp.process.BaseProcess], conns: list[Connection], backend: str):
        self.procs, self.conns, self.backend = procs, conns, backend
        self.down: str | None = None  # why the workers were stopped
        self._closing = False  # the workers were told to leave: their exits are expected
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

    def alive(self) -> bool:
        return not any(_exited(p) for p in self.procs)

    def find_failed(self, e: BaseException, during: str) -> None:
        """After rank 0's call raised e: if a worker died or reported a failure (waiting up to FAILURE_REPORT_S for
        one to), stop the group and raise TensorParallelError naming it. Returns when every worker is well."""
        # a dead or failed worker reaches rank 0 as its collective's or pipe's error, maybe before its exit or report
        wait([p.sentinel for p in self.procs] + list(self.conns), timeout=FAILURE_REPORT_S)
        for rank, (p, c) in enumerate(zip(self.procs, self.conns), 1):
            msg = recv(c)
            if _exited(p) or msg is not None:
                self._raise_failed(rank, during, msg, cause=e)

    def close(self, stop_followers: Callable[[], None]) -> None:
        """Tell the workers to leave (stop_followers ships them the end), wait for them, stop any that do not, and
        leave the group."""
        self._closing = True
        _tell(stop_followers)
        for p in self.procs:
            p.join(timeout=30)
        self._stop("closed")

    def abandon(self, reason: str) -> None:
        """Stop every worker now (after an error; they may be stuck in a collective) and leave the group."""
        if self.down is None:
            for p in self.procs:
                if p.is_alive():
                    p.terminate()
            for p in self.procs:
                p.join(timeout=5)
            self._stop(reason)

    def _stop(self, reason: str) -> None:
        if self.down is not None:
            return
        self.down = reason
        for p in self.procs:
            if p.is_alive():
                p.kill()
                p.join()
        for c in self.conns:
            c.close()
        global _driving
        _driving = False
        try:
            shutdown_distributed()
        except Exception as e:  # a group broken by a dead peer may fail to tear down; it is gone either way
            print(f"specdec: tensor-parallel shutdown: {e}", file=sys.stderr)

    def _expect(self, kind: str, during: str) -> None:
        """Wait for message `kind` from every worker; if one reports an error or dies instead, stop the group
        and raise TensorParallelError."""
        for rank, (p, c) in enumerate(zip(self.procs, self.conns), 1):
            wait([c, p.sentinel])
            msg = recv(c)
            if msg is None or msg[0] != kind:
                self._raise_failed(rank, during, msg)

    def _raise_failed(self, rank: int, during: str, msg: tuple[str, Any] | None = None,
                      cause: BaseException | None = None) -> NoReturn:
        p = self.procs[rank - 1]
        p.join(timeout=5 if msg is None else 1)
        what = "died" if msg is None else "failed"
        code = f" (exit code {p.exitcode})" if p.exitcode is not None else ""
        detail = f":\n{msg[1]}" if msg is not None and msg[0] == "fatal" else ""
        reason = f"rank {rank} {what}{code} {during}"
        self.abandon(reason)
        raise TensorParallelError(f"tensor-parallel {reason}; the other ranks were stopped{detail}") from cause

    def _watch(self) -> None:
        """NCCL only: a dead peer leaves NCCL collectives waiting until their timeout. Abort the group instead,
        so rank 0's pending collective raises and the call reports the dead worker."""
        wait([p.sentinel for p in self.procs])
        if not (self.down or self._closing):
            try:
                dist.distributed_c10d._abort_process_group()
            except Exception:
                pass


def brief(e: BaseException) -> str:
    """An exception in one line: its type and its message's first line."""
    return f"{type(e).__name__}: {str(e).splitlines()[0]}" if str(e) else type(e).__name__


def _tell(stop_followers: Callable[[], None]) -> None:
    try:
        stop_followers()
    except Exception as e:  # a follower is gone already: nothing to tell it
        print(f"specdec: tensor-parallel close: {e}", file=sys.stderr)


def _exited(p: mp.process.BaseProcess) -> bool:
    """Whether p has exited, judged by its sentinel: is_alive() can still say True for a moment after."""
    return bool(wait([p.sentinel], 0))


def _keep_sockets_on_loopback() -> None:
    """Every rank runs on this host: keep gloo's and NCCL's sockets on the loopback interface (unless set)."""
    lo = next((n for _, n in socket.if_nameindex() if n in ("lo", "lo0")), None)
    if lo is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", lo)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", lo)
