"""`specdec` command line: one subcommand per module, each registering its own flags."""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from . import cli_inspect

    p = argparse.ArgumentParser(prog="specdec", description="MTP speculative decoding for DeepSeek-V3")
    sub = p.add_subparsers(dest="command", required=True)
    cli_inspect.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as e:  # every user error is a ValueError subclass with a one-line message
        print(f"specdec {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
