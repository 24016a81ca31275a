"""`specdec` command line: one subcommand per module (generate, bench, demo, inspect, serve), shared flags in common.py.

This module imports only argparse: the subcommands (and torch with them) load inside `main`, so Ctrl-C while they
load exits quietly like Ctrl-C anywhere else.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any, NoReturn


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`specdec generate: error: ...`, exit 2), like every other user error here, and
    no abbreviated flags (`--temp` is an error, not --temperature)."""

    def __init__(self, *args: Any, **kwargs: Any):
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _version() -> str:
    import torch

    from specdec import __version__

    try:
        from importlib.metadata import version

        triton = version("triton")
    except Exception:
        triton = "not installed"
    return f"specdec {__version__} (torch {torch.__version__}, triton {triton})"


class _Version(argparse.Action):
    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(_version())
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    from . import bench, demo, generate, inspect, serve

    p = Parser(prog="specdec", description="MTP speculative decoding for DeepSeek-V3")
    p.add_argument("--version", action=_Version, nargs=0, help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True)
    generate.register(sub)
    bench.register(sub)
    demo.register(sub)
    inspect.register(sub)
    serve.register(sub)
    return p


def _warning(message: Warning | str, *args: Any, **kwargs: Any) -> None:
    """warnings.showwarning for the CLI: one line (`specdec: warning: ...`), not the file, line and source code."""
    print(f"specdec: warning: {message}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    args = None
    with warnings.catch_warnings():  # restores showwarning when main returns (tests call it in-process)
        warnings.showwarning = _warning
        try:
            args = build_parser().parse_args(argv)
            return int(args.func(args) or 0)
        except (ValueError, FileNotFoundError) as e:  # every user error is a ValueError subclass, one line
            name = " ".join(n for n in ("specdec", getattr(args, "command", None), getattr(args, "bench", None)) if n)
            print(f"{name}: error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130
        except BrokenPipeError:  # stdout closed early (`| head`): stop quietly, and keep Python's exit flush quiet
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 1
