"""Ctrl-C while a native call runs Python callbacks (`interrupt_after_native_call`, issue 17).

A ctypes callback stands in for llama.cpp's log and progress callbacks: C code (ctypes' call of a
function pointer) calls Python, and SIGINT arrives inside it.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import time

import pytest

from edgespec.runtimes.llama_cpp import interrupt_after_native_call

CALLBACK = ctypes.CFUNCTYPE(ctypes.c_int)


def native_call_that_calls_back(on_call) -> int:
    """Call `on_call` from C, as llama.cpp calls its log callback; returns what it returned."""
    pointer = CALLBACK(on_call)
    return ctypes.cast(pointer, CALLBACK)()


def ctrl_c_then_finish() -> int:
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(0.05)  # Python runs its signal handler at the next bytecode: inside this callback
    return 7


@pytest.fixture()
def unraisable(monkeypatch) -> list[type[BaseException]]:
    """What Python reports as "Exception ignored" (ctypes does so for a callback that raises)."""
    seen: list[type[BaseException]] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda info: seen.append(info.exc_type))
    return seen


def test_without_the_guard_a_callback_swallows_ctrl_c(unraisable):
    """The fault: the KeyboardInterrupt raised inside the callback is reported as "Exception
    ignored" and dropped, and the call goes on as if nothing was pressed."""
    assert native_call_that_calls_back(ctrl_c_then_finish) != 7  # the callback never finished
    assert unraisable == [KeyboardInterrupt]


def test_ctrl_c_inside_a_native_callback_is_raised_after_the_call(unraisable):
    results = []
    with pytest.raises(KeyboardInterrupt), interrupt_after_native_call() as pressed:
        results.append(native_call_that_calls_back(ctrl_c_then_finish))
        results.append(pressed.is_set())  # a callback can poll it to stop early
    assert results == [7, True]
    assert unraisable == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back


def test_no_ctrl_c_means_nothing_changes():
    with interrupt_after_native_call() as pressed:
        assert native_call_that_calls_back(lambda: 3) == 3
    assert not pressed.is_set()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
