"""Response bodies in OpenAI's shapes: text_completion / chat.completion and their stream chunks, each choice also
carrying the token ids (vLLM's `token_ids`) and each finished response its `spec_decode` object and `usage`
(over its n choices: the prompt counted once)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field


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
              index: int = 0, logprobs: dict | None = None) -> dict:
        """One stream event of choice `index`: the text, tokens (and logprobs) one verify step accepted; the
        choice's last one has finish_reason and its spec_decode. role=True: a chat choice's opening delta."""
        if self.chat:
            delta: dict = {"role": "assistant", "content": text} if role else {"content": text}
            choice = {"index": index, "delta": delta, "logprobs": logprobs}
        else:
            choice = {"index": index, "text": text, "logprobs": logprobs}
        choice |= {"finish_reason": finish_reason, "stop_reason": stop_reason, "token_ids": token_ids}
        out = self._head(True) | {"choices": [choice]}
        return out | {"spec_decode": spec} if spec is not None else out

    def usage_chunk(self, usage: dict, spec: dict) -> dict:
        """stream_options.include_usage: the last event before [DONE], no choices."""
        return self._head(True) | {"choices": [], "usage": usage, "spec_decode": spec}


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict:
    """OpenAI's usage object; cached_tokens: prompt tokens whose KV rows came from the prefix cache."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def logprobs_object(chat: bool, tokens: list[int], lps: list[dict[int, float] | None], n: int,
                    token_text: Callable[[int], str], offset: int = 0) -> dict:
    """OpenAI's logprobs of some tokens: lps[j] maps tokens[j] (first) and the n most likely tokens to their
    log-probabilities (None for an echoed first prompt token, which has none). Chat: {"content": [{token, logprob,
    bytes, top_logprobs}]}; completions (the legacy form): {tokens, token_logprobs, top_logprobs, text_offset},
    offsets counted from `offset` in the text."""
    tops = [None if d is None else sorted(d.items(), key=lambda kv: -kv[1])[:n] for d in lps]
    texts = [token_text(t) for t in tokens]
    if chat:
        def item(s: str, v: float) -> dict:
            return {"token": s, "logprob": v, "bytes": list(s.encode())}

        return {"content": [item(s, d[t]) | {"top_logprobs": [item(token_text(u), v) for u, v in top]}
                            for t, s, d, top in zip(tokens, texts, lps, tops)]}
    offsets = [offset + sum(len(t) for t in texts[:j]) for j in range(len(texts))]
    return {"tokens": texts, "token_logprobs": [None if d is None else d[t] for t, d in zip(tokens, lps)],
            "top_logprobs": [None if top is None else {token_text(u): v for u, v in top} for top in tops],
            "text_offset": offsets}
