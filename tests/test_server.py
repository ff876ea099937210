"""`edgespec serve`: the OpenAI-compatible API, through the official client and raw HTTP.

A live server runs on a free loopback port in a thread (and once as `python -m edgespec serve`).
Waiting and queueing are made deterministic by holding the engine from the test: while the test
has a stream open, the server's worker waits for the engine, and further requests wait in its queue.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

import openai
import pytest
from click.testing import CliRunner

from edgespec.api import Engine
from edgespec.cli import cli
from edgespec.cli_serve import bind, url_of
from edgespec.server import make_server

from .conftest import real_pair_paths, tiny_model_args

N_CTX = 8192  # room for long generations, which the disconnect tests cut short
MESSAGES = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat sat"}]
PROMPT = "once upon a time"
CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"


@pytest.fixture(scope="module")
def engine(tiny_pair):
    # Every prompt evaluated whole: these tests compare answers to one request sent several ways.
    with Engine(*tiny_pair, n_ctx=N_CTX, threads=1, cache_prompt=False) as engine:
        yield engine


def start_server(engine: Engine, **options: Any) -> tuple[str, Callable[[], None]]:
    """Serve the API over `engine` on a free loopback port, in a thread; returns (URL, stop)."""
    sock = bind("127.0.0.1", 0)
    server = make_server(engine, **options)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)

    def stop() -> None:
        server.should_exit = True
        thread.join(10)
        assert not thread.is_alive(), "the server did not stop"

    return url_of(sock), stop


@contextmanager
def live_server(engine: Engine, **options: Any) -> Iterator[str]:
    url, stop = start_server(engine, **options)
    try:
        yield url
    finally:
        stop()


@pytest.fixture(scope="module")
def url(engine):
    with live_server(engine) as url:
        yield url


@pytest.fixture()
def client(url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="anything", max_retries=0)


def send(url: str, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None):
    """Send one request without reading the answer; returns the connection."""
    conn = http.client.HTTPConnection(url.removeprefix("http://"), timeout=30)
    data = body if body is None or isinstance(body, bytes) else json.dumps(body).encode()
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    return conn


def answer(conn: http.client.HTTPConnection) -> tuple[int, Any, Any]:
    """(status, JSON body or text, headers) of a sent request."""
    response = conn.getresponse()
    payload = response.read().decode()
    conn.close()
    try:
        body = json.loads(payload)
    except ValueError:
        body = payload
    return response.status, body, response.headers


def request(url: str, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None):
    return answer(send(url, method, path, body, headers))


def health(url: str) -> dict[str, Any]:
    return request(url, "GET", "/health")[1]


def wait_for(condition: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + 10
    while not (value := condition()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    return value


@contextmanager
def engine_held(engine: Engine) -> Iterator[None]:
    """Hold the engine from this thread: the server's generations wait until the block ends."""
    with engine.stream("hold", raw=True, max_tokens=1):
        yield


def stream_text(chunks: Any, chat: bool) -> str:
    if chat:
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return "".join(c.choices[0].text for c in chunks if c.choices)


# -- through the official client -----------------------------------------------------------------


def test_chat_streamed_equals_non_streamed(client, engine):
    resp = client.chat.completions.create(model="any name", messages=MESSAGES, max_tokens=16, temperature=0)
    assert resp.object == "chat.completion" and resp.model == engine.model
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert choice.message.content == engine.chat(MESSAGES, max_tokens=16).text
    n_prompt = len(engine.chat_tokens(MESSAGES))
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (n_prompt, 16)
    assert resp.usage.total_tokens == n_prompt + 16
    extra = resp.model_extra["edgespec"]
    assert extra["n_generated"] == 16 and extra["n_prompt"] == n_prompt and extra["n_drafted"] > 0
    assert extra["draft"] == "draft.gguf" and extra["draft_max"] == 4 and "n_prompt_cached" in extra

    chunks = list(
        client.chat.completions.create(
            model="x", messages=MESSAGES, max_tokens=16, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.object == "chat.completion.chunk" and c.model == engine.model for c in chunks)
    assert stream_text(chunks, chat=True) == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        "length"
    ]
    last = chunks[-1]  # OpenAI's usage chunk: no choices
    assert last.choices == [] and (last.usage.prompt_tokens, last.usage.completion_tokens) == (n_prompt, 16)
    # this engine evaluates every prompt whole (cache_prompt=False), even the same one again
    assert last.usage.prompt_tokens_details.cached_tokens == 0
    assert last.model_extra["edgespec"]["n_prompt_cached"] == 0
    assert all(c.usage is None for c in chunks[:-1])


