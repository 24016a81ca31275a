"""The held-out prompt set: chunks of standard-library modules the bundled model never trained on.

bench/train_tiny.py leaves HELD_OUT out of its corpus; the benchmarks and the demo build their prompts from the same
files of the running interpreter's standard library, so they measure drafting on text the model has not seen.
"""

from __future__ import annotations

import sysconfig
from pathlib import Path

HELD_OUT: tuple[str, ...] = (
    "bisect.py", "colorsys.py", "fnmatch.py", "glob.py", "graphlib.py", "heapq.py", "netrc.py", "queue.py",
    "sched.py", "shlex.py", "stat.py", "string.py", "tabnanny.py", "textwrap.py", "wave.py",
)
MIN_CHARS, MAX_CHARS = 200, 400
GOLDEN = 0.6180339887  # successive passes over the files start at well-spread fractions of each file


def held_out_files() -> list[Path]:
    """HELD_OUT as paths in this interpreter's stdlib; raises FileNotFoundError naming any that are missing."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [root / n for n in HELD_OUT]
    missing = [str(p) for p in files if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"held-out modules missing from this stdlib: {', '.join(missing)}")
    return files


def chunk(text: str, start_fraction: float, min_chars: int = MIN_CHARS, max_chars: int = MAX_CHARS) -> str:
    """Whole lines of `text` from the first line starting at or after `start_fraction` of it, at least `min_chars`
    long where the text allows and at most `max_chars` (a longer single line is cut). The last line's newline is
    left off: a byte-level BPE merges a newline with the next line's indentation, so a prompt ending in a bare
    newline ends on a token the model rarely saw there (and then writes column-0 comment lines); without it the
    model writes the newline and the indentation itself."""
    lines = text.splitlines(keepends=True)
    starts = [0]
    for line in lines:
        starts.append(starts[-1] + len(line))
    first = next((i for i, s in enumerate(starts[:-1]) if s >= start_fraction * len(text)), 0)
    if starts[-1] - starts[first] < min_chars:  # too near the end: back up to get enough text
        first = next((i for i in range(first, -1, -1) if starts[-1] - starts[i] >= min_chars), 0)
    out = ""
    for line in lines[first:]:
        if len(out) >= min_chars or len(out) + len(line) > max_chars:
            break
        out += line
    return (out or text[starts[first]:starts[first] + max_chars]).rstrip("\n")


def held_out_prompts(n: int = len(HELD_OUT), min_chars: int = MIN_CHARS, max_chars: int = MAX_CHARS) -> list[str]:
    """n prompts, deterministic for a given stdlib: prompt i is a chunk of HELD_OUT[i % 15] (whole lines,
    min_chars..max_chars long); pass p = i // 15 over the files starts at fraction (0.3 + p * 0.618) mod 1 of each."""
    if n < 1:
        raise ValueError(f"held_out_prompts: n must be >= 1, got {n}")
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in held_out_files()]
    out = []
    for i in range(n):
        p, f = divmod(i, len(texts))
        out.append(chunk(texts[f], (0.3 + p * GOLDEN) % 1.0, min_chars, max_chars))
    return out
