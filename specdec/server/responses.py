"""Response bodies in OpenAI's shapes: text_completion / chat.completion and their stream chunks, each choice also
carrying the token ids (vLLM's `token_ids`) and each finished response its `spec_decode` object and `usage`
(over its choices: each prompt counted once); logprobs objects, their tokens named by TokenTexts."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any


def sse(obj: dict | str) -> str:
    """One server-sent event."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False)}\n\n"


@dataclass(frozen=True)
class Shape:
    """How one request's responses look: chat or completion, its id, model name and creation time."""

    chat: bool
    id: str
    model: str
    created: int = field(default_factory=lambda: int(time.time()))

    def _head(self, chunk: bool) -> dict:
        obj = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, choices: list[tuple[str, list[int], str, int | str | None, dict | None]], usage: dict,
             spec: dict) -> dict:
        """choices: (text, token_ids, finish_reason, stop_reason, logprobs) of each of the request's n choices."""
        out = []
        for i, (text, token_ids, finish_reason, stop_reason, logprobs) in enumerate(choices):
            if self.chat:
                choice = {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": logprobs}
            else:
                choice = {"index": i, "text": text, "logprobs": logprobs}
            out.append(choice | {"finish_reason": finish_reason, "stop_reason": stop_reason, "token_ids": token_ids})
        return self._head(False) | {"choices": out, "usage": usage, "spec_decode": spec}

    def chunk(self, text: str, token_ids: list[int], finish_reason: str | None = None,
              stop_reason: int | str | None = None, spec: dict | None = None, role: bool = False,
              index: int = 0, logprobs: dict | None = None, usage: dict | None = None) -> dict:
        """One stream event of choice `index`: the text, tokens (and logprobs) one verify step accepted; the
        choice's last one has finish_reason and its spec_decode. role=True: a chat choice's opening delta. usage:
        the choice's usage so far (continuous_usage_stats)."""
        if self.chat:
            delta: dict = {"role": "assistant", "content": text} if role else {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": logprobs}
        else:
            choice = {"index": index, "text": text, "logprobs": logprobs}
        choice |= {"finish_reason": finish_reason, "stop_reason": stop_reason, "token_ids": token_ids}
        out = self._head(True) | {"choices": [choice]}
        if usage is not None:
            out["usage"] = usage
        return out | {"spec_decode": spec} if spec is not None else out

    def usage_chunk(self, usage: dict, spec: dict) -> dict:
        """stream_options.include_usage: the last event before [DONE], no choices."""
        return self._head(True) | {"choices": [], "usage": usage, "spec_decode": spec}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """OpenAI's usage object; cached_tokens: prompt tokens whose KV rows came from the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


class TokenTexts:
    """How responses name tokens. text: a token's text with special tokens kept (logprobs show a BOS or a sampled
    EOS, as vLLM's do), or vLLM's "token_id:N" without a tokenizer; width: the characters it adds to a response's
    text (none for special tokens, which the text leaves out); decode: token ids' text, special tokens left out."""

    def __init__(self, tokenizer: Any | None):
        self.tokenizer = tokenizer
        self.special = frozenset(i for i, t in tokenizer.get_added_tokens_decoder().items() if t.special) \
            if tokenizer is not None else frozenset()

    def text(self, t: int) -> str:
        return self.tokenizer.decode([t], skip_special_tokens=False) if self.tokenizer is not None \
            else f"token_id:{t}"

    def width(self, t: int) -> int:
        return 0 if t in self.special else len(self.text(t))

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    def logprobs(self, chat: bool, tokens: list[int], lps: list[dict[int, float] | None] | None, n: int | None,
                 offset: int = 0) -> dict | None:
        """OpenAI's logprobs of some tokens (None when not asked: n or lps None). lps[j] maps tokens[j] and the n
        most likely tokens to their log-probabilities (None for an echoed first prompt token, which has none).
        Chat: {"content": [{token, logprob, bytes, top_logprobs: the n most likely}], "refusal"}; completions (the
        legacy form): {tokens, token_logprobs, top_logprobs: the n most likely and the token itself (up to n + 1,
        as OpenAI and vLLM), text_offset: counted from `offset` in the text}."""
        if lps is None or n is None:
            return None
        ranked = [None if d is None else sorted(d.items(), key=lambda kv: -kv[1]) for d in lps]
        names = [self.text(t) for t in tokens]
        if chat:
            def item(s: str, v: float) -> dict:
                return {"token": s, "logprob": v, "bytes": list(s.encode())}

            return {"content": [item(s, d[t]) | {"top_logprobs": [item(self.text(u), v) for u, v in top[:n]]}
                                for t, s, d, top in zip(tokens, names, lps, ranked)], "refusal": None}
        offsets, tops = [offset], []
        for t in tokens[:-1]:
            offsets.append(offsets[-1] + self.width(t))
        for t, s, d, top in zip(tokens, names, lps, ranked):
            # keyed by text: where two tokens share one (bytes of a split character), the token's own value stands
            tops.append(None if d is None else {self.text(u): v for u, v in top} | {s: d[t]})
        return {"tokens": names, "token_logprobs": [None if d is None else d[t] for t, d in zip(tokens, lps)],
                "top_logprobs": tops, "text_offset": offsets[:len(tokens)]}
