"""Incremental detokenization and stop strings, one request at a time.

`Detokenizer` turns a growing list of token ids into text pieces (vLLM's prefix/read offsets): each push returns
the text its tokens add, holding back an incomplete UTF-8 sequence until a later token completes it.
`TextTracker` keeps a request's text and ends it at the first stop string, the way vLLM does: the text stops
before the stop string; the token that completed it is the last generated token.
"""

from __future__ import annotations

from typing import Any


class Detokenizer:
    """Without a tokenizer, token ids are the text (' 17 42')."""

    def __init__(self, tokenizer: Any | None, skip: frozenset[int] = frozenset()):
        self.tokenizer, self.skip = tokenizer, skip
        self.ids: list[int] = []
        self.prefix = self.read = 0

    def push(self, new: list[int]) -> str:
        new = [t for t in new if t not in self.skip]
        if self.tokenizer is None:
            return "".join(f" {t}" for t in new)
        self.ids += new
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) <= len(before) or text.endswith("\ufffd"):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(before):]

    def flush(self) -> str:
        """The text held back so far (at the end of a stream an incomplete sequence renders as U+FFFD)."""
        if self.tokenizer is None or self.read == len(self.ids):
            return ""
        before = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(before):]


class TextTracker:
    """A request's generated text, token by token, cut at the first of its stop strings. Pieces handed out hold
    back the last len(longest stop string) - 1 characters until the text moves past them (they could be the start
    of a stop string), as vLLM's streaming does."""

    def __init__(self, tokenizer: Any | None, hidden: frozenset[int], stop: tuple[str, ...] = ()):
        self.detok = Detokenizer(tokenizer, hidden)
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self.sent = 0  # characters of text handed out
        self.stopped: str | None = None  # the stop string that ended the text

    def push(self, token: int) -> str:
        """Add one token; returns the text that may be shown now (a found stop string sets `stopped`)."""
        piece = self.detok.push([token])
        if piece and self.stop:
            start = max(0, len(self.text) - self.hold)  # a stop string may span tokens
            text = self.text + piece
            hits = [(i, s) for s in self.stop if (i := text.find(s, start)) >= 0]
            if hits:
                i, self.stopped = min(hits)
                self.text = text[:i]
                return self._take(len(self.text))
            self.text = text
        else:
            self.text += piece
        return self._take(len(self.text) - self.hold)

    def finish(self) -> str:
        """At the end of a request: everything not handed out yet."""
        if self.stopped is None:
            self.text += self.detok.flush()
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        piece = self.text[self.sent:max(end, self.sent)]
        self.sent += len(piece)
        return piece
