"""What shipping rank 0's step plan costs per engine step on gloo: one broadcast on the control group (what specdec
does: DistInfo.share_object) against a multiprocessing pipe to each worker (what a spawned group could use instead;
torchrun's ranks have no pipe).

    .venv/bin/python bench/plan_transport.py --world 2 --requests 16

Each step rank 0 ships a StepPlan of `requests` decoding requests, then every rank joins one small all-reduce on the
default group, as a step's first forward does; a step of the all-reduce alone is the baseline. Rounds interleave the
three ways; the table gives each one's median microseconds a step and its cost over the baseline.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import pickle
import statistics
import time
from multiprocessing.connection import Connection

import torch
import torch.distributed as dist

from specdec.model.parallel import init_distributed, shutdown_distributed
from specdec.step_plan import Decode, DraftShape, StepPlan


def plan(step: int, requests: int) -> StepPlan:
    return StepPlan([], {}, requests, [], Decode(list(range(requests)), [500 + step] * requests,
                                                 [1000 + i for i in range(requests)], None, DraftShape(3, 1, 3)))


def run(rank: int, world: int, store: dist.Store, conns: list[Connection], args: argparse.Namespace
        ) -> dict[str, float]:
    torch.set_num_threads(1)
    info = init_distributed(world, rank, "gloo", store=store)
    x = torch.zeros(8)

    def all_reduce(step: int) -> None:
        dist.all_reduce(x)

    def broadcast(step: int) -> None:
        p = info.share_object(plan(step, args.requests) if rank == 0 else None)
        assert p.decode.n_main[0] == 500 + step
        dist.all_reduce(x)

    def pipe(step: int) -> None:
        if rank == 0:
            p = plan(step, args.requests)
            for c in conns:
                c.send(p)
        else:
            assert conns[0].recv().decode.n_main[0] == 500 + step
        dist.all_reduce(x)

    ways = {"all-reduce alone": all_reduce, "control-group broadcast": broadcast, "pipe to each worker": pipe}
    times: dict[str, list[float]] = {name: [] for name in ways}
    for _ in range(args.rounds):
        for name, step in ways.items():
            dist.barrier()
            t0 = time.perf_counter()
            for i in range(args.steps):
                step(i)
            dist.barrier()
            times[name].append((time.perf_counter() - t0) / args.steps * 1e6)
    shutdown_distributed()
    return {name: statistics.median(v) for name, v in times.items()}


def worker(rank: int, world: int, port: int, conn: Connection, args: argparse.Namespace) -> None:
    run(rank, world, dist.TCPStore("127.0.0.1", port, world, is_master=False), [conn], args)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2, help="ranks (default 2)")
    p.add_argument("--requests", type=int, default=16, help="decoding requests in each plan (default 16)")
    p.add_argument("--steps", type=int, default=500, help="steps a round (default 500)")
    p.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    args = p.parse_args()
    store = dist.TCPStore("127.0.0.1", 0, args.world, is_master=True, wait_for_workers=False)
    ctx = mp.get_context("spawn")
    procs, conns = [], []
    for rank in range(1, args.world):
        a, b = ctx.Pipe()
        procs.append(ctx.Process(target=worker, args=(rank, args.world, store.port, b, args)))
        procs[-1].start()
        conns.append(a)
    size = len(pickle.dumps(plan(0, args.requests)))
    res = run(0, args.world, store, conns, args)
    for proc in procs:
        proc.join()
    base = res["all-reduce alone"]
    print(f"{args.world} gloo ranks, a plan of {args.requests} decoding requests ({size} B pickled), median of "
          f"{args.rounds} rounds of {args.steps} steps:")
    for name, us in res.items():
        print(f"  {name:26s} {us:8.1f} us a step" + ("" if name == "all-reduce alone" else f"  (+{us - base:.1f})"))


if __name__ == "__main__":
    main()
