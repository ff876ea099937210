"""`edgespec serve`: the OpenAI-compatible HTTP API on this machine (see `edgespec.server.app`).

FastAPI and uvicorn (the `server` extra) are imported only when the command runs, so the rest of
the command line works without them.
"""

from __future__ import annotations

import dataclasses
import errno
import ipaddress
import os
import socket
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from edgespec.cli.common import engine_from, engine_options, engine_spec, progress
from edgespec.errors import EdgespecError

if TYPE_CHECKING:
    from edgespec.api import Engine
    from edgespec.load.builder import EngineSpec
    from edgespec.load.registry import LocalModel

LOCAL = "local"
"""`--models local`: every usable model `edgespec models` lists."""


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to host:port (port 0: any free one), or an EdgespecError saying why not.

    Binding before the models load makes a taken port fail at once, not after seconds of loading.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except socket.gaierror as exc:
        raise EdgespecError(f"cannot listen on {host!r}: {exc.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        if os.name != "nt":  # allows a restart right after a stop; on Windows it would share the port
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as exc:
        sock.close()
        hint = (
            "; is a server running there already? choose another --port"
            if exc.errno == errno.EADDRINUSE
            else ""
        )
        raise EdgespecError(f"cannot listen on {host}:{port}: {exc.strerror or exc}{hint}") from None
    return sock


def url_of(sock: socket.socket) -> str:
    """http://HOST:PORT of a bound socket."""
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _loopback(sock: socket.socket) -> bool:
    return ipaddress.ip_address(sock.getsockname()[0].split("%")[0]).is_loopback


def offered_models(names: Sequence[str]) -> list[LocalModel]:
    """The models `--models` names, each once, as `edgespec models` lists them (a file it does
    not list is named `file:PATH`). Raises EdgespecError for a name that picks no usable model."""
    from edgespec.load import registry
    from edgespec.load.builder import resolve_model_path

    found = registry.find_models()
    out: dict[Path, LocalModel] = {}
    for name in names:
        if name == LOCAL:
            chosen = [m for m in found if m.error is None]
            if not chosen:
                raise EdgespecError("--models local: `edgespec models` finds no usable model here")
        else:
            path = resolve_model_path(name, "target").resolve()
            model = next((m for m in found if m.path.resolve() == path), None)
            if model is None:
                if not path.is_file():
                    raise EdgespecError(f"--models {name}: model file not found: {path}")
                model = registry.describe(path)
            if model.error is not None:
                raise EdgespecError(f"--models {name}: {model.name} cannot be used: {model.error}")
            chosen = [model]
        for model in chosen:
            out.setdefault(model.path.resolve(), model)
    return list(out.values())


def _opener(
    start: EngineSpec, start_path: Path, auto: bool = False, **extra: Any
) -> Callable[[Path], Engine]:
    """Opens the engine for an offered model's file: the start model as the command line says,
    any other with a drafter paired for it (`--profile auto`, or the profile given). With `auto`
    (--parallel auto), another model holds as many sequences as the start model, or fewer where
    the RAM (the loaded model already closed) does not hold their caches."""

    def open_model(path: Path) -> Engine:
        if path.resolve() == start_path.resolve():
            return engine_from(start, **extra)
        spec = dataclasses.replace(start, target=str(path), draft=None, profile=start.profile or "auto")
        if auto and spec.parallel > 1:
            from edgespec.load.builder import auto_parallel

            spec = dataclasses.replace(spec, parallel=auto_parallel(spec, spec.parallel)[0])
        return engine_from(spec, **extra)

    return open_model


class ParallelOption(click.ParamType):
    """--parallel: a whole number of at least 1, or "auto"."""

    name = "N|auto"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | str:
        if isinstance(value, int) and not isinstance(value, bool):
            n = value
        elif str(value).strip().lower() == "auto":
            return "auto"
        else:
            try:
                n = int(str(value).strip())
            except ValueError:
                self.fail(f"{value!r} is neither a whole number nor 'auto'", param, ctx)
        if n < 1:
            self.fail(f"{n} is below 1: at least one request runs at a time", param, ctx)
        return n


@click.command()
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on; 0.0.0.0 opens the server to other machines (then set --api-key). On a "
    "loopback address, requests must name a local host (against DNS rebinding).",
)
@click.option(
    "--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="0: any free port."
)
@click.option(
    "--api-key",
    envvar="EDGESPEC_API_KEY",
    default=None,
    help="Require the header 'Authorization: Bearer KEY' on /v1 requests (also $EDGESPEC_API_KEY).",
)
@click.option(
    "--cors-origin",
    "cors_origins",
    multiple=True,
    metavar="ORIGIN",
    help="Let web pages from ORIGIN call the API, e.g. http://localhost:3000 (repeatable; '*': any). "
    "None by default.",
)
@click.option(
    "--max-queue",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Most requests accepted at once, the running one included; more are answered 503.",
)
@click.option(
    "--max-body-bytes",
    type=click.IntRange(min=1024),
    default=8 * 1024 * 1024,  # server.DEFAULT_MAX_BODY_BYTES (not imported: fastapi would load)
    show_default=True,
    help="Largest request body accepted; larger ones are answered 413.",
)
@click.option(
    "--client-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,  # server.DEFAULT_CLIENT_TIMEOUT
    show_default=True,
    metavar="SECONDS",
    help="A client that sends nothing of its request body for this long is answered 408; one that "
    "reads nothing of a streamed answer for this long is dropped.",
)
@click.option(
    "--cache-prompt/--no-cache-prompt",
    default=True,
    show_default=True,
    help="Reuse the cached prefix of the previous request (a request's cache_prompt field "
    "overrides it). --no-cache-prompt evaluates every prompt whole, so greedy answers depend on "
    "the request alone, as `edgespec run` gives them.",
)
@click.option(
    "--parallel",
    type=ParallelOption(),
    default="auto",
    show_default=True,
    help="Requests generated at once: continuous batching, one context holding N sequences whose "
    "steps share the model's passes. Under --kernels exact each answer is the one it gets served "
    "alone. auto: 4, or fewer where the available RAM does not hold a KV cache of --ctx tokens "
    "per sequence; 1 with an ONNX drafter. --max-queue counts the running requests too. With --models, "
    "requests for the loaded model run at once, and one for another model waits until they end.",
)
@click.option(
    "--models",
    "offered",
    multiple=True,
    metavar="NAME",
    help="Also answer requests whose `model` names NAME (a name `edgespec models` lists, a path, "
    "ollama:NAME[:TAG] or hf:REPO...; repeatable; 'local': every listed model). One model is in "
    "memory at a time: the server switches between requests. Without it, the --target answers "
    "every request, whatever its `model`.",
)
@engine_options
@click.pass_context
def serve(
    click_ctx: click.Context,  # not `ctx`: --ctx is an engine option
    host: str,
    port: int,
    api_key: str | None,
    cors_origins: tuple[str, ...],
    max_queue: int,
    max_body_bytes: int,
    client_timeout: float,
    cache_prompt: bool,
    parallel: int | str,
    offered: tuple[str, ...],
    **flags: Any,
) -> None:
    """Serve an OpenAI-compatible HTTP API (chat and completions) on this machine.

    Endpoints: /v1/chat/completions, /v1/completions, /v1/models and /health. Requests run
    first come first served, up to 4 at once as the RAM allows (--parallel N: N at once, 1: one at
    a time); streamed answers are server-sent events, as OpenAI sends them.
    The request's `model` may be anything: the loaded target answers, unless --models offers
    several (then it picks one, and a name that fits none is a 404). Without a temperature,
    decoding is greedy; a max_tokens larger than the context has room for stops when it is full.
    Responses carry an extra `edgespec` field with the drafting statistics.

    \b
    Examples:
      edgespec serve
      edgespec serve --port 8000 --api-key "$(openssl rand -hex 16)" --cors-origin http://localhost:3000
      edgespec serve --models local
      edgespec serve --parallel 4 --kernels exact
      edgespec serve --parallel 1
      curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
          -d '{"model": "any", "messages": [{"role": "user", "content": "Hi!"}], "stream": true}'

    \b
    From Python, with the official client:
      client = openai.OpenAI(base_url="http://127.0.0.1:8080/v1", api_key="KEY or anything")
    """
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise EdgespecError(
            f'edgespec serve needs {exc.name or "fastapi and uvicorn"}: pip install "edgespec[server]"'
        ) from None
    from edgespec.server import app as server
    from edgespec.server.pool import ModelPool

    problem = server.api_key_problem(api_key)  # before the models load: exit 2
    if problem is not None:
        raise click.BadParameter(problem, param_hint="--api-key")
    if isinstance(parallel, int) and max_queue < parallel:
        raise click.BadParameter(
            f"{max_queue} is fewer than the {parallel} requests --parallel runs at once",
            param_hint="--max-queue",
        )
    log_level = "info" if flags["verbose"] else "warning"
    sock = bind(host, port)
    try:
        url = url_of(sock)
        if not _loopback(sock) and api_key is None:
            click.echo(
                f"warning: {url} is open to other machines without an API key (set --api-key)", err=True
            )
        spec = engine_spec(click_ctx, flags)
        models = offered_models(offered) if offered else []  # before the start model loads
        chosen = None
        if not isinstance(parallel, int):
            parallel, why = _auto_parallel(spec, max_queue)
            chosen = f"--parallel auto: {parallel} ({why})"
        spec = dataclasses.replace(spec, parallel=parallel)
        engine = engine_from(spec, cache_prompt=cache_prompt)
        if chosen is not None:  # once the models loaded: a start-up error stays one line
            click.echo(chosen, err=True)
        pool = ModelPool(
            engine,
            models,
            _opener(spec, engine.target_path, auto=chosen is not None, cache_prompt=cache_prompt),
        )
        try:
            what = f"{len(pool.ids())} models ({engine.model} loaded)" if pool.several else engine.model
            ready = f"serving {what} on {url}/v1 (OpenAI-compatible API; Ctrl-C to stop)"
            httpd = server.make_server(
                pool,
                api_key=api_key,
                cors_origins=cors_origins,
                max_queue=max_queue,
                max_body_bytes=max_body_bytes,
                client_timeout=client_timeout,
                local_only=_loopback(sock),
                on_ready=lambda: click.echo(ready, err=True),
                log_level=log_level,
            )
            httpd.run(sockets=[sock])
        finally:
            pool.close()
            engine.close()
    finally:
        sock.close()


def _auto_parallel(spec: EngineSpec, max_queue: int) -> tuple[int, str]:
    """What --parallel auto runs at once, and why (`edgespec.load.builder.auto_parallel`)."""
    from edgespec.load.builder import AUTO_PARALLEL, auto_parallel

    n, why = auto_parallel(spec, min(AUTO_PARALLEL, max_queue), progress=progress)
    if n == max_queue < AUTO_PARALLEL:
        why = f"--max-queue {max_queue} counts the running requests too"
    return n, why
