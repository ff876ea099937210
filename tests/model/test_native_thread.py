"""Every llama_decode runs on one thread (`edgespec.runtimes.native`), whichever thread asks: the
contexts on the CPU share the process's CPU thread (one OpenMP team), a GPU context has its own."""

from __future__ import annotations

import _thread
import threading
import time

import pytest

import edgespec.runtimes.llama_cpp as lc
from edgespec.runtimes.llama_cpp import LlamaCppRuntime
from edgespec.runtimes.native import NativeThread, cpu_thread, for_layers

from ..conftest import TINY_SETTINGS


def test_cpu_contexts_decode_on_one_thread_whoever_calls(tiny_pair, monkeypatch):
    seen: list[int] = []
    decode = lc._ll.llama_decode

    def recording(ctx, batch):
        seen.append(threading.get_ident())
        return decode(ctx, batch)

    monkeypatch.setattr(lc._ll, "llama_decode", recording)
    with (
        LlamaCppRuntime(tiny_pair[0], TINY_SETTINGS) as target,
        LlamaCppRuntime(tiny_pair[1], TINY_SETTINGS) as draft,
    ):
        target.eval([1, 2, 3], "last")  # from this thread
        callers = [threading.Thread(target=rt.eval, args=([4], "last")) for rt in (target, draft)]
        for thread in callers:
            thread.start()
            thread.join()
        shared = cpu_thread()._thread
        assert shared is not None and target._native is draft._native is cpu_thread()
        assert set(seen) == {shared.ident}  # the invariance probe of the exact kernels too
        assert list(target.tokens) == [1, 2, 3, 4] and list(draft.tokens) == [4]
    assert shared.is_alive()  # the CPU thread outlives the contexts: its team is the only one


def test_a_gpu_context_gets_a_thread_of_its_own():
    cpu, own = for_layers(0)
    assert cpu is cpu_thread() and not own
    gpu, own = for_layers(-1)
    try:
        assert own and gpu is not cpu_thread()
        assert gpu.call(threading.get_ident) != cpu_thread().call(threading.get_ident)
    finally:
        gpu.stop()


def test_calls_run_in_order_and_their_errors_reach_the_caller():
    native = NativeThread("test-native")
    try:
        idents = {native.call(threading.get_ident) for _ in range(3)}
        assert len(idents) == 1 and threading.get_ident() not in idents
        with pytest.raises(ZeroDivisionError):
            native.call(lambda: 1 / 0)
        assert native.call(lambda a, b: a + b, 2, 3) == 5  # still serving after an error
    finally:
        first = native._thread
        native.stop()
    assert first is not None and not first.is_alive()
    assert native.call(lambda: threading.current_thread().name) == "test-native"  # starts anew
    assert native._thread is not first
    native.stop()


def test_ctrl_c_waits_for_the_call_to_finish():
    native = NativeThread("test-native")
    finished: list[float] = []

    def slow() -> None:
        time.sleep(0.3)
        finished.append(time.monotonic())

    timer = threading.Timer(0.05, _thread.interrupt_main)
    timer.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            native.call(slow)
        raised = time.monotonic()
        assert finished and finished[0] <= raised  # the context is free when the caller sees Ctrl-C
    finally:
        timer.cancel()
        native.stop()


def test_the_yardstick_decodes_on_edgespecs_cpu_thread(tiny_pair, monkeypatch):
    """llama-cpp-python in the benchmark's process computes on the thread edgespec's contexts use:
    one OpenMP team, not a second one that makes both decode about 25% slower
    (`benchmarks/yardstick_threads.py`)."""
    import llama_cpp.llama_cpp as native_api

    from edgespec.bench.yardstick import LlamaCppPlain

    seen: list[int] = []
    decode = native_api.llama_decode

    def recording(ctx, batch):
        seen.append(threading.get_ident())
        return decode(ctx, batch)

    monkeypatch.setattr(native_api, "llama_decode", recording)
    with LlamaCppRuntime(tiny_pair[0], TINY_SETTINGS) as target:
        target.eval([1, 2, 3], "last")
        plain = LlamaCppPlain(tiny_pair[0], 256, 1)
        try:
            result = plain.complete([1, 2, 3], 4)
            chat = plain.chat([{"role": "user", "content": "hi"}], 3)
        finally:
            plain.close()
    shared = cpu_thread()._thread
    assert shared is not None and set(seen) == {shared.ident}
    assert len(seen) > 3 and result.n_generated >= 1 and chat.t_total > 0
