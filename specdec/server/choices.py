"""One HTTP request's choices in the engine: P prompts (OpenAI's batch on /v1/completions; chat has one) times n
choices, choice p * n + i being prompt p's i-th (OpenAI's and vLLM's prompt-major order), each an engine request of
its own (choice i > 0 seeded with seed + i, as vLLM does).

Choices 1.. of a prompt are submitted once its choice 0 has emitted its first token: its prompt is then prefilled
and its full blocks are in the prefix cache, so they reuse them instead of prefilling the prompt n times. The
response (or the stream) starts once every prompt's choice 0 has, so a request the engine refuses is an HTTP error,
not an error event. usage counts each prompt once (as /metrics' prompt_tokens_total does) and every choice's
tokens."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass

from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..engine import NonFiniteLogitsError
from ..params import SamplingParams
from .errors import ApiError, bad_request
from .loop import Aborted, EngineLoop, Job, Update
from .metrics import spec_decode
from .responses import Shape, TokenTexts, sse, usage


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    echo: str | None = None  # echo=true: the text put before each of its choices' completion


@dataclass(eq=False)
class Choice(Job):
    counts_prompt: bool = True  # choice 0 of its prompt: /metrics counts the prompt once, as usage does


@dataclass(frozen=True)
class Options:
    """What a request asks of its response beyond the tokens."""

    stream: bool = False
    include_usage: bool = False  # stream_options.include_usage: a usage chunk before [DONE]
    continuous_usage: bool = False  # stream_options.continuous_usage_stats: each chunk its choice's usage so far


class Run:
    """The choices of one request in flight (on the event loop)."""

    def __init__(self, loop: EngineLoop, shape: Shape, prompts: list[Prompt], params: SamplingParams, n: int):
        self.loop, self.shape, self.prompts, self.params, self.n = loop, shape, prompts, params, n
        self.queue: asyncio.Queue[tuple[int, Update]] = asyncio.Queue()
        self.jobs: list[Choice] = []  # in choice order, once start() returns
        self._submitted: list[Choice] = []
        self._early: list[tuple[int, Update]] = []  # updates start() took from the queue

    def _submit(self, index: int) -> Choice:
        p, i = divmod(index, self.n)
        aloop = asyncio.get_running_loop()

        def deliver(u: Update) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop is gone (shutdown): nobody listens
                aloop.call_soon_threadsafe(self.queue.put_nowait, (index, u))

        key = self.shape.id if len(self.prompts) * self.n == 1 else f"{self.shape.id}-{index}"
        job = Choice(key, self.prompts[p].ids, child_params(self.params, i), deliver, counts_prompt=i == 0)
        self.loop.submit(job)
        self._submitted.append(job)
        return job

    async def start(self) -> None:
        """Submit every prompt's choice 0, and a prompt's other choices once its choice 0 has emitted; return once
        every prompt's has. Raises ApiError for a refused, failed or unqueueable choice (the caller aborts)."""
        n, jobs, opened = self.n, {}, set()
        for p in range(len(self.prompts)):
            jobs[p * n] = self._submit(p * n)
        while len(opened) < len(self.prompts):
            i, u = await self.queue.get()
            self._early.append((i, u))
            if u.error is not None:
                raise as_api_error(u.error)
            if i % n == 0 and i not in opened:
                opened.add(i)
                for c in range(i + 1, i + n):
                    jobs[c] = self._submit(c)
        self.jobs = [jobs[c] for c in range(len(jobs))]

    async def updates(self) -> AsyncIterator[tuple[int, Update]]:
        """Every update of every choice (start()'s first), until all have finished."""
        left = len(self.jobs)
        early, self._early = self._early, []
        for i, u in early:
            left -= u.finished
            yield i, u
        while left:
            i, u = await self.queue.get()
            left -= u.finished
            yield i, u

    def abort(self) -> None:
        """End every choice submitted (finished ones: no-op)."""
        for job in self._submitted:
            self.loop.abort(job.key)

    def prompt_len(self, index: int) -> int:
        return len(self.prompts[index // self.n].ids)

    def cached(self, index: int) -> int:
        """Prompt tokens of choice index's prompt that came from the prefix cache (its choice 0's)."""
        return self.jobs[index - index % self.n].request.metrics.num_cached_tokens

    def usage(self) -> dict:
        """Every prompt counted once (with its choice 0's cached tokens), every choice's generated tokens."""
        return usage(sum(len(p.ids) for p in self.prompts), sum(len(j.request.generated) for j in self.jobs),
                     sum(self.cached(c) for c in range(0, len(self.jobs), self.n)))


async def respond(run: Run, opts: Options, texts: TokenTexts, speculative: bool) -> Response:
    """Run the choices and answer: a JSON response, or an SSE stream."""
    try:
        await run.start()
        if opts.stream:
            return StreamingResponse(_events(run, opts, texts, speculative), media_type="text/event-stream")
        outs = [""] * len(run.jobs)
        async for i, u in run.updates():
            if u.error is not None:
                raise as_api_error(u.error)
            outs[i] += "".join(o.text for o in u.outs)
    except BaseException:  # refused, failed, or cancelled by a client disconnect
        run.abort()
        raise
    choices = []
    for i, (text, job) in enumerate(zip(outs, run.jobs)):
        r, echo = job.request, run.prompts[i // run.n].echo
        tokens, lps = list(r.generated), r.logprobs
        if echo is not None:  # the prompt's text and tokens (and their logprobs, when asked) first
            text = echo + text
            tokens, lps = list(r.prompt) + tokens, (r.prompt_logprobs + lps if lps is not None else None)
        choices.append((text, list(r.generated), r.finish_reason, r.stop_reason,
                        texts.logprobs(run.shape.chat, tokens, lps, r.params.logprobs)))
    return JSONResponse(run.shape.full(choices, run.usage(), spec_decode(run.jobs, speculative)))


async def _events(run: Run, opts: Options, texts: TokenTexts, speculative: bool) -> AsyncIterator[str]:
    """The SSE stream: a chat stream opens each choice with the role; then one event per StepOutput (the tokens one
    verify step accepted for one choice; a choice's last carries its finish_reason and spec_decode); after every
    choice ends, the usage chunk if asked; [DONE]. continuous_usage: every chunk carries its choice's usage so far
    (its prompt, its tokens until then), as vLLM's continuous_usage_stats."""
    shape, done, failed = run.shape, False, False
    offsets, generated = [0] * len(run.jobs), [0] * len(run.jobs)

    def so_far(i: int) -> dict | None:
        return usage(run.prompt_len(i), generated[i], run.cached(i)) if opts.continuous_usage else None

    try:
        if shape.chat:
            for i in range(len(run.jobs)):
                yield sse(shape.chunk("", [], role=True, index=i, usage=so_far(i)))
        async for i, u in run.updates():
            if u.error is not None and not isinstance(u.error, Aborted):
                yield sse(as_api_error(u.error).body())
                failed = True
                break
            job = run.jobs[i]
            r = job.request
            for k, o in enumerate(u.outs):
                last = u.finished and k == len(u.outs) - 1
                lp = texts.logprobs(shape.chat, o.token_ids, o.logprobs, job.params.logprobs, offsets[i])
                offsets[i] += sum(map(texts.width, o.token_ids))
                generated[i] += len(o.token_ids)
                yield sse(shape.chunk(o.text, o.token_ids, r.finish_reason if last else None,
                                      r.stop_reason if last else None,
                                      spec_decode([job], speculative) if last else None, index=i, logprobs=lp,
                                      usage=so_far(i)))
            if u.finished and not u.outs:  # aborted by a shutdown between steps
                yield sse(shape.chunk("", [], r.finish_reason, r.stop_reason, spec_decode([job], speculative),
                                      index=i, usage=so_far(i)))
        if not failed and opts.include_usage:
            yield sse(shape.usage_chunk(run.usage(), spec_decode(run.jobs, speculative)))
        done = not failed
        yield sse("[DONE]")
    finally:
        if not done:  # the client went away, or a choice failed: free the other choices' blocks now
            run.abort()


def child_params(params: SamplingParams, i: int) -> SamplingParams:
    """Choice i's SamplingParams: a given seed becomes seed + i (mod 2^64), so the choices differ and each is
    reproducible."""
    if i == 0 or params.seed is None:
        return params
    return dataclasses.replace(params, seed=(params.seed + i) % 2**64)


def as_api_error(e: Exception) -> ApiError:
    if isinstance(e, ApiError):
        return e
    if isinstance(e, NonFiniteLogitsError):  # a ValueError, but the model's failure, not the request's
        return ApiError(500, str(e), code="generation_failed")
    if isinstance(e, ValueError):
        return bad_request(str(e))
    if isinstance(e, Aborted):
        return ApiError(503, f"{e} (the server is shutting down)", code="shutting_down")
    return ApiError(500, f"{type(e).__name__}: {e}", code="generation_failed")