def test_next_chat_turn_reuses_the_cache_unless_told_not_to(tiny_pair):
    with Engine(*tiny_pair, n_ctx=1024, threads=1) as engine, live_server(engine) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="anything", max_retries=0)
        first = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=16)
        assert first.usage.prompt_tokens_details.cached_tokens == 0
        turn = [*MESSAGES, {"role": "assistant", "content": first.choices[0].message.content}]
        turn.append({"role": "user", "content": "and the dog"})
        second = client.chat.completions.create(model="m", messages=turn, max_tokens=16)
        cached = second.usage.prompt_tokens_details.cached_tokens
        assert first.usage.prompt_tokens <= cached < second.usage.prompt_tokens
        assert second.model_extra["edgespec"]["n_prompt_cached"] == cached
        whole = client.chat.completions.create(
            model="m", messages=turn, max_tokens=16, extra_body={"cache_prompt": False}
        )
        assert whole.usage.prompt_tokens_details.cached_tokens == 0
        bad = request(url, "POST", CHAT, {"messages": turn, "cache_prompt": "yes"})
        assert bad[0] == 400 and "cache_prompt must be true or false" in bad[1]["error"]["message"]


def test_completions_streamed_and_not(client, engine):
    expected = engine.generate(PROMPT, raw=True, max_tokens=12).text
    n_prompt = len(engine.tokenize(PROMPT, raw=True))
    for prompt in (PROMPT, [PROMPT]):
        resp = client.completions.create(model="m", prompt=prompt, max_tokens=12)
        assert resp.object == "text_completion" and resp.model == engine.model
        assert resp.choices[0].text == expected and resp.choices[0].finish_reason == "length"
        assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (n_prompt, 12)
    chunks = list(client.completions.create(model="m", prompt=PROMPT, max_tokens=12, stream=True))
    assert stream_text(chunks, chat=False) == expected
    assert chunks[-1].choices[0].finish_reason == "length" and all(c.usage is None for c in chunks)
    assert chunks[-1].model_extra["edgespec"]["n_generated"] == 12


def test_stop_strings(client, engine):
    full = engine.generate(PROMPT, raw=True, max_tokens=24).text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    expected = full[: full.index(stop)]
    for value in (stop, [stop, "QQ never"]):
        resp = client.completions.create(model="m", prompt=PROMPT, max_tokens=24, stop=value)
        assert resp.choices[0].text == expected and resp.choices[0].finish_reason == "stop"
        assert resp.usage.completion_tokens < 24
        chunks = list(
            client.completions.create(model="m", prompt=PROMPT, max_tokens=24, stop=value, stream=True)
        )
        assert stream_text(chunks, chat=False) == expected and chunks[-1].choices[0].finish_reason == "stop"
    # A stop string that starts at the very end but never completes: the text held back for it is
    # streamed when the generation ends.
    chunks = list(
        client.completions.create(model="m", prompt=PROMPT, max_tokens=24, stop=full[-2:] + "QQ", stream=True)
    )
    assert stream_text(chunks, chat=False) == full and chunks[-1].choices[0].finish_reason == "length"


def test_content_parts_and_developer_role(client):
    parts = [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "the cat"}, {"type": "text", "text": "sat"}]},
    ]
    plain = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the cat\nsat"}]
    a = client.chat.completions.create(model="m", messages=parts, max_tokens=8)
    b = client.chat.completions.create(model="m", messages=plain, max_tokens=8)
    assert a.choices[0].message.content == b.choices[0].message.content
    assert a.usage.prompt_tokens == b.usage.prompt_tokens


def test_concurrent_clients_get_what_they_would_get_alone(client, url):
    prompts = ["the cat sat on", "a dog was in the", "hello world and", "one little word"]

    def ask(prompt: str, stream: bool) -> str:
        if stream:
            chunks = client.completions.create(model="m", prompt=prompt, max_tokens=20, stream=True)
            return stream_text(chunks, chat=False)
        return client.completions.create(model="m", prompt=prompt, max_tokens=20).choices[0].text

    alone = [ask(p, stream=False) for p in prompts]
    before = health(url)["completed"]
    with ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(ask, p, i % 2 == 0) for i, p in enumerate(prompts * 2)]
        together = [f.result() for f in futures]
    assert together == alone * 2
    after = health(url)
    assert after["completed"] == before + 8 and not after["busy"] and after["queued"] == 0


