"""`edgespec serve`: an OpenAI-compatible HTTP API over one `Engine`.

Endpoints: POST /v1/chat/completions and /v1/completions (streamed as server-sent events with
`"stream": true`), GET /v1/models, GET /v1/models/{id}, and GET /health (no API key needed).

Requests are checked (`openai_format`) before they wait in the bounded first-in first-out queue
(`serving.Scheduler`); a response starts once its job's first event exists, so an error found when
the engine starts is still a proper 400. When a client goes away, its job is dropped or cancelled.
Errors are OpenAI-style bodies, {"error": {"message", "type", "param", "code"}}, with a one-line
message; a stream that fails after it started ends with such a body as its last event.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from . import __version__
from .cli_common import draft_label
from .errors import EdgespecError, PromptError
from .openai_format import Reply, as_api_error, messages, params, prompt, sse
from .serving import DEFAULT_MAX_QUEUE, APIError, Job, Scheduler, shutting_down

if TYPE_CHECKING:
    from .api import Engine

__all__ = ["create_app", "make_server"]

log = logging.getLogger("edgespec.server")


def _error_response(error: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
    return JSONResponse(error.body(), status_code=error.status, headers=headers)


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body())
    except ValueError as exc:
        raise APIError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


async def _stream_events(first: tuple[str, Any], job: Job, reply: Reply) -> AsyncIterator[str]:
    if reply.chat:
        yield sse(reply.chunk(role=True))
    kind, value = first
    while kind == "chunk":
        if value.text:  # a stream's chunks add up to its result's text (api.Stream)
            yield sse(reply.chunk(value.text))
        kind, value = await job.events.get()
    if kind == "error" or value.finish_reason == "cancelled":
        yield sse(as_api_error(value if kind == "error" else shutting_down()).body())
        return
    for chunk in reply.last_chunks(value):
        yield sse(chunk)
    yield "data: [DONE]\n\n"


class _EventStream(StreamingResponse):
    """Server-sent events that cancel their job however the response ends (client gone included)."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


async def _disconnected(request: Request) -> None:
    """Return once the client has gone away (the request body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _first_event(request: Request, job: Job) -> tuple[str, Any] | None:
    """The job's first event, or None if the client goes away before it comes."""
    getter = asyncio.ensure_future(job.events.get())
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not getter.done():
            getter.cancel()
    return getter.result() if getter.done() and not getter.cancelled() else None


# -- the application ----------------------------------------------------------------------------


