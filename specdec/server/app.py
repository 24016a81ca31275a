"""The OpenAI-compatible HTTP server over one LLM: `create_app(llm)` builds the FastAPI app.

GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /metrics. Requests run in the
shared continuously batched engine (loop.py); a stream sends one event per verify step (the tokens it accepted).
Errors are OpenAI-style JSON: 400 for a bad request (FastAPI's 422 included), 404 for an unknown model or route,
503 when more than max_queued_requests wait for a slot or the engine is down, 500 (no traceback) when a request's
logits were not finite. A client that disconnects aborts its request, whose KV blocks are freed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from ..api import LLM
from ..engine import NonFiniteLogitsError
from ..params import SamplingParams
from ..request import Request as EngineRequest
from .chat import ChatTemplate
from .errors import ApiError, bad_request
from .loop import DEFAULT_MAX_QUEUED, Aborted, EngineLoop, Job, Update
from .metrics import ServerMetrics, spec_decode
from .protocol import COMPLETION_MAX_TOKENS, ChatRequest, CompletionRequest, validation_error
from .responses import Shape, logprobs_object, sse, usage

log = logging.getLogger("specdec.server")


class Server:
    """The app's state: the LLM, its engine loop, metrics and chat template."""

    def __init__(self, llm: LLM, name: str, max_queued: int):
        if not (type(max_queued) is int and max_queued >= 1):
            raise ValueError(f"max_queued_requests must be a positive integer, got {max_queued!r}")
        self.llm, self.name = llm, name
        self.speculative = llm.speculative is not None
        self.context = min(llm.config.max_position_embeddings, llm.engine.pool.num_tokens) - llm.engine.step_rows
        self.template = ChatTemplate.load(llm.path, llm.tokenizer, llm.config.bos_token_id,
                                          llm.config.eos_token_ids) if llm.tokenizer is not None else None
        self.loop = EngineLoop(llm, max_queued, self._finished)
        k = llm.speculative.num_speculative_tokens if llm.speculative else 0
        self.metrics = ServerMetrics(k, self.speculative, lambda: self.loop.stats)

    def _finished(self, job: Job) -> None:
        self.metrics.observe(job)
        r = job.request
        log.info("%s: prompt %d tokens, generated %d, mean accepted length %.2f, %.3f s, finish %s", job.key,
                 len(r.prompt), len(r.generated), r.metrics.mean_accepted_length, job.finished_at - job.submitted,
                 r.finish_reason)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.name:
            raise ApiError(404, f"model {model!r} does not exist (this server serves {self.name!r})", "model",
                           "model_not_found", "NotFoundError")

    def encode(self, text: str) -> list[int]:
        if self.llm.tokenizer is None:
            raise bad_request(f"{self.llm.path} has no tokenizer.json: send prompts as token ids", "prompt")
        return self.llm._encode(text, 0)

    def submit(self, key: str, ids: list[int], params: SamplingParams, queue: asyncio.Queue[tuple[int, Update]],
               index: int) -> Job:
        """Queue a request whose updates arrive on `queue` tagged with `index` (its choice)."""
        aloop = asyncio.get_running_loop()

        def deliver(u: Update) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop is gone (shutdown): nobody listens
                aloop.call_soon_threadsafe(queue.put_nowait, (index, u))

        job = Job(key, ids, params, deliver)
        self.loop.submit(job)
        return job

    async def respond(self, shape: Shape, ids: list[int], params: SamplingParams, n: int, stream: bool,
                      include_usage: bool, echo: str | None = None) -> Response:
        """n choices, each a request of its own in the engine (choice i > 0 seeded with seed + i, as vLLM does).
        Choices 1.. are submitted once choice 0 has emitted its first token: its prompt is then prefilled and its
        full blocks are in the prefix cache, so the others reuse them instead of prefilling the prompt n times."""
        queue: asyncio.Queue[tuple[int, Update]] = asyncio.Queue()
        jobs: list[Job] = []
        try:
            jobs.append(self.submit(shape.id if n == 1 else f"{shape.id}-0", ids, params, queue, 0))
            first = await queue.get()
            if first[1].error is not None:
                raise as_api_error(first[1].error)
            for i in range(1, n):
                jobs.append(self.submit(f"{shape.id}-{i}", ids, child_params(params, i), queue, i))
            if stream:
                return StreamingResponse(self._events(jobs, queue, first, shape, include_usage),
                                         media_type="text/event-stream")
            texts, left, (i, u) = [""] * n, n, first
            while True:
                if u.error is not None:
                    raise as_api_error(u.error)
                texts[i] += "".join(o.text for o in u.outs)
                left -= u.finished
                if not left:
                    break
                i, u = await queue.get()
        except BaseException:  # refused, failed, or cancelled by a client disconnect
            for job in jobs:
                self.loop.abort(job.key)
            raise
        choices = [self._choice(shape, t, job.request, echo) for t, job in zip(texts, jobs)]
        return JSONResponse(shape.full(choices, usage_of(jobs), spec_decode(jobs, self.speculative)))

    async def _events(self, jobs: list[Job], queue: asyncio.Queue[tuple[int, Update]], first: tuple[int, Update],
                      shape: Shape, include_usage: bool) -> AsyncIterator[str]:
        """The SSE stream: a chat stream opens each choice with the role; then one event per StepOutput (the
        tokens one verify step accepted for one choice; a choice's last carries its finish_reason and spec_decode);
        after every choice ends, the usage chunk if asked; [DONE]."""
        done = False
        try:
            if shape.chat:
                for i in range(len(jobs)):
                    yield sse(shape.chunk("", [], role=True, index=i))
            left, (i, u), offsets = len(jobs), first, [0] * len(jobs)
            while True:
                if u.error is not None and not isinstance(u.error, Aborted):
                    yield sse(as_api_error(u.error).body())
                    break
                job = jobs[i]
                r = job.request
                for k, o in enumerate(u.outs):
                    last = u.finished and k == len(u.outs) - 1
                    lp = self._logprobs(shape, o.token_ids, o.logprobs, job.params, offsets[i])
                    offsets[i] += sum(map(len, lp["tokens"])) if lp and not shape.chat else 0
                    yield sse(shape.chunk(o.text, o.token_ids, r.finish_reason if last else None,
                                          r.stop_reason if last else None,
                                          spec_decode([job], self.speculative) if last else None, index=i,
                                          logprobs=lp))
                if u.finished:
                    if not u.outs:  # aborted by a shutdown between steps
                        yield sse(shape.chunk("", [], r.finish_reason, r.stop_reason,
                                              spec_decode([job], self.speculative), index=i))
                    left -= 1
                    if not left:
                        if include_usage:
                            yield sse(shape.usage_chunk(usage_of(jobs), spec_decode(jobs, self.speculative)))
                        break
                i, u = await queue.get()
            done = True
            yield sse("[DONE]")
        finally:
            if not done:  # the client went away (or the stream failed): free the requests' blocks now
                for job in jobs:
                    self.loop.abort(job.key)


    def detokenize(self, ids: list[int]) -> str:
        return self.llm.tokenizer.decode(ids) if self.llm.tokenizer is not None else ""

    def token_text(self, t: int) -> str:
        """A token as logprobs name it: its text, or vLLM's "token_id:N" without a tokenizer."""
        return self.llm.tokenizer.decode([t]) if self.llm.tokenizer is not None else f"token_id:{t}"

    def _logprobs(self, shape: Shape, tokens: list[int], lps: list[dict[int, float] | None] | None,
                  params: SamplingParams, offset: int = 0) -> dict | None:
        if lps is None or params.logprobs is None:
            return None
        return logprobs_object(shape.chat, tokens, lps, params.logprobs, self.token_text, offset)

    def _choice(self, shape: Shape, text: str, r: EngineRequest, echo: str | None) -> tuple:
        """One finished choice for Shape.full; echo: the prompt's text, put before the completion's (and its
        tokens' logprobs before the completion's, when asked)."""
        tokens, lps = list(r.generated), r.logprobs
        if echo is not None:
            text = echo + text
            tokens, lps = list(r.prompt) + tokens, (r.prompt_logprobs + lps if lps is not None else None)
        return text, list(r.generated), r.finish_reason, r.stop_reason, self._logprobs(shape, tokens, lps, r.params)