def test_models_and_health(client, url, engine):
    assert [m.id for m in client.models.list().data] == [engine.model]
    assert client.models.retrieve(engine.model).owned_by == "edgespec"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")
    status, body, _ = request(url, "GET", "/health")
    assert status == 200 and body["status"] == "ok" and body["model"] == engine.model
    assert body["max_queue"] == 8 and {
        "busy",
        "queued",
        "completed",
        "cancelled",
        "failed",
        "rejected",
    } <= set(body)


# -- queueing and clients that go away ---------------------------------------------------------------


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
def test_client_that_leaves_mid_generation_frees_the_engine(client, url, stream):
    before = health(url)
    conn = send(url, "POST", COMPLETIONS, {"prompt": PROMPT, "max_tokens": 6000, "stream": stream})
    if stream:  # a generation that would run for many seconds
        response = conn.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: {")
        response.close()
    wait_for(lambda: health(url)["busy"], "the generation to start")
    conn.close()
    after = wait_for(
        lambda: (h := health(url))["cancelled"] == before["cancelled"] + 1 and not h["busy"] and h,
        "the generation to be cancelled",
    )
    assert after["completed"] == before["completed"]
    resp = client.completions.create(model="m", prompt=PROMPT, max_tokens=8)
    assert resp.usage.completion_tokens == 8


def test_waiting_request_whose_client_leaves_is_dropped(url, engine):
    before = health(url)
    with engine_held(engine):
        first = send(url, "POST", COMPLETIONS, {"prompt": PROMPT, "max_tokens": 4})
        wait_for(lambda: health(url)["busy"], "the first request to start")
        second = send(url, "POST", CHAT, {"messages": MESSAGES, "stream": True})
        wait_for(lambda: health(url)["queued"] == 1, "the second request to wait")
        second.close()
        now = wait_for(lambda: (h := health(url))["queued"] == 0 and h, "the waiting request to be dropped")
        assert now["cancelled"] == before["cancelled"] + 1 and now["busy"]
    status, body, _ = answer(first)
    assert (
        status == 200 and body["choices"][0]["text"] == engine.generate(PROMPT, raw=True, max_tokens=4).text
    )


def test_full_queue_is_answered_503(engine):
    with live_server(engine, max_queue=1) as url:
        with engine_held(engine):
            first = send(url, "POST", COMPLETIONS, {"prompt": PROMPT, "max_tokens": 4})
            wait_for(lambda: health(url)["busy"], "the first request to start")
            status, body, _ = request(url, "POST", CHAT, {"messages": MESSAGES})
            assert status == 503
            assert body["error"]["type"] == "server_error" and body["error"]["code"] == "queue_full"
            assert "--max-queue" in body["error"]["message"]
            refused = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
            with pytest.raises(openai.InternalServerError) as info:
                refused.completions.create(model="m", prompt=PROMPT, max_tokens=4)
            assert info.value.status_code == 503
        assert answer(first)[0] == 200
        assert health(url)["rejected"] == 2


def test_stopping_the_server_ends_streams_and_answers_waiting_requests(engine):
    url, stop = start_server(engine)
    conn = send(url, "POST", COMPLETIONS, {"prompt": PROMPT, "max_tokens": 6000, "stream": True})
    response = conn.getresponse()
    assert response.readline().startswith(b"data: {")
    waiting = send(url, "POST", CHAT, {"messages": MESSAGES})
    wait_for(lambda: health(url)["queued"] == 1, "the second request to wait")
    started = time.monotonic()
    stop()
    assert time.monotonic() - started < 5  # the open stream did not run to its end
    last = response.read().decode().strip().splitlines()[-1]
    assert json.loads(last.removeprefix("data: "))["error"]["code"] == "shutting_down"
    status, body, _ = answer(waiting)
    assert status == 503 and body["error"]["code"] == "shutting_down"
    conn.close()
    assert engine.generate(PROMPT, raw=True, max_tokens=2).completion_tokens == 2  # the engine is free


# -- keys, CORS, errors ------------------------------------------------------------------------------


def test_api_key(engine):
    with live_server(engine, api_key="sekret") as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            status, body, response_headers = request(url, "GET", "/v1/models", headers=headers)
            assert status == 401 and body["error"]["code"] == "invalid_api_key", headers
            assert response_headers["WWW-Authenticate"] == "Bearer"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="wrong", max_retries=0).models.list()
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="sekret", max_retries=0)
        assert (
            good.chat.completions.create(model="m", messages=MESSAGES, max_tokens=4).usage.completion_tokens
            == 4
        )
        assert request(url, "GET", "/health")[0] == 200  # open to monitors


