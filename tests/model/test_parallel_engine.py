"""`Engine(parallel=N)`: calls from several threads generate together (continuous batching), and
each answer is the one the same call gets from an engine serving one call at a time."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from edgespec.api import Engine
from edgespec.errors import EngineBusy, SettingsError
from edgespec.load.builder import EngineSpec, auto_parallel
from edgespec.load.memory import memory_need

CALLS = [
    ("the cat sat on the", {}),
    ("once upon a time there was a", {"temperature": 0.8, "seed": 3}),
    ("a b c a b c a b", {"draft_max": 2}),
    ("hello world, the", {"temperature": 0.7, "top_k": 20, "seed": 9, "draft_max": 6}),
    ("def main(): return main", {"logprobs": 2}),
    ("one two three four one two", {"draft_max": 0}),
]


def open_engine(tiny_pair, parallel: int, draft: str | None = None) -> Engine:
    return Engine(
        tiny_pair[0],
        draft or tiny_pair[1],
        n_ctx=256,
        threads=1,
        kernels="exact",
        cache_prompt=False,
        parallel=parallel,
    )


def answer(engine: Engine, prompt: str, options: dict):
    result = engine.generate(prompt, raw=True, max_tokens=30, **options)
    return result.tokens, result.logprobs


@pytest.mark.parametrize("draft", [None, "ngram"])
def test_concurrent_calls_get_the_answers_served_alone(tiny_pair, draft):
    with open_engine(tiny_pair, 1, draft) as engine:
        alone = [answer(engine, prompt, options) for prompt, options in CALLS]
    with open_engine(tiny_pair, 3, draft) as engine:
        assert engine.parallel == 3 and engine.guarantee == "exact"
        with ThreadPoolExecutor(len(CALLS)) as pool:
            answers = list(pool.map(lambda call: answer(engine, *call), CALLS))
        assert answers == alone
        assert engine.running == 0 and not engine.busy
        stats = engine._slots.target.stats  # type: ignore[union-attr]
        assert stats.shared > 0 and stats.widest >= 2


def test_streams_run_side_by_side_and_close_cancels_them(tiny_pair):
    engine = open_engine(tiny_pair, 2)
    first = engine.stream("the cat sat", raw=True, max_tokens=200)
    second = engine.stream("once upon a time", raw=True, max_tokens=200)
    next(first), next(second)  # both hold a slot at once
    assert engine.running == 2 and engine.busy
    with pytest.raises(EngineBusy, match="every slot is busy"):
        engine.generate("hi", raw=True, max_tokens=2, timeout=0.05)
    closer = threading.Thread(target=engine.close)
    closer.start()
    for stream in (first, second):  # cancelled: they end before their next step
        list(stream)
        assert stream.result is not None and stream.result.finish_reason == "cancelled"
    closer.join(10)
    assert not closer.is_alive() and engine.closed


def test_closing_from_a_thread_holding_an_open_stream_is_engine_busy(tiny_pair):
    engine = open_engine(tiny_pair, 2)
    stream = engine.stream("the cat sat", raw=True, max_tokens=20)
    next(stream)
    # waiting for every slot would wait for this thread's own stream: refused, nothing cancelled
    with pytest.raises(EngineBusy, match="close the open stream before closing its engine"):
        engine.close()
    with pytest.raises(EngineBusy, match="close the open stream before closing or resetting"):
        engine.reset()
    assert not engine.closed
    list(stream)  # it was not cancelled: it ran to its end
    assert stream.result is not None and stream.result.finish_reason in ("length", "stop")
    engine.reset()
    engine.close()
    assert engine.closed


def test_parallel_must_be_a_whole_number_of_at_least_one(tiny_pair):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(SettingsError, match="parallel must be a whole number of at least 1"):
            open_engine(tiny_pair, bad)  # type: ignore[arg-type]


def test_parallel_auto_follows_the_available_ram_and_the_context(tiny_pair):
    target, draft = tiny_pair
    spec = EngineSpec(target, draft, n_ctx=256)
    needs = [memory_need(path, 256) for path in tiny_pair]
    weights = sum(n.weights for n in needs if n is not None)
    kv = sum(n.kv_cache for n in needs if n is not None)  # one sequence of 256 tokens, both models
    assert kv > 0
    gib = 1 << 30  # below 5 GiB available, 1 GiB is kept for the rest of the machine
    assert auto_parallel(spec, available=1 << 40) == (
        4,
        "the KV caches of 4 sequences of 256 tokens fit the available RAM",
    )
    assert auto_parallel(spec, most=2, available=1 << 40)[0] == 2
    assert auto_parallel(spec, available=gib + weights + 3 * kv)[0] == 3
    assert auto_parallel(spec, available=gib + weights + 3 * kv - 1)[0] == 2
    assert auto_parallel(spec, available=gib + weights + kv) == (
        1,
        "two KV caches of 256 tokens do not fit the available RAM",
    )
    # a longer context needs more per sequence
    assert auto_parallel(EngineSpec(target, draft, n_ctx=512), available=gib + weights + 3 * kv)[0] == 1
    # without a draft model only the target's cache counts
    target_kv = needs[0].kv_cache  # type: ignore[union-attr]
    ngram = EngineSpec(target, "ngram", n_ctx=256)
    assert auto_parallel(ngram, available=gib + needs[0].weights + 4 * target_kv)[0] == 4  # type: ignore[union-attr]
    assert auto_parallel(EngineSpec(target, "exported.onnx"), available=1 << 40) == (
        1,
        "an ONNX drafter holds one sequence",
    )
