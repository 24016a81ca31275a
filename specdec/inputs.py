"""Checks on what users hand the runtime: prompts (text or token ids) and token-id lists. Each failure is a ValueError
whose one-line message names the offending input."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Prompt = str | list[int]


def as_prompt_list(prompts: Any) -> list[Prompt]:
    """A list or tuple of prompts, each a string or a list of token ids; anything else (one bare string, a dict, a
    generator, one list of ints) is refused rather than iterated."""
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
        raise ValueError(f"prompts must be a list of strings or of token-id lists, got {type(prompts).__name__}")
    if prompts and all(type(p) is int for p in prompts):
        raise ValueError("prompts must be a list of prompts: wrap one token-id list in a list ([ids])")
    return list(prompts)


def check_text(text: str, where: str) -> None:
    """Raise ValueError unless `text` is a non-empty string that encodes as UTF-8 (no lone surrogates, which is what
    undecodable bytes on a command line become)."""
    if not isinstance(text, str):
        raise ValueError(f"{where}: expected text, got {type(text).__name__}")
    if not text:
        raise ValueError(f"{where}: the prompt is empty")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{where}: not valid UTF-8 text (character {e.start}: {text[e.start]!r})") from None


def check_token_ids(ids: Any, vocab_size: int, where: str) -> list[int]:
    """A non-empty list of ints in [0, vocab_size) (bools and other types refused); returns it as a list."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence) or not ids:
        raise ValueError(f"{where}: expected a non-empty list of token ids")
    for i, t in enumerate(ids):
        if type(t) is not int:
            raise ValueError(f"{where}: token {i} is {t!r} ({type(t).__name__}), not an integer token id")
        if not 0 <= t < vocab_size:
            raise ValueError(f"{where}: token id {t} (position {i}) is outside the vocabulary [0, {vocab_size})")
    return list(ids)
