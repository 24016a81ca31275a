"""`specdec bench`: the benchmark group; each benchmark registers itself from its own module."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from . import bench_acceptance, bench_latency, bench_serve

    p = sub.add_parser("bench", help="benchmarks: latency with and without MTP, acceptance per draft position",
                       description="Benchmarks of MTP speculative decoding: `bench latency` (with vs without MTP, "
                                   "the speedup) and `bench acceptance` (per draft position, --sweep of shapes).")
    group = p.add_subparsers(dest="bench", required=True)
    bench_latency.register(group)
    bench_acceptance.register(group)
    bench_serve.register(group)
