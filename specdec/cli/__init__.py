"""`specdec` command line: one subcommand per module, each registering its own flags."""

from __future__ import annotations

import argparse
import os
import sys
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (`specdec generate: error: ...`, exit 2), like every other user error here."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    from . import cli_bench, cli_demo, cli_generate, cli_inspect

    p = Parser(prog="specdec", description="MTP speculative decoding for DeepSeek-V3")
    sub = p.add_subparsers(dest="command", required=True)
    cli_generate.register(sub)
    cli_bench.register(sub)
    cli_demo.register(sub)
    cli_inspect.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # every user error is a ValueError subclass with a one-line message
        name = " ".join(n for n in ("specdec", args.command, getattr(args, "bench", None)) if n)
        print(f"{name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # stdout closed early (`| head`): stop quietly, and keep Python's exit flush quiet too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