def create_app(
    engine: Engine,
    *,
    api_key: str | None = None,
    cors_origins: Sequence[str] = (),
    max_queue: int = DEFAULT_MAX_QUEUE,
) -> FastAPI:
    """The OpenAI-compatible API over `engine` (which the caller keeps and closes).

    Args:
        api_key: when set, /v1 requests need the header `Authorization: Bearer KEY`.
        cors_origins: origins whose web pages may call the API ("*": any); none by default.
        max_queue: the most requests accepted at once, the running one included; more get 503.
    """
    scheduler = Scheduler(engine, max_queue)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        scheduler.start()
        try:
            yield
        finally:
            scheduler.close()
            await asyncio.to_thread(scheduler.join, 30)

    app = FastAPI(
        title="edgespec",
        version=__version__,
        lifespan=lifespan,
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
    )
    app.state.scheduler = scheduler
    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
        )
    _add_error_handlers(app)
    model = {"id": engine.model, "object": "model", "created": int(time.time()), "owned_by": "edgespec"}
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_authorizer(api_key))])

    async def complete(request: Request, chat: bool) -> Response:
        body = await _json_body(request)
        request_params = params(body, chat)
        if chat:
            tokens = await asyncio.to_thread(engine.chat_tokens, messages(body))
        else:
            tokens = await asyncio.to_thread(engine.tokenize, prompt(body), raw=True)
        if len(tokens) >= engine.n_ctx:
            raise PromptError(
                f"the prompt has {len(tokens)} tokens but the context holds {engine.n_ctx}; shorten it or "
                "restart the server with a larger --ctx"
            )
        options = {"max_tokens": engine.n_ctx - len(tokens), **request_params.options}
        engine.check_options(**options)  # types and ranges, before the request waits in the queue
        draft_max = options.get("draft_max", engine.draft_max)
        draft = draft_label(engine.draft).removeprefix("draft ")  # a file name, "ngram", ...
        reply = Reply(chat, engine.model, request_params.include_usage, draft, draft_max)
        job = Job(tokens, options, request_params.stream)
        scheduler.submit(job)
        try:
            first = await _first_event(request, job)
        except BaseException:
            scheduler.cancel(job)
            raise
        if first is None:  # the client went away: nobody reads an answer
            scheduler.cancel(job)
            return Response(status_code=499)
        kind, value = first
        if kind == "error":
            raise as_api_error(value)
        if request_params.stream:
            return _EventStream(_stream_events(first, job, reply), lambda: scheduler.cancel(job))
        if value.finish_reason == "cancelled":
            raise shutting_down()
        return JSONResponse(reply.response(value))

    @v1.post("/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await complete(request, chat=True)

    @v1.post("/completions")
    async def completions(request: Request) -> Response:
        return await complete(request, chat=False)

    @v1.get("/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model]}

    @v1.get("/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> dict[str, Any]:
        if model_id != model["id"]:
            raise APIError(
                404, f"no model {model_id!r}: this server serves {model['id']!r}", code="model_not_found"
            )
        return model

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.model, **scheduler.health()}

    app.include_router(v1)
    return app


def _authorizer(api_key: str | None) -> Callable[[Request], Any]:
    async def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise APIError(
                401, "missing API key: send the header 'Authorization: Bearer KEY'", code="invalid_api_key"
            )
        if not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise APIError(401, "incorrect API key provided", code="invalid_api_key")

    return authorize


def _add_error_handlers(app: FastAPI) -> None:
    async def api_error(_request: Request, exc: Exception) -> Response:
        return _error_response(as_api_error(exc))

    async def validation_error(_request: Request, exc: Exception) -> Response:
        errors = exc.errors() if isinstance(exc, RequestValidationError) else []
        where = ".".join(str(part) for part in errors[0]["loc"] if part != "body") if errors else None
        message = f"{where}: {errors[0]['msg']}" if errors else str(exc)
        return _error_response(APIError(400, message, param=where or None))

    async def http_error(request: Request, exc: Exception) -> Response:
        status = getattr(exc, "status_code", 500)
        where = f"{request.method} {request.url.path}"
        if status == 404:
            message = f"unknown endpoint: {where} (see /v1/chat/completions, /v1/completions, /v1/models)"
        elif status == 405:
            message = f"method not allowed: {where}"
        else:
            message = str(getattr(exc, "detail", exc))
        kind = "invalid_request_error" if status < 500 else "server_error"
        return _error_response(APIError(status, message, type=kind))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(EdgespecError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, api_error)  # a bug: 500, one line (the log has the traceback)


# -- running it -------------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn's server, telling when it is ready, and cancelling generations first when stopping
    (else it would wait for every open stream to end)."""

    def __init__(
        self, config: uvicorn.Config, scheduler: Scheduler, on_ready: Callable[[], None] | None
    ) -> None:
        super().__init__(config)
        self._scheduler = scheduler
        self._on_ready = on_ready

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self._on_ready is not None:
            self._on_ready()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._scheduler.close()
        await super().shutdown(sockets)


def make_server(
    engine: Engine,
    *,
    api_key: str | None = None,
    cors_origins: Sequence[str] = (),
    max_queue: int = DEFAULT_MAX_QUEUE,
    on_ready: Callable[[], None] | None = None,
    log_level: str = "warning",
) -> uvicorn.Server:
    """A uvicorn server for the API over `engine`: `server.run(sockets=[sock])` serves on a bound
    socket (`edgespec.cli_serve.bind`) until Ctrl-C, or `server.should_exit = True` from another
    thread. Arguments as for `create_app`; `on_ready()` is called once it accepts connections."""
    app = create_app(engine, api_key=api_key, cors_origins=cors_origins, max_queue=max_queue)
    config = uvicorn.Config(
        app,
        lifespan="on",
        log_level=log_level,
        access_log=log_level in ("info", "debug"),
        timeout_graceful_shutdown=5,
    )
    return _Server(config, app.state.scheduler, on_ready)
