"""Every llama_decode of a context runs on the runtime's own thread (`edgespec.runtimes.native`),
whichever thread asks: one OpenMP team per context, none left behind in callers' threads."""

from __future__ import annotations

import _thread
import threading
import time

import pytest

import edgespec.runtimes.llama_cpp as lc
from edgespec.runtimes.llama_cpp import LlamaCppRuntime
from edgespec.runtimes.native import NativeThread

from ..conftest import TINY_SETTINGS


def test_a_runtime_decodes_on_its_own_thread_whoever_calls(tiny_pair, monkeypatch):
    seen: list[int] = []
    decode = lc._ll.llama_decode

    def recording(ctx, batch):
        seen.append(threading.get_ident())
        return decode(ctx, batch)

    monkeypatch.setattr(lc._ll, "llama_decode", recording)
    with LlamaCppRuntime(tiny_pair[0], TINY_SETTINGS) as rt:
        rt.eval([1, 2, 3], "last")  # from this thread
        callers = [threading.Thread(target=rt.eval, args=([4 + i], "last")) for i in range(2)]
        for thread in callers:
            thread.start()
            thread.join()
        native = rt._native._thread
        assert native is not None and native.is_alive()
        assert set(seen) == {native.ident} and threading.get_ident() not in seen
        assert list(rt.tokens) == [1, 2, 3, 4, 5]
    assert not native.is_alive()  # closing the runtime ends its thread (and the thread's team)


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
