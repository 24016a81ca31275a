"""The OpenAI-compatible HTTP server over one LLM: `create_app(llm)` builds the FastAPI app.

GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions, GET /metrics. Requests run in the
shared continuously batched engine (loop.py) as choices (choices.py); a stream sends one event per verify step (the
tokens it accepted). Text is tokenized and chat templates rendered on a thread, never on the event loop, after the
size checks of limits.py. Errors are OpenAI-style JSON: 400 for a bad request (FastAPI's 422 included), 404 for an
unknown model or route, 413 for a body over the limit, 503 (with Retry-After) when more than max_queued_requests wait
for a slot or the engine is down, 500 (no traceback) when a request's logits were not finite. A client that
disconnects aborts its request, whose KV blocks are freed at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from ..api import LLM
from ..params import SamplingParams
from .chat import ChatTemplate
from .choices import Choice, Options, Prompt, Run, respond
from .errors import ApiError, bad_request
from .limits import DEFAULT_MAX_REQUEST_BODY_MB, BodyLimit, check_chars, longest_token
from .loop import DEFAULT_MAX_QUEUED, EngineLoop
from .metrics import ServerMetrics
from .protocol import COMPLETION_MAX_TOKENS, ChatRequest, CompletionRequest, validation_error
from .responses import Shape, TokenTexts

log = logging.getLogger("specdec.server")
RETRY_AFTER_S = 1  # a 503's Retry-After: the queue moves within a step or two


class Server:
    """The app's state: the LLM, its engine loop, metrics and chat template."""

    def __init__(self, llm: LLM, name: str, max_queued: int):
        if not (type(max_queued) is int and max_queued >= 1):
            raise ValueError(f"max_queued_requests must be a positive integer, got {max_queued!r}")
        if not name.strip():
            raise ValueError("served_model_name must not be empty")
        self.llm, self.name = llm, name
        self.speculative = llm.speculative is not None
        self.context = llm.max_model_len
        self.texts = TokenTexts(llm.tokenizer)
        self.token_chars = longest_token(llm.tokenizer) if llm.tokenizer is not None else 0
        self.template = ChatTemplate.load(llm.path, llm.tokenizer, llm.config.bos_token_id,
                                          llm.config.eos_token_ids) if llm.tokenizer is not None else None
        self.loop = EngineLoop(llm, max_queued, self._finished)
        k = llm.speculative.num_speculative_tokens if llm.speculative else 0
        self.metrics = ServerMetrics(k, self.speculative, lambda: self.loop.stats)

    def _finished(self, job: Choice) -> None:
        self.metrics.observe(job, count_prompt=job.counts_prompt)
        r = job.request
        log.info("%s: prompt %d tokens, generated %d, mean accepted length %.2f, %.3f s, finish %s", job.key,
                 len(r.prompt), len(r.generated), r.metrics.mean_accepted_length, job.finished_at - job.submitted,
                 r.finish_reason)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.name:
            raise ApiError(404, f"model {model!r} does not exist (this server serves {self.name!r})", "model",
                           "model_not_found", "NotFoundError")

    async def encode(self, text: str, where: str) -> list[int]:
        """A text prompt's ids (the checkpoint's BOS rule: LLM.encode), tokenized on a thread."""
        if self.llm.tokenizer is None:
            raise bad_request(f"{self.llm.path} has no tokenizer.json: send prompts as token ids", "prompt")
        check_chars(text, self.context, self.token_chars, where, "prompt")
        return await asyncio.to_thread(self.llm.encode, text)

    async def chat_ids(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> list[int]:
        """The conversation rendered with the chat template and tokenized as it is (the template writes its own
        BOS), on a thread."""
        if self.template is None:
            raise bad_request(f"{self.llm.path} has no tokenizer.json, so there is no chat: use /v1/completions with "
                              "token ids", "messages")

        def render() -> list[int]:
            text = self.template.render(messages, add_generation_prompt)
            if not text:
                raise bad_request("messages: the chat template rendered an empty prompt", "messages")
            check_chars(text, self.context, self.token_chars, "messages: the rendered prompt", "messages")
            return self.llm.encode(text, add_special_tokens=False)

        return await asyncio.to_thread(render)

    async def respond(self, raw: Request, shape: Shape, prompts: list[Prompt], params: SamplingParams, n: int,
                      opts: Options) -> Response:
        """Run n choices of each prompt and answer, aborting them if the client disconnects first."""
        return await until_disconnect(raw, respond(Run(self.loop, shape, prompts, params, n), opts, self.texts,
                                                   self.speculative))


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status,
                        headers={"Retry-After": str(RETRY_AFTER_S)} if e.status == 503 else None)


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


def create_app(llm: LLM, served_model_name: str | None = None, max_queued_requests: int = DEFAULT_MAX_QUEUED,
               max_request_bytes: int = DEFAULT_MAX_REQUEST_BODY_MB * 2**20) -> FastAPI:
    """The server over `llm` (the caller keeps it and closes it), serving it as served_model_name (default: the
    checkpoint folder's name; ValueError for an empty one). The engine loop starts with the app's lifespan and
    stops (aborting what runs) at its shutdown."""
    server = Server(llm, llm.path.name if served_model_name is None else served_model_name, max_queued_requests)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        server.loop.start()
        try:
            yield
        finally:
            await asyncio.to_thread(server.loop.stop)

    app = FastAPI(title="specdec", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=max_request_bytes)
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
                                            "max_model_len": server.context}]}

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        server.check_model(body.model)
        body.check()
        params = body.sampling_params(COMPLETION_MAX_TOKENS if body.max_tokens is None else body.max_tokens)
        if body.echo:  # the prompt's text before the completion's; its tokens' logprobs too when asked
            params = dataclasses.replace(params, prompt_logprobs=params.logprobs)
        prompts = []
        for p, where in body.prompts(llm.config.vocab_size, server.context):
            ids = await server.encode(p, where) if isinstance(p, str) else p
            echo = (p if isinstance(p, str) else server.texts.decode(ids)) if body.echo else None
            prompts.append(Prompt(ids, echo))
        shape = Shape(False, f"cmpl-{uuid.uuid4().hex}", server.name)
        return await server.respond(raw, shape, prompts, params, body.n, options(body))

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, raw: Request) -> Response:
        server.check_model(body.model)
        body.check()
        messages = [m.for_template(i) for i, m in enumerate(body.messages)]
        ids = await server.chat_ids(messages, body.add_generation_prompt)
        max_tokens = body.max_new_tokens
        if max_tokens is None:  # as vLLM: whatever the context leaves
            max_tokens = server.context - len(ids)
            if max_tokens < 1:
                raise bad_request(f"messages: the prompt is {len(ids)} tokens, which leaves no room to generate in "
                                  f"the context of {server.context}", "messages")
        params = body.sampling_params(max_tokens)
        shape = Shape(True, f"chatcmpl-{uuid.uuid4().hex}", server.name)
        return await server.respond(raw, shape, [Prompt(ids)], params, body.n, options(body))

    return app


def options(body: CompletionRequest | ChatRequest) -> Options:
    return Options(body.stream, body.include_usage, body.continuous_usage)
