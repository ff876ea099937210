"""`edgespec serve --models`: requests choose among several local models by their `model` field.

Two tiny models (of one vocabulary, with different weights, so their greedy answers differ) sit in a
folder `edgespec models` lists. Each answer is compared with the same request answered by an engine
that holds only that model.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import openai
import pytest
from click.testing import CliRunner

from edgespec.api import Engine
from edgespec.cli.main import cli
from edgespec.cli.serve import offered_models
from edgespec.load import registry
from edgespec.server.pool import ModelPool

from ..conftest import tiny_model_args
from ..helpers import assert_one_line_error
from .test_server import MESSAGES, health, live_server, request, served, wait_for

N_CTX = 512
ALPHA, BETA = "folder:coder-alpha.gguf", "folder:coder-beta.gguf"


def open_model(path: Path) -> Engine:
    return Engine(path, "none", n_ctx=N_CTX, threads=1, kernels="exact", cache_prompt=False)


@pytest.fixture()
def shelf(tmp_path, monkeypatch, isolated_home, tiny_pair) -> dict[str, Path]:
    """Two models in a folder of the user's (`EDGESPEC_MODEL_DIRS`), by their listed names."""
    folder = tmp_path / "mine"
    folder.mkdir()
    paths = {ALPHA: folder / "coder-alpha.gguf", BETA: folder / "coder-beta.gguf"}
    shutil.copy(tiny_pair[0], paths[ALPHA])
    shutil.copy(tiny_pair[1], paths[BETA])
    monkeypatch.setenv("EDGESPEC_MODEL_DIRS", str(folder))
    return paths


@pytest.fixture()
def alone(shelf) -> dict[str, str]:
    """Each model's greedy answer to MESSAGES, from an engine that holds only it."""
    answers = {}
    for name, path in shelf.items():
        with open_model(path) as engine:
            answers[name] = engine.chat(MESSAGES, max_tokens=8).text
    assert answers[ALPHA] != answers[BETA]  # else the tests could not tell which model answered
    return answers


@pytest.fixture()
def pool(shelf) -> Iterator[ModelPool]:
    opened: list[Engine] = []

    def opener(path: Path) -> Engine:
        opened.append(open_model(path))
        return opened[-1]

    with open_model(shelf[ALPHA]) as start:
        pool = ModelPool(start, registry.find_models(), opener)
        yield pool
        pool.close()
    assert all(engine.closed for engine in opened)


def ask(client: openai.OpenAI, model: str, stream: bool = False) -> tuple[str, str]:
    """(the answer's text, the model the response names)."""
    if stream:
        sent = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8, stream=True)
        chunks = list(sent)
        return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices), chunks[-1].model
    resp = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8)
    return resp.choices[0].message.content or "", resp.model


def test_a_request_names_its_model_and_gets_that_models_answer(pool, alone):
    with live_server(pool) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        listed = {m.id: m.model_extra["edgespec"]["loaded"] for m in client.models.list()}
        assert listed == {ALPHA: True, BETA: False}
        assert ask(client, "coder-beta") == (alone[BETA], BETA)  # a unique prefix
        assert health(url)["model"] == BETA and health(url)["switches"] == 1
        assert {m.id: m.model_extra["edgespec"]["loaded"] for m in client.models.list()}[BETA]
        assert ask(client, ALPHA, stream=True) == (alone[ALPHA], ALPHA)  # the full name
        assert ask(client, "Coder-Alpha.gguf") == (alone[ALPHA], ALPHA)  # the id, any case: no switch
        assert health(url)["switches"] == 2
        # Without a model field: the loaded one answers.
        unnamed = {"messages": MESSAGES, "max_tokens": 8}
        status, body, _ = request(url, "POST", "/v1/chat/completions", unnamed)
        assert status == 200 and body["model"] == ALPHA
        assert client.models.retrieve(BETA).id == BETA


def test_queued_requests_for_different_models_keep_their_order_and_answers(pool, alone):
    with live_server(pool) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        names = [BETA, ALPHA, BETA, BETA, ALPHA]
        with ThreadPoolExecutor(len(names)) as workers:
            answers = list(workers.map(lambda n: ask(client, n, stream=n == BETA), names))
        assert answers == [(alone[n], n) for n in names]
        now = health(url)
        assert now["completed"] == len(names) and now["failed"] == 0 and 1 <= now["switches"] <= len(names)


