"""One thread for a llama.cpp context's computations.

llama.cpp's CPU backend, as llama-cpp-python builds it, runs each graph in an OpenMP parallel
region, and libgomp keeps a team of worker threads for every thread that has started one. Once
the threads of all the teams outnumber the CPUs, libgomp cuts the time a waiting thread spins
from about 300,000 turns to 100 (`gomp_throttled_spin_count_var`), so every barrier inside a graph
(one per operation) sleeps and wakes instead. A context decoded from whichever thread calls it
(the thread that loaded the model, checking its logits; then a server's worker, or each leader of
a shared pass) leaves a team behind in each such thread: on a 2-core CPU one step of the default
target took 45-50 ms from a second thread against 35 ms from the first
(`benchmarks/native_thread.py`).

So every `llama_decode` goes to one thread, whoever asks, and a caller waits for it; a Ctrl-C
pressed meanwhile is raised once the call has returned, so a context is never touched while it
computes. The contexts computing on the CPU share one thread for the whole process (`cpu_thread`):
a target and its draft model each on a thread of their own made two teams of 2 threads on a
2-core CPU, and the pair generated 10 tokens/s against 15 on one shared thread. A context with
layers on a GPU has a thread of its own (`for_layers`), so that a drafter there can draft while
the CPU verifies. On the CPU, overlapped drafting (`ModelDrafter(overlap=True)`) thus no longer
computes at the same time as verification: two teams on the same cores slowed both.
"""

from __future__ import annotations

import queue
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["NativeThread", "cpu_thread", "for_layers"]

T = TypeVar("T")


class _Job:
    __slots__ = ("args", "done", "error", "fn", "value")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        self.fn, self.args = fn, args
        self.done = threading.Event()
        self.value: Any = None
        self.error: BaseException | None = None


class NativeThread:
    """Runs calls one at a time on a thread of its own, started on the first call.

    Args:
        name: the thread's name.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the thread; its result, or its exception raised here."""
        if threading.current_thread() is self._thread:
            return fn(*args)
        job = _Job(fn, args)
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
                self._thread.start()
            self._jobs.put(job)
        try:
            job.done.wait()
        except BaseException:
            job.done.wait()  # Ctrl-C: the call finishes before anything touches its context again
            raise
        if job.error is not None:
            raise job.error
        return job.value  # type: ignore[no-any-return]

    def stop(self) -> None:
        """End the thread (its OpenMP team goes with it) once the calls sent before are done."""
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is not None:
                self._jobs.put(None)
        if thread is not None and thread is not threading.current_thread() and not sys.is_finalizing():
            thread.join()

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            try:
                job.value = job.fn(*job.args)
            except BaseException as exc:
                job.error = exc
            finally:
                job.done.set()


_CPU: NativeThread | None = None
_CPU_LOCK = threading.Lock()


def cpu_thread() -> NativeThread:
    """The one thread of the process on which every context computing on the CPU decodes."""
    global _CPU
    with _CPU_LOCK:
        if _CPU is None:
            _CPU = NativeThread("edgespec-native-cpu")
        return _CPU


def for_layers(gpu_layers: int) -> tuple[NativeThread, bool]:
    """The thread a context with `gpu_layers` layers on a GPU decodes on, and whether it is the
    context's own (to stop when the context closes): the shared CPU thread without GPU layers."""
    if gpu_layers == 0:
        return cpu_thread(), False
    return NativeThread("edgespec-native-gpu"), True
