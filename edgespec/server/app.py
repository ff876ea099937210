"""`edgespec serve`: an OpenAI-compatible HTTP API over one `Engine`.

Endpoints: POST /v1/chat/completions and /v1/completions (streamed as server-sent events with
`"stream": true`), GET /v1/models, GET /v1/models/{id}, and GET /health (no API key needed).

Requests are checked (`openai_format`) before they wait in the bounded first-in first-out queue
(`serving.Scheduler`); a response starts once its job's first event exists, so an error found when
the engine starts is still a proper 400. When a client goes away, its job is dropped or cancelled.
Errors are OpenAI-style bodies, {"error": {"message", "type", "param", "code"}}, with a one-line
message; a stream that fails after it started ends with such a body as its last event.

Limits that keep one client from hurting the others (arguments of `make_server`, flags of
`edgespec serve`):
- A request body over `max_body_bytes` (8 MiB) is answered 413. Past the limit it is read on and
  thrown away, never kept, so that a client that sends its whole body before it reads (most do)
  gets the 413 and not a reset connection; a body announced (Content-Length) or found to be over
  8 times the limit is refused at once. 8 MiB is about two million tokens of English text, more
  than any context edgespec runs; a prompt under the limit that does not fit the context gets a
  400 that says so.
- A body that stops arriving for `client_timeout` seconds (60) is answered 408, so a client that
  sends slowly, or never finishes, holds only its own connection (nothing is queued before the
  whole body is in).
- A stream whose client reads nothing for `client_timeout` seconds is cancelled and its connection
  closed. A slow but steady reader gets its whole answer; the engine never waits for a reader:
  the generation runs on and its chunks wait in memory, at most a context's worth.
- A request line and headers over 16 KiB, or anything that is not HTTP, are refused by uvicorn's
  HTTP parser, h11 (chosen explicitly, so these limits are the same wherever edgespec runs): a
  400 in plain text, and a one-line warning in the log.
- uvicorn's `limit_concurrency` is left off: it counts idle and half-sent connections too, so a
  few stalled clients would get everyone else refused. Each connection costs a bounded amount of
  memory (the limits above), and requests run from the bounded queue, one at a time or
  `--parallel` at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from edgespec import __version__
from edgespec.errors import EdgespecError, PromptError, SettingsError
from edgespec.server.guard import RequestGuard
from edgespec.server.openai import Params, Reply, as_api_error, messages, params, prompt, sse
from edgespec.server.pool import ModelPool
from edgespec.server.queue import DEFAULT_MAX_QUEUE, APIError, Job, Prepared, Scheduler, shutting_down

if TYPE_CHECKING:
    from edgespec.api import Engine
    from edgespec.engine import TokenLogprob
    from edgespec.tools import ToolPlan

__all__ = ["DEFAULT_CLIENT_TIMEOUT", "DEFAULT_MAX_BODY_BYTES", "create_app", "make_server"]

log = logging.getLogger("edgespec.server")

DEFAULT_MAX_BODY_BYTES = 8 * 1024 * 1024
DEFAULT_CLIENT_TIMEOUT = 60.0
_DISCARD_FACTOR = 8


class _ClientGone(Exception):
    """The client closed its connection before its request was read: nobody reads an answer."""


class _ClientStalled(Exception):
    """The client read nothing of its stream for `client_timeout` seconds."""


def _error_response(error: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else {}
    if error.status in (408, 413) or error.code == "shutting_down":  # the rest of the body may still be
        # on its way: do not read it
        headers["Connection"] = "close"
    return JSONResponse(error.body(), status_code=error.status, headers=headers or None)


def _too_large(max_bytes: int) -> APIError:
    return APIError(
        413,
        f"the request body is larger than {max_bytes} bytes (edgespec serve --max-body-bytes)",
        code="request_too_large",
    )


async def _receive(request: Request, timeout: float) -> tuple[bytes, bool]:
    """The next piece of the request body and whether more follows; a 408 APIError when nothing
    arrives for `timeout` seconds, `_ClientGone` when the client leaves, and a 503 once the server
    starts shutting down (so a body still arriving is answered before the shutdown's grace period
    ends, instead of being cancelled into a plain-text 500)."""
    stopping: asyncio.Event = request.app.state.stopping
    if stopping.is_set():
        raise shutting_down()
    receiver = asyncio.ensure_future(request.receive())
    stopper = asyncio.ensure_future(stopping.wait())
    try:
        await asyncio.wait({receiver, stopper}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        stopper.cancel()
        if not receiver.done():
            receiver.cancel()
    if receiver.done() and not receiver.cancelled():
        message = receiver.result()
    elif stopping.is_set():
        raise shutting_down()
    else:
        raise APIError(
            408,
            f"the request body stopped arriving: nothing came for {timeout:g} s "
            "(edgespec serve --client-timeout)",
            code="request_timeout",
        ) from None
    if message["type"] == "http.disconnect":
        raise _ClientGone
    return message.get("body", b""), message.get("more_body", False)


async def _read_body(request: Request, max_bytes: int, timeout: float) -> bytes:
    """The request body, read as it arrives; a 413 APIError once it passes `max_bytes` (or says it
    will), a 408 when nothing arrives for `timeout` seconds, `_ClientGone` if the client leaves.

    An oversized body is read on and thrown away, up to `_DISCARD_FACTOR` times the limit, before
    the 413 goes out: most clients send the whole body before they read the answer, and closing
    the connection under a client still sending resets it, so it would see "connection reset"
    instead of the 413. Beyond that (or announced beyond it) the 413 goes out at once.
    """
    declared = request.headers.get("content-length", "")
    announced = int(declared) if declared.isdigit() else 0
    most = max_bytes * _DISCARD_FACTOR  # read, kept or not
    if announced > most:
        raise _too_large(max_bytes)
    chunks: list[bytes] = []
    size, more = 0, True
    while more and size <= most:
        try:
            chunk, more = await _receive(request, timeout)
        except APIError as exc:
            if exc.status == 408 and max(size, announced) > max_bytes:
                break  # too large anyway: say so
            raise
        size += len(chunk)
        if max(size, announced) <= max_bytes:
            chunks.append(chunk)
        else:
            chunks.clear()  # read on, and throw away
    if max(size, announced) > max_bytes:
        raise _too_large(max_bytes)
    return b"".join(chunks)


async def _json_body(request: Request, max_bytes: int, timeout: float) -> dict[str, Any]:
    raw = await _read_body(request, max_bytes, timeout)
    try:
        body = json.loads(raw)
    except RecursionError:
        raise APIError(400, "the request body is not valid JSON: it is nested too deeply") from None
    except ValueError as exc:  # UnicodeDecodeError included
        raise APIError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    return body


def _tool_plan(engine: Engine, request_params: Params) -> ToolPlan:
    """The request's tools as a plan (a 400 naming the field when they are malformed, or when
    they come with a response_format)."""
    tools = request_params.tools or {}
    try:
        plan = engine.plan_tools(tools["tools"], tools.get("tool_choice"), tools.get("parallel_tool_calls"))
    except SettingsError as e:
        name = str(e).split(" ", 1)[0]
        field = next((f for f in ("tool_choice", "parallel_tool_calls") if name.startswith(f)), "tools")
        raise APIError(400, str(e), param=field) from None
    if plan.grammar is not None and "grammar" in request_params.options:
        raise APIError(400, "tools cannot be combined with a response_format", param="response_format")
    return plan


def _prepare(engine: Engine, name: str, chat: bool, text: Any, request_params: Params) -> Prepared:
    """A request made ready for `engine`: its tokens and options, checked, and its `Reply`
    (a 400 APIError or PromptError when it does not fit this engine)."""
    plan = None if request_params.tools is None else _tool_plan(engine, request_params)
    if chat:
        tokens = engine.chat_tokens(text, None if plan is None else plan.tools)
    else:
        tokens = engine.tokenize(text, raw=True)
    if len(tokens) >= engine.n_ctx:
        raise PromptError(
            f"the prompt has {len(tokens)} tokens but the context holds {engine.n_ctx}; shorten it or "
            "restart the server with a larger --ctx"
        )
    # No max_tokens, or more than the context has room for: until the context is full.
    room = engine.n_ctx - len(tokens)
    options = {
        **request_params.options,
        "max_tokens": min(request_params.options.get("max_tokens", room), room),
    }
    if plan is not None and plan.grammar is not None:
        options["grammar"] = plan.grammar
    engine.check_options(**options)  # types and ranges, before the request waits in the queue
    draft_max = options.get("draft_max", engine.draft_max)
    reply = Reply(
        chat, name, request_params.include_usage, engine.draft_name, draft_max, plan, "logprobs" in options
    )
    return Prepared(engine, tokens, options, reply)


async def _stream_events(first: tuple[str, Any], job: Job, reply: Reply) -> AsyncIterator[str]:
    if reply.chat:
        yield sse(reply.chunk(role=True))
    kind, value = first
    text, shown = "", 0  # the answer so far, and how much of it was sent
    pending: list[TokenLogprob] = []  # logprobs of the tokens whose text was not sent yet
    while kind == "chunk":
        text += value.text  # a stream's chunks add up to its result's text (api.Stream)
        if value.logprob is not None:
            pending.append(value.logprob)
        safe = reply.safe_text(text)  # with tools, a call's text is held back
        if safe > shown:
            yield sse(reply.chunk(text[shown:safe], logprobs=pending))
            shown, pending = safe, []
        kind, value = await job.events.get()
    if kind == "error" or value.finish_reason == "cancelled":
        yield sse(as_api_error(value if kind == "error" else shutting_down()).body())
        return
    for chunk in reply.last_chunks(value, shown, pending):
        yield sse(chunk)
    yield "data: [DONE]\n\n"


class _EventStream(StreamingResponse):
    """Server-sent events that cancel their job however the response ends (client gone included).

    A write that waits more than `timeout` seconds for the client to read (the connection's buffers
    are full) ends the stream, and `drop(scope)` closes the connection at once.
    """

    def __init__(
        self,
        events: AsyncIterator[str],
        on_close: Callable[[], None],
        timeout: float,
        drop: Callable[[Any], bool],
    ) -> None:
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close
        self._timeout = timeout
        self._drop = drop

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        async def send_in_time(message: Any) -> None:
            try:
                await asyncio.wait_for(send(message), self._timeout)
            except asyncio.TimeoutError:
                raise _ClientStalled from None

        try:
            await super().__call__(scope, receive, send_in_time)
        except _ClientStalled:
            client = scope.get("client")
            who = f"{client[0]}:{client[1]}" if client else "a client"
            log.warning("%s read nothing of its stream for %g s: dropped it", who, self._timeout)
            if self._drop(scope):  # the server closes the connection soon: wait until it has
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(_until_disconnect(receive), 5)
        finally:
            self._on_close()


async def _until_disconnect(receive: Callable[[], Awaitable[MutableMapping[str, Any]]]) -> None:
    """Return once the client has gone away (the request body has been read already)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def _first_event(request: Request, job: Job) -> tuple[str, Any] | None:
    """The job's first event, or None if the client goes away before it comes."""
    getter = asyncio.ensure_future(job.events.get())
    watcher = asyncio.ensure_future(_until_disconnect(request.receive))
    try:
        await asyncio.wait({getter, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not getter.done():
            getter.cancel()
    return getter.result() if getter.done() and not getter.cancelled() else None


# -- the application ----------------------------------------------------------------------------


def create_app(
    engine: Engine | ModelPool,
    *,
    api_key: str | None = None,
    cors_origins: Sequence[str] = (),
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    client_timeout: float = DEFAULT_CLIENT_TIMEOUT,
    local_only: bool = False,
) -> FastAPI:
    """The OpenAI-compatible API over `engine` (which the caller keeps and closes).

    Args:
        engine: the one engine that answers every request, or a `ModelPool` whose offered models
            requests choose among with their `model` field.
        api_key: when set, /v1 requests need the header `Authorization: Bearer KEY`.
        cors_origins: origins whose web pages may call the API ("*": any); none by default.
        max_queue: the most requests accepted at once, the running ones included; more get 503.
        max_body_bytes: the largest request body accepted; larger ones get 413.
        client_timeout: seconds a client may send nothing of its request body (then 408), or read
            nothing of a stream (then it is dropped).
        local_only: the server listens on a loopback address only: requests must name a local
            host (`guard.RequestGuard`, against DNS rebinding).
    """
    problem = api_key_problem(api_key)
    if problem is not None:
        raise SettingsError(problem)
    if max_body_bytes < 1:
        raise SettingsError(f"max_body_bytes must be at least 1, got {max_body_bytes}")
    if not client_timeout > 0:
        raise SettingsError(f"client_timeout must be above 0 seconds, got {client_timeout}")
    pool = engine if isinstance(engine, ModelPool) else ModelPool(engine)
    scheduler = Scheduler(pool, max_queue, workers=pool.parallel)

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
    app.state.stopping = asyncio.Event()  # set by make_server's server when it starts shutting down
    app.state.drop_connection = None  # set by make_server: closes a stalled client's connection

    def drop(scope: Any) -> bool:
        hook = app.state.drop_connection
        return hook is not None and bool(hook(scope))

    if cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["*"],
        )
    app.add_middleware(RequestGuard, cors_origins=list(cors_origins), local_only=local_only)  # outermost
    _add_error_handlers(app)
    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_authorizer(api_key))])

    async def complete(request: Request, chat: bool) -> Response:
        body = await _json_body(request, max_body_bytes, client_timeout)
        request_params = params(body, chat)
        name = pool.choose(body.get("model"))
        text = messages(body) if chat else prompt(body)

        def prepare(engine: Engine) -> Prepared:
            return _prepare(engine, name, chat, text, request_params)

        with pool.lease(name) as engine:  # None: another model is loaded; the worker prepares it
            ready = None if engine is None else await asyncio.to_thread(prepare, engine)
        job = Job(name, prepare, request_params.stream, ready)
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
        assert job.prepared is not None  # the worker made it ready before its first event
        reply = job.prepared.reply
        if request_params.stream:
            events = _stream_events(first, job, reply)
            return _EventStream(events, lambda: scheduler.cancel(job), client_timeout, drop)
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
        return {"object": "list", "data": pool.listing()}

    @v1.get("/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> dict[str, Any]:
        for model in pool.listing():
            if model["id"] == model_id:
                return model
        served = f"serves {pool.ids()[0]!r}" if not pool.several else "offers other models (GET /v1/models)"
        raise APIError(404, f"no model {model_id!r}: this server {served}", code="model_not_found")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        several = {"models": len(pool.ids()), "switches": pool.switches} if pool.several else {}
        return {"status": "ok", **scheduler.health(), **several}

    app.include_router(v1)
    return app


def api_key_problem(api_key: str | None) -> str | None:
    """Why no request could ever match `api_key` (None: it can). A sent key is read without the
    white space around it (`_authorizer`), so a stored key with some would never match."""
    if api_key is None:
        return None
    if not api_key.strip():
        return "the API key is empty"
    if api_key != api_key.strip():
        return "the API key starts or ends with white space, so no request could match it"
    return None


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

    async def client_gone(_request: Request, _exc: Exception) -> Response:
        return Response(status_code=499)  # nobody reads it

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
    app.add_exception_handler(_ClientGone, client_gone)
    app.add_exception_handler(EdgespecError, api_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, api_error)  # a bug: 500, one line (the log has the traceback)


# -- running it -------------------------------------------------------------------------------------


class _Server(uvicorn.Server):
    """uvicorn's server, telling when it is ready, and cancelling generations first when stopping
    (else it would wait for every open stream to end)."""

    def __init__(
        self,
        config: uvicorn.Config,
        scheduler: Scheduler,
        on_ready: Callable[[], None] | None,
        stopping: asyncio.Event,
    ) -> None:
        super().__init__(config)
        self._scheduler = scheduler
        self._on_ready = on_ready
        self._stopping = stopping

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started and self._on_ready is not None:
            self._on_ready()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._stopping.set()  # bodies still being read are answered 503 at once
        self._scheduler.close()
        await super().shutdown(sockets)

    def drop_connection(self, scope: Any) -> bool:
        """Close the connection that carries the request `scope` now, without waiting for its
        client to read what is buffered (a stalled client). Returns whether it was found."""
        for connection in list(self.server_state.connections):
            cycle = getattr(connection, "cycle", None)
            transport = getattr(connection, "transport", None)
            if cycle is not None and getattr(cycle, "scope", None) is scope and transport is not None:
                transport.abort()
                return True
        return False


def make_server(
    engine: Engine | ModelPool,
    *,
    api_key: str | None = None,
    cors_origins: Sequence[str] = (),
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    client_timeout: float = DEFAULT_CLIENT_TIMEOUT,
    local_only: bool = False,
    on_ready: Callable[[], None] | None = None,
    log_level: str = "warning",
) -> uvicorn.Server:
    """A uvicorn server for the API over `engine`: `server.run(sockets=[sock])` serves on a bound
    socket (`edgespec.cli.serve.bind`) until Ctrl-C, or `server.should_exit = True` from another
    thread. Arguments as for `create_app`; `on_ready()` is called once it accepts connections."""
    app = create_app(
        engine,
        api_key=api_key,
        cors_origins=cors_origins,
        max_queue=max_queue,
        max_body_bytes=max_body_bytes,
        client_timeout=client_timeout,
        local_only=local_only,
    )
    config = uvicorn.Config(
        app,
        http="h11",  # the same parser and limits everywhere, httptools installed or not
        lifespan="on",
        log_level=log_level,
        access_log=log_level in ("info", "debug"),
        timeout_graceful_shutdown=5,
    )
    server = _Server(config, app.state.scheduler, on_ready, app.state.stopping)
    app.state.drop_connection = server.drop_connection
    return server