def test_with_parallel_the_loaded_models_requests_run_at_once_and_a_switch_waits(shelf, alone):
    def open_parallel(path: Path) -> Engine:
        # a long context: the first two answers run until their clients leave
        return Engine(path, "none", n_ctx=8192, threads=1, kernels="exact", cache_prompt=False, parallel=2)

    opened: list[Engine] = []
    with open_parallel(shelf[ALPHA]) as start:
        pool = ModelPool(
            start, registry.find_models(), lambda path: opened.append(open_parallel(path)) or opened[-1]
        )
        with live_server(pool) as url:
            client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
            long = {"model": ALPHA, "messages": [{"role": "user", "content": "go on"}]}
            streams = [client.chat.completions.create(**long, stream=True) for _ in range(2)]
            for stream in streams:
                next(iter(stream))
            assert health(url)["running"] == 2  # two requests for the loaded model at once
            with ThreadPoolExecutor(2) as clients:
                beta = clients.submit(ask, client, BETA)
                wait_for(lambda: health(url)["queued"] == 1, "the other model's request waiting")
                alpha = clients.submit(ask, client, ALPHA)
                wait_for(lambda: health(url)["queued"] == 2, "a later request behind it")
                streams[0].close()  # a slot is free, but the switch waits for the other stream ...
                wait_for(lambda: health(url)["running"] == 1, "one stream left")
                now = health(url)  # ... and the later request for the loaded model does not overtake
                assert (now["queued"], now["model"], now["switches"]) == (2, ALPHA, 0)
                streams[1].close()
                assert beta.result(timeout=60) == (alone[BETA], BETA)
                assert alpha.result(timeout=60) == (alone[ALPHA], ALPHA)
            now = health(url)
            assert (now["switches"], now["failed"], now["running"], now["queued"]) == (2, 0, 0, 0)
        pool.close()
    assert all(engine.closed for engine in opened)


def test_names_that_fit_no_offered_model_or_several(pool):
    with live_server(pool) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.NotFoundError) as missing:
            ask(client, "gpt-4o")
        error: Any = missing.value.body
        assert error["code"] == "model_not_found" and error["param"] == "model"
        assert "no model 'gpt-4o' here: this server offers 2 models" in error["message"]
        with pytest.raises(openai.BadRequestError) as several:
            ask(client, "coder")
        error = several.value.body
        assert error["code"] == "model_ambiguous"
        assert f"'coder' names 2 models: {ALPHA}, {BETA}" in error["message"]
        with pytest.raises(openai.NotFoundError):
            client.models.retrieve("coder-beta")  # retrieving takes an id, not a prefix
        assert health(url)["switches"] == 0


def test_a_model_that_fails_to_load_answers_500_and_the_server_goes_on(pool, shelf, alone):
    with live_server(pool) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        shelf[BETA].write_bytes(b"GGUF" + bytes(60))  # damaged after the server listed it
        with pytest.raises(openai.InternalServerError) as failed:
            ask(client, BETA)
        error: Any = failed.value.body
        assert error["message"].startswith(f"cannot load model {BETA}: ")
        assert health(url)["model"] == ALPHA  # loaded again
        assert ask(client, ALPHA) == (alone[ALPHA], ALPHA)


def test_one_model_answers_every_name_without_models(shelf, alone):
    with open_model(shelf[ALPHA]) as engine, live_server(engine) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0)
        assert ask(client, "gpt-4o") == (alone[ALPHA], "coder-alpha")
        assert [m.id for m in client.models.list()] == ["coder-alpha"]


def test_offered_models_by_name_path_and_local(shelf, tiny_pair):
    by_name = offered_models(["coder-b", str(shelf[ALPHA]), BETA])
    assert [m.name for m in by_name] == [BETA, ALPHA]
    assert [m.name for m in offered_models(["local"])] == [ALPHA, BETA]
    assert [m.source for m in offered_models([str(tiny_pair[0])])] == ["file"]


@pytest.mark.parametrize(
    ("names", "message"),
    [
        (["coder"], "'coder' names 2 models"),
        (["qwen-nope"], "no model named 'qwen-nope'"),
        (["/no/such/model.gguf"], "model file not found: /no/such/model.gguf"),
    ],
)
def test_serve_refuses_bad_model_names_before_loading(shelf, tiny_pair, names, message):
    args = ["serve", "--port", "0", *tiny_model_args(tiny_pair)]
    for name in names:
        args += ["--models", name]
    result = CliRunner().invoke(cli, args)
    assert_one_line_error(result, message)


def test_serve_models_local_end_to_end(shelf, alone, tiny_pair, tmp_path):
    env = {**os.environ, "EDGESPEC_CACHE_DIR": str(tmp_path / "cache")}
    args = ["--target", str(shelf[ALPHA]), "--draft", "none", "--threads", "1", "--ctx", str(N_CTX)]
    args += ["--kernels", "exact", "--no-cache-prompt", "--models", "local"]
    with served(args, env) as (base, stderr):
        assert stderr[0].startswith("--parallel auto: ")  # as without --models
        assert f"serving 2 models (coder-alpha loaded) on {base}/v1" in stderr[1]
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0)
        assert ask(client, "coder-alpha") == (alone[ALPHA], ALPHA)
        assert ask(client, "coder-beta") == (alone[BETA], BETA)
    assert "Traceback" not in "".join(stderr), stderr