def child_params(params: SamplingParams, i: int) -> SamplingParams:
    """Choice i's SamplingParams: a given seed becomes seed + i (mod 2^64), so the choices differ and each is
    reproducible."""
    if i == 0 or params.seed is None:
        return params
    return dataclasses.replace(params, seed=(params.seed + i) % 2**64)


def usage_of(jobs: list[Job]) -> dict:
    """The usage of a response's choices: the prompt counted once (and its cached tokens: the first choice's)."""
    rs = [job.request for job in jobs]
    return usage(len(rs[0].prompt), sum(len(r.generated) for r in rs), rs[0].metrics.num_cached_tokens)


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


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


async def until_disconnect(raw: Request, work: Awaitable[Response]) -> Response:
    """Run a handler, cancelling it when the client disconnects first (its request is then aborted)."""
    async def disconnected() -> None:
        while (await raw.receive())["type"] != "http.disconnect":
            pass

    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(disconnected())
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if not task.done() or task.cancelled():
        with contextlib.suppress(BaseException):
            await task
        return Response(status_code=499)  # nobody is listening
    return task.result()


def create_app(llm: LLM, served_model_name: str | None = None,
               max_queued_requests: int = DEFAULT_MAX_QUEUED) -> FastAPI:
    """The server over `llm` (the caller keeps it and closes it). The engine loop starts with the app's lifespan
    and stops (aborting what runs) at its shutdown."""
    server = Server(llm, served_model_name or llm.path.name, max_queued_requests)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.loop.start()
        try:
            yield
        finally:
            await asyncio.to_thread(server.loop.stop)

    app = FastAPI(title="specdec", lifespan=lifespan)
    app.state.server = server

    @app.exception_handler(ApiError)
    async def _api_error(_: Request, e: ApiError) -> JSONResponse:
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, e: RequestValidationError) -> JSONResponse:
        return error_response(validation_error(list(e.errors())))

    @app.exception_handler(HTTPException)
    async def _http(_: Request, e: HTTPException) -> JSONResponse:
        return error_response(ApiError(e.status_code, str(e.detail), type="NotFoundError"
                                       if e.status_code == 404 else "invalid_request_error"))

    @app.get("/health")
    async def health() -> Response:
        if server.loop.down is not None:
            return error_response(ApiError(503, f"the engine is down ({server.loop.down})", code="engine_down"))
        return Response(status_code=200)

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": server.name, "object": "model", "created": 0,
                                            "owned_by": "specdec", "root": str(llm.path),
                                            "max_model_len": llm.config.max_position_embeddings}]}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        server.check_model(body.model)
        body.check()
        prompt = body.prompt_input(llm.config.vocab_size)
        ids = server.encode(prompt) if isinstance(prompt, str) else prompt
        params = body.sampling_params(COMPLETION_MAX_TOKENS if body.max_tokens is None else body.max_tokens)
        echo = None
        if body.echo:  # the prompt's text before the completion's; its tokens' logprobs too when asked
            echo = prompt if isinstance(prompt, str) else server.detokenize(ids)
            params = dataclasses.replace(params, prompt_logprobs=params.logprobs)
        shape = Shape(False, f"cmpl-{uuid.uuid4().hex}", server.name)
        return await until_disconnect(raw, server.respond(shape, ids, params, body.n, body.stream, body.include_usage,
                                                          echo))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, raw: Request) -> Response:
        server.check_model(body.model)
        body.check()
        if server.template is None:
            raise bad_request(f"{llm.path} has no tokenizer.json, so there is no chat: use /v1/completions with "
                              "token ids", "messages")
        messages = [m.for_template(i) for i, m in enumerate(body.messages)]
        text = server.template.render(messages, body.add_generation_prompt)
        ids = llm.tokenizer.encode(text, add_special_tokens=False).ids
        if not ids:
            raise bad_request("messages: the chat template rendered an empty prompt", "messages")
        max_tokens = body.max_new_tokens
        if max_tokens is None:  # as vLLM: whatever the context leaves
            max_tokens = server.context - len(ids)
            if max_tokens < 1:
                raise bad_request(f"messages: the prompt is {len(ids)} tokens, which leaves no room to generate in "
                                  f"the context of {server.context}", "messages")
        params = body.sampling_params(max_tokens)
        shape = Shape(True, f"chatcmpl-{uuid.uuid4().hex}", server.name)
        return await until_disconnect(raw, server.respond(shape, ids, params, body.n, body.stream, body.include_usage))

    return app