def test_cors_only_for_configured_origins(engine, url):
    origin = "http://localhost:3000"
    with live_server(engine, cors_origins=[origin]) as cors_url:
        _, _, headers = request(cors_url, "GET", "/v1/models", headers={"Origin": origin})
        assert headers["access-control-allow-origin"] == origin
        preflight = {
            "Origin": origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        }
        status, _, headers = request(cors_url, "OPTIONS", CHAT, headers=preflight)
        assert status == 200 and "POST" in headers["access-control-allow-methods"]
        assert "authorization" in headers["access-control-allow-headers"].lower()
        _, _, headers = request(cors_url, "GET", "/v1/models", headers={"Origin": "http://elsewhere.example"})
        assert "access-control-allow-origin" not in headers
    _, _, headers = request(url, "GET", "/v1/models", headers={"Origin": origin})
    assert "access-control-allow-origin" not in headers  # none by default


BAD_REQUESTS = [
    ("malformed JSON", CHAT, b'{"messages": [', None, "not valid JSON"),
    ("not an object", COMPLETIONS, b"[1, 2]", None, "must be a JSON object"),
    ("missing messages", CHAT, {"model": "m"}, "messages", "missing required parameter: 'messages'"),
    ("empty messages", CHAT, {"messages": []}, "messages", "non-empty list"),
    ("bad role", CHAT, {"messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "robot"),
    (
        "image part",
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        "messages[0].content",
        "text only",
    ),
    (
        "temperature as a string",
        CHAT,
        {"messages": MESSAGES, "temperature": "0.5"},
        "temperature",
        "must be a number",
    ),
    (
        "temperature out of range",
        COMPLETIONS,
        {"prompt": "x", "temperature": -1},
        "temperature",
        "between 0 and 100",
    ),
    ("n=2", CHAT, {"messages": MESSAGES, "n": 2}, "n", "n must be 1"),
    ("max_tokens 0", COMPLETIONS, {"prompt": "x", "max_tokens": 0}, "max_tokens", "at least 1"),
    (
        "max_completion_tokens text",
        CHAT,
        {"messages": MESSAGES, "max_completion_tokens": "5"},
        "max_completion_tokens",
        "integer",
    ),
    (
        "unknown argument",
        CHAT,
        {"messages": MESSAGES, "frobnicate": 1},
        "frobnicate",
        "unrecognized request argument",
    ),
    ("tools", CHAT, {"messages": MESSAGES, "tools": [{"type": "function"}]}, "tools", "not supported"),
    ("logit_bias key", COMPLETIONS, {"prompt": "x", "logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
    # found by the engine as the generation starts, still before a stream's first byte
    (
        "logit_bias outside the vocabulary",
        COMPLETIONS,
        {"prompt": "x", "logit_bias": {"99999": 1}, "stream": True},
        "logit_bias",
        "not in the vocabulary",
    ),
    ("stop not strings", COMPLETIONS, {"prompt": "x", "stop": [1]}, "stop", "stop must be"),
    ("negative seed", COMPLETIONS, {"prompt": "x", "seed": -1}, "seed", "0 or more"),
    ("two prompts", COMPLETIONS, {"prompt": ["a", "b"]}, "prompt", "exactly one string"),
    ("empty prompt", COMPLETIONS, {"prompt": "  "}, None, "the prompt is empty"),
    ("prompt too long", COMPLETIONS, {"prompt": "the " * 9000}, None, "the context holds 8192"),
    (
        "stream_options without stream",
        CHAT,
        {"messages": MESSAGES, "stream_options": {"include_usage": True}},
        "stream_options",
        "only allowed",
    ),
]


@pytest.mark.parametrize(
    ("path", "body", "param", "message"), [b[1:] for b in BAD_REQUESTS], ids=[b[0] for b in BAD_REQUESTS]
)
def test_bad_requests_get_openai_errors(url, path, body, param, message):
    before = health(url)
    status, answer_body, _ = request(url, "POST", path, body)
    assert status == 400, answer_body
    error = answer_body["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and message in error["message"] and "\n" not in error["message"]
    assert not health(url)["busy"] and health(url)["queued"] == before["queued"]


def test_bad_request_through_the_client(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="m", messages=[{"role": "robot", "content": "hi"}])
    assert info.value.body["param"] == "messages[0].role"


def test_unknown_endpoint_and_method(url):
    status, body, _ = request(url, "POST", "/v1/embeddings", {"input": "x"})
    assert status == 404 and body["error"]["type"] == "invalid_request_error"
    assert "unknown endpoint: POST /v1/embeddings" in body["error"]["message"]
    status, body, _ = request(url, "GET", CHAT)
    assert status == 405 and "method not allowed" in body["error"]["message"]


def test_unexpected_error_is_a_500_in_one_line(url, engine, monkeypatch):
    def broken(messages: Any) -> list[int]:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(engine, "chat_tokens", broken)
    status, body, _ = request(url, "POST", CHAT, {"messages": MESSAGES})
    assert status == 500
    assert body == {
        "error": {
            "message": "unexpected RuntimeError: boom second line",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }


# -- the command -----------------------------------------------------------------------------------


def test_serve_command_end_to_end(tiny_pair, tmp_path):
    env = {**os.environ, "EDGESPEC_API_KEY": "k3y", "EDGESPEC_CACHE_DIR": str(tmp_path)}
    args = ["serve", "--port", "0", "--max-queue", "2", *tiny_model_args(tiny_pair)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgespec", *args], stderr=subprocess.PIPE, text=True, env=env
    )
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stderr], daemon=True).start()
    try:
        ready = lines.get(timeout=60)
        found = re.fullmatch(r"serving target on (http://127\.0\.0\.1:\d+)/v1 \(.*\)\n", ready)
        assert found, ready
        base = found.group(1)
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="k3y", max_retries=0)
        resp = client.chat.completions.create(model="m", messages=MESSAGES, max_tokens=5)
        assert resp.usage.completion_tokens == 5 and resp.model == "target"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{base}/v1", api_key="wrong", max_retries=0).models.list()
        assert health(base)["max_queue"] == 2
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
    rest = []
    while not lines.empty():
        rest.append(lines.get())
    assert code == 130 and "Traceback" not in "".join(rest), rest


def assert_one_line_error(result: Any, pattern: str) -> None:
    assert result.exit_code != 0 and isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and pattern in lines[0], result.stderr


def test_serve_start_up_errors_are_one_line(tiny_pair, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGESPEC_CACHE_DIR", str(tmp_path))
    runner = CliRunner()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        result = runner.invoke(cli, ["serve", "--port", port, *tiny_model_args(tiny_pair)])
        assert_one_line_error(result, f"cannot listen on 127.0.0.1:{port}")
    missing = tmp_path / "missing.gguf"
    result = runner.invoke(cli, ["serve", "--port", "0", "--target", str(missing), "--draft", "none"])
    assert_one_line_error(result, "model file not found")
    result = runner.invoke(cli, ["serve", "--port", "0", "--api-key", " ", *tiny_model_args(tiny_pair)])
    assert_one_line_error(result, "the API key is empty")
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if the server extra were not installed
    result = runner.invoke(cli, ["serve", "--port", "0", *tiny_model_args(tiny_pair)])
    assert_one_line_error(result, 'pip install "edgespec[server]"')


# -- the real pair -----------------------------------------------------------------------------------


@pytest.mark.real
def test_real_pair_streams_what_it_answers():
    target, draft = real_pair_paths()
    messages = [
        {"role": "user", "content": "Write a Python function that returns the n-th Fibonacci number."}
    ]
    with (
        Engine(target, draft, draft_max=4, n_ctx=2048, cache_prompt=False) as engine,
        live_server(engine) as url,
    ):
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="anything", max_retries=0)
        whole = client.chat.completions.create(model="qwen", messages=messages, max_tokens=24, temperature=0)
        chunks = client.chat.completions.create(model="qwen", messages=messages, max_tokens=24, stream=True)
        assert stream_text(chunks, chat=True) == whole.choices[0].message.content
        assert whole.usage.completion_tokens == 24 and whole.model_extra["edgespec"]["n_drafted"] > 0
