"""What the server refuses for its size before doing any work on it: a request body over --max-request-body-mb (413,
read no further than the limit) and a text longer than the context can hold (400, before it is tokenized).

The text rule: a request holds at most max_model_len tokens, and no token covers more characters than the
tokenizer's longest vocabulary entry (counted in its own alphabet: a byte-level BPE's entry has a character per
byte), so a text of more than max_model_len x that many characters cannot fit."""

from __future__ import annotations

import json
from typing import Any

from starlette.types import ASGIApp, Receive, Scope, Send

from .errors import ApiError, bad_request

DEFAULT_MAX_REQUEST_BODY_MB = 32


class BodyLimit:
    """ASGI middleware: a body over max_bytes gets 413 with an OpenAI-style error, at once when Content-Length says
    so, else as soon as the chunks read pass it. A body within the limit is read whole and handed to the app."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            return await self._refuse(send, f"{int(declared)} bytes, more")
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return await self._refuse(send, "more")
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, handed = b"".join(chunks), False

        async def replay() -> dict[str, Any]:
            nonlocal handed
            if handed:
                return await receive()  # http.disconnect, for handlers that watch for it
            handed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send, size: str) -> None:
        e = ApiError(413, f"the request body is {size} than the {self.max_bytes} bytes this server takes "
                          "(--max-request-body-mb)", code="request_too_large")
        body = json.dumps(e.body()).encode()
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


def longest_token(tokenizer: Any) -> int:
    """Characters in the tokenizer's longest vocabulary entry, added tokens included."""
    return max(map(len, tokenizer.get_vocab(with_added_tokens=True)))


def check_chars(text: str, max_model_len: int, token_chars: int, where: str, param: str) -> None:
    """400 when text cannot fit max_model_len tokens of at most token_chars characters each."""
    if len(text) > max_model_len * token_chars:
        raise bad_request(f"{where}: {len(text)} characters cannot fit the context: {max_model_len} tokens "
                          f"(max_model_len) of at most {token_chars} characters (the tokenizer's longest token) "
                          f"hold at most {max_model_len * token_chars}", param)
