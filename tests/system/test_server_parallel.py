"""`edgespec serve --parallel N`: several clients at once, through the official client; under the
exact guarantee each answer is the one its request gets from a server that serves one at a time.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import openai
import pytest
from click.testing import CliRunner

from edgespec.api import Engine
from edgespec.cli.main import cli

from ..conftest import tiny_model_args
from ..helpers import assert_one_line_error
from .test_server import WEATHER_TOOL, health, live_server, wait_for

PET = {
    "type": "json_schema",
    "json_schema": {
        "name": "pet",
        "schema": {
            "type": "object",
            "properties": {"name": {"type": "string", "maxLength": 10}, "happy": {"type": "boolean"}},
            "required": ["name", "happy"],
            "additionalProperties": False,
        },
    },
}

# Eight requests: streamed or not, greedy or seeded sampling, plain, JSON-schema and tool calls.
REQUESTS: list[tuple[bool, dict[str, Any]]] = [
    (False, {"messages": [{"role": "user", "content": "the cat sat"}]}),
    (True, {"messages": [{"role": "user", "content": "once upon a time"}], "temperature": 0.8, "seed": 4}),
    (False, {"messages": [{"role": "user", "content": "a pet please"}], "response_format": PET}),
    (True, {"messages": [{"role": "user", "content": "hello world"}], "logprobs": True, "top_logprobs": 2}),
    (
        False,
        {
            "messages": [{"role": "user", "content": "weather?"}],
            "tools": [WEATHER_TOOL],
            "tool_choice": "required",
            "parallel_tool_calls": False,
            "max_tokens": 120,
        },
    ),
    (True, {"messages": [{"role": "user", "content": "a b c a b c"}], "temperature": 0.6, "seed": 8}),
    (False, {"messages": [{"role": "user", "content": "def main():"}], "draft_max": 2}),
    (True, {"messages": [{"role": "user", "content": "one two three"}], "response_format": PET}),
]


def open_engine(tiny_pair, parallel: int, n_ctx: int = 512) -> Engine:
    return Engine(*tiny_pair, n_ctx=n_ctx, threads=1, kernels="exact", cache_prompt=False, parallel=parallel)


def ask(url: str, streamed: bool, request: dict[str, Any]) -> Any:
    """What the answer says: text, tool calls, logprobs and finish reason."""
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
    options = {"model": "m", "max_tokens": 60, "extra_body": {}, **request}
    if "draft_max" in options:
        options["extra_body"] = {"draft_max": options.pop("draft_max")}
    if not streamed:
        choice = client.chat.completions.create(**options).choices[0]
        calls = [(c.function.name, c.function.arguments) for c in choice.message.tool_calls or []]
        lp = [(t.token, t.logprob) for t in choice.logprobs.content] if choice.logprobs else None
        return choice.message.content, calls, lp, choice.finish_reason
    text, lp, finish = "", [], None
    for chunk in client.chat.completions.create(**options, stream=True):
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        text += choice.delta.content or ""
        if choice.logprobs and choice.logprobs.content:
            lp += [(t.token, t.logprob) for t in choice.logprobs.content]
        finish = choice.finish_reason or finish
    return text, [], lp or None, finish


@pytest.fixture(scope="module")
def alone(tiny_pair) -> list[Any]:
    with open_engine(tiny_pair, 1) as engine, live_server(engine) as url:
        return [ask(url, streamed, request) for streamed, request in REQUESTS]


def test_eight_clients_at_once_get_the_answers_served_alone(tiny_pair, alone):
    with open_engine(tiny_pair, 4) as engine, live_server(engine) as url:
        assert health(url)["parallel"] == 4
        with ThreadPoolExecutor(len(REQUESTS)) as clients:
            answers = list(clients.map(lambda r: ask(url, *r), REQUESTS))
        assert answers == alone
        assert json.loads(answers[2][0]).keys() == {"name", "happy"}  # the schema held
        assert answers[4][1] and answers[4][3] == "tool_calls"
        now = health(url)
        assert now["completed"] == len(REQUESTS) and now["failed"] == 0 and now["running"] == 0
        assert engine._slots.target.stats.shared > 0  # type: ignore[union-attr]


def test_a_client_leaving_frees_its_slot_and_a_full_queue_is_503(tiny_pair):
    # Long answers (the context's 8192 tokens, many seconds), which the clients cut short.
    with open_engine(tiny_pair, 2, n_ctx=8192) as engine, live_server(engine, max_queue=3) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        long = {"model": "m", "messages": [{"role": "user", "content": "go on"}]}
        streams = [client.chat.completions.create(**long, stream=True) for _ in range(2)]
        for stream in streams:
            next(iter(stream))
        with ThreadPoolExecutor(1) as waiter:
            third = waiter.submit(ask, url, False, {**long, "max_tokens": 5})  # waits for a slot
            wait_for(lambda: (health(url)["running"], health(url)["queued"]) == (2, 1), "2 + 1 waiting")
            with pytest.raises(openai.APIStatusError) as full:
                client.chat.completions.create(**long, max_tokens=5)
            assert full.value.status_code == 503
            streams[0].close()  # a client leaves mid-stream: the waiting request gets its slot
            assert third.result(timeout=60)[3] == "length"
        streams[1].close()
        wait_for(lambda: health(url)["running"] == 0, "every slot free")
        now = health(url)
        assert (now["completed"], now["cancelled"], now["rejected"]) == (1, 2, 1)


def test_parallel_flags_are_checked_before_loading(tiny_pair):
    args = ["serve", "--port", "0", *tiny_model_args(tiny_pair)]
    result = CliRunner().invoke(cli, [*args, "--parallel", "4", "--max-queue", "2"])
    assert_one_line_error(result, "2 is fewer than the 4 requests --parallel runs at once")
