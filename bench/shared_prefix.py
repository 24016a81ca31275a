"""Requests that share a long prefix, for measuring prefix caching with `specdec bench serve --input-file`.

Each request is the first --prefix-chars characters of one held-out module (the shared "system prompt"), then a
header and a --tail-chars slice of another held-out module. Writes JSONL: {"prompt": ...} per line.

    python bench/shared_prefix.py --out /tmp/shared.jsonl
    specdec bench serve --input-file /tmp/shared.jsonl --max-concurrency 4 --max-tokens 32 --threads 1
    specdec bench serve --input-file /tmp/shared.jsonl --max-concurrency 4 --max-tokens 32 --threads 1 \\
        --no-enable-prefix-caching
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from specdec.prompts import held_out_files


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--num-prompts", type=int, default=32)
    p.add_argument("--prefix-chars", type=int, default=1800)
    p.add_argument("--tail-chars", type=int, default=300)
    args = p.parse_args()
    files = held_out_files()
    prefix = files[0].read_text()[:args.prefix_chars]
    with args.out.open("w") as f:
        for i in range(args.num_prompts):
            other = files[1 + i % (len(files) - 1)]
            text = other.read_text()
            start = (i * 97) % max(1, len(text) - args.tail_chars)
            f.write(json.dumps({"prompt": f"{prefix}\n\n# --- {other.name}\n{text[start:start + args.tail_chars]}"})
                    + "\n")
    print(f"{args.out}: {args.num_prompts} requests sharing the first {args.prefix_chars} characters of "
          f"{files[0].name}")


if __name__ == "__main__":
    main()
