"""The Python API (`edgespec.Engine`): results, streams, chat turns that reuse the KV caches,
one generation at a time across threads, cancellation, and clear errors."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

import edgespec
from edgespec import Engine, EngineBusy
from edgespec.drafting import ModelDrafter, common_prefix
from edgespec.engine import SpeculativeEngine
from edgespec.errors import EdgespecError, PromptError, SettingsError
from edgespec.load.builder import LoadedPair
from edgespec.runtimes.llama_cpp import LlamaCppRuntime

from ..conftest import TINY_SETTINGS

SETTINGS_LONG = TINY_SETTINGS.__class__(n_ctx=2048, n_threads=1)


class Counting:
    """A runtime wrapper that records the length of every `eval` call."""

    def __init__(self, inner: LlamaCppRuntime) -> None:
        self.inner = inner
        self.evals: list[int] = []

    def eval(self, tokens, logits="last"):
        self.evals.append(len(tokens))
        return self.inner.eval(tokens, logits)

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


@pytest.fixture()
def engine(tiny_pair):
    # Every prompt evaluated whole: these tests compare answers to one prompt asked several times.
    with Engine(tiny_pair[0], tiny_pair[1], n_ctx=256, threads=1, cache_prompt=False) as engine:
        yield engine


@pytest.fixture()
def counted(tiny_pair):
    """An engine whose target and draft runtimes count what they evaluate."""
    target = Counting(LlamaCppRuntime(tiny_pair[0], SETTINGS_LONG))
    draft = Counting(LlamaCppRuntime(tiny_pair[1], SETTINGS_LONG))
    pair = LoadedPair(SpeculativeEngine(target, ModelDrafter(draft)), tiny_pair[0], str(tiny_pair[1]))
    with Engine.from_pair(pair, draft_max=4) as engine:
        yield engine, target, draft


def test_import_is_lazy_and_names_the_api():
    assert edgespec.Engine is Engine
    assert "Engine" in edgespec.__all__
    with pytest.raises(AttributeError):
        edgespec.Nope  # noqa: B018


def test_generate_equals_target_only_and_streams_the_same(tiny_pair, engine):
    with Engine(tiny_pair[0], "none", n_ctx=256, threads=1) as plain:
        base = plain.generate("the cat sat", max_tokens=40)
    result = engine.generate("the cat sat", max_tokens=40)
    assert result.tokens == base.tokens and result.text == base.text
    assert result.finish_reason == "length" and result.completion_tokens == 40
    assert result.stats.n_drafted > 0 and result.prompt_tokens == len(engine.tokenize("the cat sat"))
    with engine.stream("the cat sat", max_tokens=40) as stream:
        chunks = list(stream)
    assert "".join(c.text for c in chunks) == base.text
    assert [c.token for c in chunks] == base.tokens
    assert any(c.from_draft for c in chunks)
    assert stream.result is not None and stream.result.tokens == base.tokens


def test_logprobs_come_with_the_result_and_each_chunk(tiny_pair, engine):
    with Engine(tiny_pair[0], "none", n_ctx=256, threads=1) as plain:
        base = plain.generate("the cat sat", max_tokens=30, logprobs=2)
    result = engine.generate("the cat sat", max_tokens=30, logprobs=2)
    assert result.stats.n_accepted > 0 and result.logprobs == base.logprobs
    assert result.logprobs is not None and [e.id for e in result.logprobs] == result.tokens
    assert all(len(e.top) == 2 and isinstance(e, edgespec.TokenLogprob) for e in result.logprobs)
    with engine.stream("the cat sat", max_tokens=30, logprobs=2) as stream:
        chunks = list(stream)
    assert tuple(c.logprob for c in chunks if c.token is not None) == result.logprobs
    assert engine.generate("the cat sat", max_tokens=3).logprobs is None


def test_text_held_back_to_the_end_comes_in_a_last_chunk(engine):
    """A possible stop string's start is held back while it may still complete; when generation
    ends first, the held-back text still reaches the stream, so its chunks add up to the result."""
    whole = engine.generate("hello world", max_tokens=30).text
    stop = whole[-3:] + "@@"  # its start ends the text, but it never completes
    with engine.stream("hello world", max_tokens=30, stop=stop) as stream:
        chunks = list(stream)
    assert stream.result is not None and stream.result.text == whole
    assert "".join(c.text for c in chunks) == whole
    assert chunks[-1].token is None and chunks[-1].text.endswith(whole[-3:])
    assert all(c.token is not None for c in chunks[:-1]) and len(chunks) == 31


def test_options_reach_the_generation(engine):
    first = engine.generate("hello world", max_tokens=30)
    stop = first.text.split()[3]
    stopped = engine.generate("hello world", max_tokens=30, stop=stop)
    assert stopped.finish_reason == "stop" and stop not in stopped.text
    assert first.text.startswith(stopped.text)
    sampled = [engine.generate("hi there", max_tokens=20, temperature=0.9, seed=5).tokens for _ in "ab"]
    assert sampled[0] == sampled[1] != first.tokens[:20]
    raw = engine.generate([1, 50, 60, 70], max_tokens=5, draft_max=0)
    assert raw.prompt_tokens == 4 and raw.stats.n_drafted == 0


def test_without_a_profile_flash_attention_is_off_as_in_llama_cpp_python(engine):
    # On a CPU it made a step 19% slower at 2,000-3,500 tokens (benchmarks/flash_attn.py), and
    # llama-cpp-python's Llama, the yardstick, runs it off.
    assert engine._pair.engine.target.settings.flash_attn == "off"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"temperature": "hot"}, "temperature must be a number"),
        ({"max_tokens": 0}, "max_tokens must be at least 1"),
        ({"max_tokens": 2.5}, "max_tokens must be an integer"),
        ({"top_p": 2.0}, "top_p must be in (0, 1]"),
        ({"stop": [1]}, "stop must be a string or a list of strings"),
        ({"colour": "red"}, "unknown option 'colour'"),
        ({"seed": -1}, "seed must be between 0 and 2**64 - 1"),
        ({"logit_bias": {10**6: 1.0}}, "logit_bias token 1000000 is not in the vocabulary"),
        ({"cache_prompt": 1}, "cache_prompt must be true or false"),
        ({"logit_bias": {5: 1e308}}, "must be a number within ±1e30, or -inf"),
        ({"logprobs": True}, "logprobs must be an integer"),
        ({"logprobs": 21}, "logprobs must be between 0 and 20 alternatives"),
    ],
)
def test_bad_options_are_one_line_settings_errors(engine, options, message):
    with pytest.raises(SettingsError, match=None) as info:
        engine.generate("hi", **options)
    assert message in str(info.value) and "\n" not in str(info.value)
    assert not engine.busy  # the engine was never taken


def test_banning_every_token_is_refused_not_answered_with_token_0(engine):
    n_vocab = engine._pair.engine.target.vocab.n_vocab
    with pytest.raises(SettingsError, match="logit_bias bans every token"):
        engine.generate("hi", logit_bias=dict.fromkeys(range(n_vocab), float("-inf")))


@pytest.mark.parametrize(
    "messages",
    [[], "hello", [{"role": "robot", "content": "x"}], [{"role": "user"}], [{"role": "user", "content": 3}]],
)
def test_bad_messages(engine, messages):
    with pytest.raises(PromptError):
        engine.chat(messages)


def test_second_chat_turn_evaluates_only_the_new_tokens(counted):
    engine, target, draft = counted
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat sat on"}]
    prompt1 = engine.chat_tokens(messages)
    first = engine.chat(messages, max_tokens=24)
    assert first.stats.n_prompt_cached == 0
    assert target.evals[0] == len(prompt1) and draft.evals[0] == len(prompt1)

    messages += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "and the dog"}]
    prompt2 = engine.chat_tokens(messages)
    held_target, held_draft = target.inner.tokens, draft.inner.tokens  # what the caches hold now
    target.evals.clear()
    draft.evals.clear()
    second = engine.chat(messages, max_tokens=24)
    cached = second.stats.n_prompt_cached
    # The caches held the first prompt and (most of) the answer, which the second prompt repeats:
    # each model evaluated only what follows its longest common prefix with the new prompt.
    assert cached == common_prefix(held_target, prompt2) >= len(prompt1) + len(first.tokens) // 2
    assert target.evals[0] == len(prompt2) - cached
    assert draft.evals[0] == len(prompt2) - common_prefix(held_draft, prompt2)
    assert common_prefix(held_draft, prompt2) >= len(prompt1)
    assert target.evals[0] < len(prompt2) - len(prompt1)

    # The output is still what a fresh engine would produce.
    engine.reset()
    target.evals.clear()
    again = engine.chat(messages, max_tokens=24)
    assert again.tokens == second.tokens and again.stats.n_prompt_cached == 0
    assert target.evals[0] == len(prompt2)


def test_chat_with_cache_reuse_still_equals_target_only_turn_by_turn(tiny_pair):
    """The promise under prefix reuse: given the same conversation (so the same cache history),
    speculative output is token for token the target-only output."""
    messages: list[dict[str, str]] = []
    with (
        Engine(tiny_pair[0], tiny_pair[1], n_ctx=1024, threads=1) as spec,
        Engine(tiny_pair[0], "none", n_ctx=1024, threads=1) as plain,
    ):
        for turn, text in enumerate(["the cat sat on", "and then the dog", "hello world, what now"]):
            messages.append({"role": "user", "content": text})
            a, b = spec.chat(messages, max_tokens=30), plain.chat(messages, max_tokens=30)
            assert a.tokens == b.tokens and a.stats.n_drafted > 0
            assert a.stats.n_prompt_cached == b.stats.n_prompt_cached and (a.stats.n_prompt_cached > 0) == (
                turn > 0
            )
            messages.append({"role": "assistant", "content": a.text})


def test_cache_prompt_false_evaluates_the_whole_prompt(counted):
    engine, target, _ = counted
    engine.generate("the cat sat on the mat", max_tokens=8)
    target.evals.clear()
    result = engine.generate("the cat sat on the mat", max_tokens=8, cache_prompt=False)
    assert result.stats.n_prompt_cached == 0 and target.evals[0] == result.prompt_tokens
    again = engine.generate("the cat sat on the mat", max_tokens=8)
    assert again.stats.n_prompt_cached == again.prompt_tokens - 1  # all but the last, for its logits


def test_threads_take_turns_first_come_first_served(engine):
    expected = {text: engine.generate(text, max_tokens=30).tokens for text in ("a b", "the cat", "hello")}
    order: list[str] = []
    results: dict[str, list[int]] = {}
    stream = engine.stream("one two", max_tokens=10)  # holds the engine while the threads queue

    def ask(text: str) -> None:
        result = engine.generate(text, max_tokens=30)
        order.append(text)
        results[text] = result.tokens

    threads = []
    for text in ("a b", "the cat", "hello"):
        threads.append(threading.Thread(target=ask, args=(text,)))
        threads[-1].start()
        while engine.waiting < len(threads):  # queue them in a known order
            time.sleep(0.001)
    list(stream)
    for thread in threads:
        thread.join(10)
    assert order == ["a b", "the cat", "hello"]
    assert results == expected


def test_busy_engine_times_out_with_a_clear_error(engine):
    with engine.stream("one two", max_tokens=10):
        errors: list[Exception] = []
        thread = threading.Thread(target=lambda: errors.append(_try(engine)))
        thread.start()
        thread.join(10)
        assert isinstance(errors[0], EngineBusy) and "busy" in str(errors[0])
        # The same thread asking again would wait for itself: refused at once instead.
        with pytest.raises(EngineBusy, match="open stream"):
            engine.generate("again", timeout=5)
    assert engine.generate("free again", max_tokens=3).completion_tokens == 3


def _try(engine: Engine) -> Exception | None:
    try:
        engine.generate("x y", timeout=0.05)
    except Exception as exc:
        return exc
    return None


def test_cancel_from_another_thread(tiny_pair):
    with Engine(tiny_pair[0], tiny_pair[1], n_ctx=2048, threads=1, cache_prompt=False) as engine:
        stream = engine.stream("the cat", max_tokens=2000)
        for seen, _chunk in enumerate(stream, 1):
            if seen == 5:
                threading.Thread(target=engine.cancel).start()
        result = stream.result
        assert result is not None and result.finish_reason == "cancelled"
        assert 5 <= result.completion_tokens < 100
        assert not engine.busy and engine.cancel() is False
        # A cancelled generation leaves the engine ready, its output unchanged by the interruption.
        full = engine.generate("the cat", max_tokens=result.completion_tokens)
        assert full.tokens == result.tokens


def test_closing_a_stream_early_releases_the_engine(engine):
    stream = engine.stream("the cat", max_tokens=100)
    next(stream)
    next(stream)
    stream.close()
    assert stream.result is not None and stream.result.finish_reason == "cancelled"
    assert stream.result.completion_tokens == 2
    assert engine.generate("x", max_tokens=2).completion_tokens == 2

    def abandon() -> None:
        for _ in engine.stream("the cat", max_tokens=100):
            break  # the stream is dropped here, which releases the engine

    abandon()
    assert not engine.busy


def test_closed_engine_refuses_work(tiny_pair):
    engine = Engine(tiny_pair[0], "ngram", n_ctx=256, threads=1)
    assert engine.draft == "ngram" and engine.model == Path(tiny_pair[0]).stem and engine.n_ctx == 256
    engine.close()
    engine.close()  # twice is fine
    with pytest.raises(EdgespecError, match="closed"):
        engine.generate("hi")


def test_prompt_too_long_is_a_prompt_error(engine):
    with pytest.raises(PromptError, match="context"):
        engine.generate("the cat " * 300)
    assert not engine.busy
