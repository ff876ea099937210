"""The Python API against a hostile caller (issue 17): odd input types, text without a UTF-8 form,
and every public method at once from several threads, closing included.

The races run in a child interpreter, so that a crash (a native call on a freed model) fails the
test with its exit code instead of taking pytest down.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from edgespec import Engine
from edgespec.errors import PromptError, SettingsError


@pytest.fixture(scope="module")
def engine(tiny_pair):
    with Engine(tiny_pair[0], "none", n_ctx=256, threads=1, kernels="fast") as engine:
        yield engine


# -- fault 8: input types ----------------------------------------------------------------------


def test_bytes_are_refused_not_read_as_token_ids(engine):
    for data in (b"hi", bytearray(b"hi"), memoryview(b"hi")):
        with pytest.raises(PromptError, match="the prompt is bytes: give text"):
            engine.generate(data, max_tokens=2)


@pytest.mark.parametrize("ids", [[-1], [10**9], [1, 2, "3"], [1.0], [True]])
def test_ids_outside_the_vocabulary_or_not_integers_are_prompt_errors(engine, ids):
    with pytest.raises(PromptError, match=r"token \d+ of the prompt"):
        engine.generate(ids, max_tokens=2)


def test_ids_in_any_integer_form_are_accepted(engine):
    ids = engine.tokenize("the cat", raw=True)
    expected = engine.generate(ids, max_tokens=4).tokens
    assert engine.generate(np.array(ids), max_tokens=4).tokens == expected
    assert engine.generate(tuple(np.int32(i) for i in ids), max_tokens=4).tokens == expected


def test_a_prompt_that_is_neither_text_nor_ids_is_a_prompt_error(engine):
    with pytest.raises(PromptError, match="got int"):
        engine.generate(5, max_tokens=2)  # type: ignore[arg-type]


# -- fault 2: lone surrogates --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("call", "says"),
    [
        (lambda e: e.generate("hi \udcff", max_tokens=2), "the prompt is not valid Unicode: .* byte 0xFF"),
        (lambda e: e.generate("hi \ud800", raw=True), r"the prompt is not .* surrogate U\+D800"),
        (lambda e: e.generate("hi", system="\udfff"), "the system message is not valid Unicode"),
        (lambda e: e.tokenize("a\udcffb"), "character 1 is the byte 0xFF"),
        (lambda e: e.chat([{"role": "user", "content": "ok"}, {"role": "user", "content": "\ud83d"}]),
         r"messages\[1\]\.content is not valid Unicode"),
    ],
)  # fmt: skip
def test_text_without_a_utf8_form_is_a_prompt_error(engine, call, says):
    with pytest.raises(PromptError, match=says):
        call(engine)
    assert engine.generate("hi", max_tokens=2).text is not None  # the engine is still usable


# -- fault 3 and the concurrency stress test ---------------------------------------------------


def run_child(script: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=timeout
    )


def test_closing_while_another_thread_tokenizes_never_crashes(tiny_pair):
    """Before the fix: `tokenize` ran llama_tokenize outside every lock, and close() freed the
    model under it (exit 139, 3 of 3 runs). Now close waits for it; calls after close raise."""
    done = run_child(
        f"""
        import threading
        from edgespec import Engine
        from edgespec.errors import EdgespecError

        for attempt in range(3):
            engine = Engine({str(tiny_pair[0])!r}, "none", n_ctx=256, threads=1, kernels="fast")
            started, outcome = threading.Event(), []

            def tokenize():
                started.set()
                try:
                    outcome.append(len(engine.tokenize("word " * 200000, raw=True)))
                except EdgespecError as exc:
                    outcome.append(str(exc))

            thread = threading.Thread(target=tokenize)
            thread.start()
            started.wait()
            engine.close()
            thread.join()
            assert outcome and (isinstance(outcome[0], int) or outcome[0] == "the engine is closed"), outcome
            try:
                engine.tokenize("after", raw=True)
            except EdgespecError as exc:
                assert str(exc) == "the engine is closed"
            else:
                raise AssertionError("tokenize after close")
        print("ok")
        """
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", (done.returncode, done.stderr[-3000:])


def test_every_public_method_from_several_threads_at_once(tiny_pair):
    """tokenize, chat_tokens, generate, stream, chat, cancel, reset and close from eight threads
    for a bounded time on the tiny pair: only EdgespecError subclasses (busy, closed) may come
    out, nothing hangs, and the interpreter survives the close in the middle of it all."""
    done = run_child(
        f"""
        import random, threading, time
        from edgespec import Engine
        from edgespec.errors import EdgespecError

        engine = Engine({str(tiny_pair[0])!r}, {str(tiny_pair[1])!r}, n_ctx=256, threads=1,
                        kernels="fast", draft_max=4)
        messages = [{{"role": "user", "content": "the cat sat"}}]
        stop_at = time.monotonic() + 6
        unexpected, counts = [], {{}}

        def worker(seed):
            rng = random.Random(seed)
            while time.monotonic() < stop_at:
                what = rng.choice(
                    ["tokenize", "chat_tokens", "generate", "stream", "chat", "cancel", "reset"]
                )
                try:
                    if what == "tokenize":
                        engine.tokenize("once upon a time " * rng.randint(1, 50), raw=True)
                    elif what == "chat_tokens":
                        engine.chat_tokens(messages)
                    elif what == "generate":
                        engine.generate("once upon a time", max_tokens=rng.randint(1, 12), timeout=0.5)
                    elif what == "stream":
                        with engine.stream("the dog", max_tokens=8, timeout=0.5) as stream:
                            for i, _chunk in enumerate(stream):
                                if i == 2 and rng.random() < 0.5:
                                    break
                    elif what == "chat":
                        engine.chat(messages, max_tokens=6, timeout=0.5, temperature=0.8)
                    elif what == "cancel":
                        engine.cancel()
                    else:
                        engine.reset()
                    counts[what] = counts.get(what, 0) + 1
                except EdgespecError:
                    counts[what + " refused"] = counts.get(what + " refused", 0) + 1
                except BaseException as exc:
                    unexpected.append(f"{{what}}: {{type(exc).__name__}}: {{exc}}")

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
        time.sleep(4)
        engine.close()  # in the middle of it all
        for t in threads:
            t.join(30)
            assert not t.is_alive(), "a thread hangs"
        assert not unexpected, unexpected[:5]
        assert counts.get("generate", 0) + counts.get("stream", 0) + counts.get("chat", 0) > 0, counts
        print("ok", sorted(counts.items()))
        """
    )
    assert done.returncode == 0 and done.stdout.startswith("ok"), (done.returncode, done.stderr[-3000:])


# -- faults 1 and 6 through the API --------------------------------------------------------------


def test_an_unwritable_profile_folder_is_a_warning_for_the_api(tiny_pair, tmp_path, monkeypatch, caplog):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("EDGESPEC_CONFIG_DIR", str(blocker / "config"))
    notes: list[str] = []
    with (
        caplog.at_level(logging.WARNING, logger="edgespec"),
        Engine(
            tiny_pair[0], tiny_pair[1], profile="cpu-only", n_ctx=256, threads=1, on_note=notes.append
        ) as e,
    ):
        assert e.generate("hi", max_tokens=3).stats.n_generated == 3
    warned = [n for n in notes if "could not save it" in n]
    assert len(warned) == 1 and "for this run only" in warned[0], notes


def test_more_threads_than_cores_is_capped_for_the_api(tiny_pair, caplog):
    cores = os.cpu_count() or 1
    with (
        caplog.at_level(logging.WARNING, logger="edgespec"),
        Engine(tiny_pair[0], "none", n_ctx=256, threads=1000, kernels="fast") as e,
    ):
        assert e.generate("hi", max_tokens=2).stats.n_generated == 2
    assert f"threads 1000 is more than this machine's {cores} logical cores: using {cores}" in caplog.text
    with pytest.raises(SettingsError, match="threads must be a whole number of at least 1"):
        Engine(tiny_pair[0], "none", threads=0)
