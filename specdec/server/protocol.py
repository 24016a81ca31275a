"""The OpenAI-compatible request bodies (strictly typed pydantic models: `"5"` is not a number, `true` is not an
integer), their conversion to prompt ids and SamplingParams, and OpenAI-style errors.

Every bad request becomes an `ApiError` (errors.py) with a one-line message naming the offending field."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from ..inputs import check_text, check_token_ids
from ..params import MAX_LOGPROBS, SamplingParams
from .errors import ApiError, bad_request

COMPLETION_MAX_TOKENS = 16  # OpenAI's and vLLM's default for /v1/completions
MAX_N = 64  # choices per request; each runs as a request of its own

# OpenAI parameters this server does not implement: accepted only at a value that asks for nothing
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "best_of": (None, 1), "suffix": (None, ""),
    "tools": (None, []), "tool_choice": (None, "none"), "response_format": (None, {"type": "text"}),
}


def validation_error(errors: list[dict]) -> ApiError:
    """FastAPI's RequestValidationError (its 422) as one 400: the first problem, named by its field path
    (`messages[1].role`), union branches left out."""
    e = errors[0] if errors else {"loc": (), "msg": "not valid", "type": ""}
    if e.get("type") == "json_invalid":
        return bad_request(f"the request body is not valid JSON ({e.get('ctx', {}).get('error', e['msg'])})")
    path = ""
    for x in list(e.get("loc", ()))[1:]:  # loc[0] is "body"
        if isinstance(x, int):
            path += f"[{x}]"
        elif isinstance(x, str) and x.isidentifier() and x not in _TYPE_TAGS:
            path += f".{x}" if path else x
        else:
            break
    if not path:
        return bad_request(f"the request body must be a JSON object with the request's fields ({e['msg']})")
    return bad_request(f"{path}: {e['msg']}", re.split(r"[.\[]", path)[0])


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict"})  # pydantic's union-branch loc entries


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's: every chunk carries its choice's usage so far


class _Sampling(BaseModel):
    """What completions and chat share (vLLM's extras: top_k, ignore_eos, stop_token_ids, repetition_penalty,
    min_tokens)."""

    model_config = ConfigDict(strict=True, extra="allow")
    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: str | list[str | int] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[str, float] | None = None  # OpenAI's: token ids as JSON keys
    min_tokens: int = 0
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None

    def check(self) -> None:
        """400 for what the request asks and this server does not do."""
        if not 1 <= self.n <= MAX_N:
            raise bad_request(f"n: the number of choices must be between 1 and {MAX_N}, got {self.n}", "n")
        for name, value in (self.model_extra or {}).items():
            if name in UNSUPPORTED and value not in UNSUPPORTED[name]:
                raise bad_request(f"{name}: not supported by this server (got {value!r})", name)
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options: only allowed with stream=true", "stream_options")

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def continuous_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.continuous_usage_stats

    @property
    def max_tokens_field(self) -> str:
        """The field the request's max_tokens came in (errors name it)."""
        return "max_tokens"

    @property
    def num_logprobs(self) -> int | None:
        """How many top logprobs each token carries (None: no logprobs); completions and chat say it apart."""
        return None

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """The request's SamplingParams; a bad value is a 400 naming its field. stop may mix strings and token ids
        (the ids join stop_token_ids)."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        texts = [s for s in stop if isinstance(s, str)]
        ids = [s for s in stop if not isinstance(s, str)] + list(self.stop_token_ids or [])
        if any(not s for s in texts):
            raise bad_request("stop: stop strings must not be empty", "stop")
        bias = None
        if self.logit_bias:
            if not all(re.fullmatch(r"\d+", k) for k in self.logit_bias):
                raise bad_request("logit_bias: keys must be token ids", "logit_bias")
            bias = {int(k): v for k, v in self.logit_bias.items()}
        try:
            return SamplingParams(max_tokens=max_tokens, temperature=1.0 if self.temperature is None
                                  else self.temperature, top_p=self.top_p, top_k=self.top_k, seed=self.seed,
                                  stop=tuple(texts) or None, stop_token_ids=tuple(ids) or None,
                                  ignore_eos=self.ignore_eos, logprobs=self.num_logprobs,
                                  presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                                  repetition_penalty=self.repetition_penalty, logit_bias=bias,
                                  min_tokens=self.min_tokens)
        except ValueError as e:
            m = re.match(r"SamplingParams\.(\w+) (.*)", str(e))
            if not m:
                raise bad_request(str(e)) from None
            name = self.max_tokens_field if m[1] == "max_tokens" else m[1]
            raise bad_request(f"{name} {m[2]}", name) from None


class CompletionRequest(_Sampling):
    prompt: Any = None
    logprobs: int | None = None  # the legacy completions form: how many top logprobs per token
    echo: bool = False

    def check(self) -> None:
        super().check()
        if self.echo and self.stream:
            raise bad_request("echo: not supported with stream=true", "echo")

    @property
    def num_logprobs(self) -> int | None:
        return self.logprobs

    def prompts(self, vocab_size: int, max_len: int) -> list[tuple[str | list[int], str]]:
        """The prompts and how errors name them: one (text or token ids), or OpenAI's batch (a list of texts or of
        token-id lists), each `prompt[j]`. Token ids are checked against the vocabulary, and a list longer than
        max_len tokens is refused before its ids are looked at."""
        p = self.prompt
        if p is None:
            raise bad_request("prompt: required (text, a list of token ids, or a batch of either)", "prompt")
        if isinstance(p, list) and p and (all(isinstance(x, str) for x in p) or all(isinstance(x, list) for x in p)):
            batch = [(x, f"prompt[{j}]") for j, x in enumerate(p)]
        elif isinstance(p, list) and any(isinstance(x, (str, list)) for x in p):
            raise bad_request("prompt: a batch is a list of texts or a list of token-id lists, not a mix", "prompt")
        else:
            batch = [(p, "prompt")]
        try:
            for x, where in batch:
                if isinstance(x, str):
                    check_text(x, where)
                elif isinstance(x, list) and len(x) > max_len:
                    raise ValueError(f"{where}: {len(x)} tokens exceed the context of {max_len} (max_model_len)")
                else:
                    check_token_ids(x, vocab_size, where)
        except ValueError as e:
            raise bad_request(str(e), "prompt") from None
        return batch


class Message(BaseModel):
    model_config = ConfigDict(strict=True, extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    def for_template(self, i: int) -> dict[str, Any]:
        """The message as the chat template sees it: content as one string (text parts joined by newlines), the
        developer role (OpenAI's newer name) as system. A string that is not valid UTF-8 (a lone surrogate) is a
        400 naming the message."""
        for where, text in _strings(self.model_dump(), f"messages[{i}]"):
            try:
                if text:  # (an empty one is for the template to judge)
                    check_text(text, where)
            except ValueError as e:
                raise bad_request(str(e), "messages") from None
        content = self.content
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad_request(f"messages[{i}].content[{j}]: only text parts are supported "
                                      f"(got type {part.get('type')!r})", "messages")
                parts.append(part["text"])
            content = "\n".join(parts)
        out = {k: v for k, v in (self.model_extra or {}).items() if v is not None}
        role = "system" if self.role == "developer" else self.role
        return {"role": role, **out} | ({"content": content} if content is not None else {})


def _strings(value: Any, where: str) -> Iterator[tuple[str, str]]:
    """Every string in a JSON value, with its path (`messages[0].content[1].text`)."""
    if isinstance(value, str):
        yield where, value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(v, f"{where}.{k}")
    elif isinstance(value, list):
        for j, v in enumerate(value):
            yield from _strings(v, f"{where}[{j}]")


class ChatRequest(_Sampling):
    messages: list[Message]
    max_completion_tokens: int | None = None
    add_generation_prompt: bool = True
    logprobs: bool = False
    top_logprobs: int | None = None

    @property
    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def check(self) -> None:
        super().check()
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs: only with logprobs=true", "top_logprobs")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= MAX_LOGPROBS:
            raise bad_request(f"top_logprobs: must be between 0 and {MAX_LOGPROBS}, got {self.top_logprobs}",
                              "top_logprobs")
        if not self.messages:
            raise bad_request("messages: at least one message is required", "messages")
        if self.max_completion_tokens is not None and self.max_tokens is not None \
                and self.max_completion_tokens != self.max_tokens:
            raise bad_request("max_completion_tokens and max_tokens disagree: give one", "max_completion_tokens")

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def max_tokens_field(self) -> str:
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"
