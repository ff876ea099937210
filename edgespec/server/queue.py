"""The request queue of `edgespec serve`: generations run first in first out, from a bounded
queue, by one worker thread (or one per slot of an engine with `parallel`), on the engine of the
model each request names (`pool`); their events reach the event loop through
`loop.call_soon_threadsafe`. Nothing here knows HTTP beyond the status codes of its errors.

When a client goes away its job is dropped if it is still waiting, or cancelled before the engine's
next step if it runs, so the engine is free for the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgespec.errors import EdgespecError, SettingsError

if TYPE_CHECKING:
    from edgespec.api import Engine, Stream
    from edgespec.server.pool import ModelPool

__all__ = ["DEFAULT_MAX_QUEUE", "APIError", "Job", "Prepared", "Scheduler", "shutting_down"]

log = logging.getLogger("edgespec.server")

DEFAULT_MAX_QUEUE = 8
MAX_MESSAGE_CHARS = 1000
"""Error messages are cut to this length: one that quotes a bad value (an 8 MiB string sent as a
temperature) stays one short line."""


@dataclass
class APIError(Exception):
    """An error answered with an OpenAI-style JSON body and an HTTP status."""

    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None

    def __str__(self) -> str:
        return self.message

    def body(self) -> dict[str, Any]:
        message = " ".join(line.strip() for line in self.message.splitlines() if line.strip())
        if len(message) > MAX_MESSAGE_CHARS:
            message = message[: MAX_MESSAGE_CHARS - 3] + "..."
        return {"error": {"message": message, "type": self.type, "param": self.param, "code": self.code}}


def shutting_down() -> APIError:
    return APIError(503, "the server is shutting down", type="server_error", code="shutting_down")


@dataclass(frozen=True)
class Prepared:
    """A request made ready for one engine: its prompt's tokens, its generation options, and what
    its answer needs (`reply`, opaque here)."""

    engine: Engine
    tokens: list[int]
    options: dict[str, Any]
    reply: Any


class Job:
    """One request's generation: run by the worker thread, heard of by the event loop.

    Events, in order: ("chunk", Chunk) when streaming, then ("done", Result) or ("error", exception).
    `prepare(engine)` makes the request ready for its model's engine; the worker calls it unless
    `prepared` was made for that very engine (before the job was queued, while it was loaded).
    """

    def __init__(
        self,
        model: str,
        prepare: Callable[[Engine], Prepared],
        streaming: bool,
        prepared: Prepared | None = None,
    ) -> None:
        self.model = model
        self.prepare = prepare
        self.prepared = prepared  # read by the event loop only after the job's first event
        self.streaming = streaming
        self.cancelled = False
        self.stream: Stream | None = None  # set by the worker, under the scheduler's lock
        self.events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()

    def push(self, kind: str, value: Any) -> None:
        """Hand an event to the event loop (from any thread)."""
        with contextlib.suppress(RuntimeError):  # the event loop has closed: nobody listens any more
            self._loop.call_soon_threadsafe(self.events.put_nowait, (kind, value))


class Scheduler:
    """Runs jobs first in first out, from a bounded queue: one at a time, or with `workers` > 1
    (an engine with `parallel` slots) that many at once, in the engine's shared passes.

    With several models (`pool.several`), a job starts beside running ones only when its model is
    the loaded one. A job for another model waits at the head of the queue, and the jobs behind it
    with it, until the running ones end; then its worker switches the model. A later request
    therefore never overtakes an earlier one, and a switch never closes a model under a running
    request.

    Args:
        pool: the models jobs run on (`job.model` names one).
        max_queue: the most jobs accepted at once, the running ones included; `submit` refuses more.
        workers: jobs run at once (the engine's `parallel`).
    """

    def __init__(self, pool: ModelPool, max_queue: int = DEFAULT_MAX_QUEUE, workers: int = 1) -> None:
        if max_queue < 1:
            raise SettingsError(f"max_queue must be at least 1, got {max_queue}")
        if max_queue < workers:
            raise SettingsError(
                f"max_queue ({max_queue}) must be at least the {workers} requests that run at once"
            )
        self.pool = pool
        self.max_queue = max_queue
        self.workers = workers
        self.running: list[Job] = []
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0, "rejected": 0}
        self._waiting: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._threads = [
            threading.Thread(target=self._work, name=f"edgespec-serve-{i}", daemon=True)
            for i in range(workers)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def submit(self, job: Job) -> None:
        """Queue a job, or raise a 503 APIError when the queue is full or the server is stopping."""
        with self._cond:
            if self._closed:
                raise shutting_down()
            if len(self._waiting) + len(self.running) >= self.max_queue:
                self.counts["rejected"] += 1
                raise APIError(
                    503,
                    f"the server is busy: {self.max_queue} requests are already running or waiting "
                    "(edgespec serve --max-queue); retry later",
                    type="server_error",
                    code="queue_full",
                )
            self._waiting.append(job)
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """Drop a waiting job, or stop a running one before its next step (its client went away)."""
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                self.counts["cancelled"] += 1
                return
            job.cancelled = True
            stream = job.stream
        if stream is not None:
            stream.cancel()

    def health(self) -> dict[str, Any]:
        with self._cond:
            return {
                "model": self.pool.loaded,
                "busy": bool(self.running),
                "running": len(self.running),
                "parallel": self.workers,
                "queued": len(self._waiting),
                "max_queue": self.max_queue,
                **self.counts,
            }

    def close(self) -> None:
        """Refuse new jobs, answer the waiting ones with 503 and cancel the running ones."""
        with self._cond:
            self._closed = True
            dropped = list(self._waiting)
            self._waiting.clear()
            self.counts["cancelled"] += len(dropped)
            running = list(self.running)
            self._cond.notify_all()
        for job in dropped:
            job.push("error", shutting_down())
        for job in running:
            self.cancel(job)

    def join(self, timeout: float | None = None) -> None:
        """Wait for the worker threads to stop (after `close`)."""
        for thread in self._threads:
            if thread.is_alive():
                thread.join(timeout)

    def _startable(self) -> bool:
        """Under the lock: whether the job at the head of the queue may start now: its model is
        loaded, or nothing runs and its worker may switch to it."""
        return bool(self._waiting) and (not self.running or self._waiting[0].model == self.pool.loaded)

    def _work(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._closed or self._startable())
                if not self._waiting:
                    return
                job = self._waiting.popleft()
                self.running.append(job)
            outcome, event = self._run(job)
            with self._cond:  # before the answer goes out: its client then sees the engine free
                self.running.remove(job)
                self.counts[outcome] += 1
                self._cond.notify_all()  # a job for another model may wait for the running ones
            job.push(*event)

    def _run(self, job: Job) -> tuple[str, tuple[str, Any]]:
        """Run one job to its end; return the counter it adds to and its last event."""
        try:
            engine = self.pool.engine_for(job.model)
            with self._cond:  # after a switch, the jobs behind this one for the same model may start
                self._cond.notify_all()
            if job.prepared is None or job.prepared.engine is not engine:
                job.prepared = job.prepare(engine)
            prepared = job.prepared
            stream = engine.stream(prepared.tokens, **prepared.options)
            with self._cond:
                job.stream = stream
                cancelled = job.cancelled
            with stream:
                if cancelled:
                    stream.cancel()
                for chunk in stream:
                    if job.cancelled:
                        break
                    if job.streaming:
                        job.push("chunk", chunk)
        except Exception as exc:
            if not isinstance(exc, (EdgespecError, APIError)):
                log.error("generation failed", exc_info=exc)
            return "failed", ("error", exc)
        result = stream.result
        assert result is not None
        return "cancelled" if result.finish_reason == "cancelled" else "completed", ("done", result)
