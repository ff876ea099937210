"""`edgespec models`, `edgespec pull` and models named on the command line: listing what is on disk,
downloading through huggingface_hub from a local Hub (resumed and checked), running by name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgespec.cli.main import cli
from edgespec.load import hub as hub_module
from edgespec.load import registry

from ..helpers import assert_one_line_error
from ..hubserver import FakeHub
from ..stores import ollama_put
from ..tinymodels import build_tiny_model

RUN = ["run", "--draft", "none", "--threads", "1", "--ctx", "256", "--max-tokens", "6", "--raw", "the cat"]
CHUNK = 10 * 1024 * 1024  # huggingface_hub writes what arrives in pieces of this size


@pytest.fixture()
def runner(isolated_home) -> CliRunner:
    return CliRunner()


@pytest.fixture(scope="module")
def big_model(tmp_path_factory) -> Path:
    """A tiny model over two download chunks, so a transfer cut after the first can resume."""
    path = build_tiny_model(
        tmp_path_factory.mktemp("big") / "big.gguf", seed=5, n_embd=512, n_layer=5, n_ff=1024, n_head=8
    )
    assert path.stat().st_size > CHUNK + (1 << 20)
    return path


def assert_ends_in_error(result, pattern: str) -> None:
    """A failure after notes on stderr: non-zero exit, no traceback, the last line the error."""
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: ") and pattern in lines[-1], result.stderr
    assert not any(line.startswith("error: ") for line in lines[:-1])


def output(runner: CliRunner, *args: str) -> str:
    result = runner.invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def test_models_lists_every_store_and_runs_by_name(runner, isolated_home, tmp_path, monkeypatch, tiny_pair):
    store = tmp_path / "ollama"
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    ollama_put(store, tiny_pair[0], "registry.ollama.ai", "library", "tiny", "latest")
    mine = tmp_path / "mine"
    mine.mkdir()
    shutil.copy(tiny_pair[1], mine / "draft-Q8_0.gguf")
    monkeypatch.setenv("EDGESPEC_MODEL_DIRS", str(mine))
    data = json.loads(output(runner, "models", "--json"))
    assert {m["role"] for m in data["default_pair"]} == {"target", "draft"}
    assert all(not m["cached"] for m in data["default_pair"])  # an empty cache
    rows = {m["name"]: m for m in data["models"]}
    assert set(rows) == {"ollama:tiny:latest", "folder:draft-Q8_0.gguf"}
    assert rows["ollama:tiny:latest"]["architecture"] == "llama"
    assert rows["ollama:tiny:latest"]["quantization"] == "Q8_0"
    text = output(runner, "models")
    assert "cache:" in text and "default target" in text
    line = next(row for row in text.splitlines() if row.startswith("ollama:tiny:latest"))
    assert line.split()[1] == "llama" and line.split()[3] == "Q8_0" and line.split()[-1] == "yes"
    # A name instead of a path: the same answer as the path gives.
    by_path = output(runner, *RUN[:1], "--target", str(tiny_pair[0]), *RUN[1:])
    assert output(runner, *RUN[:1], "--target", "ollama:tiny", *RUN[1:]) == by_path
    assert output(runner, *RUN[:1], "--target", "tiny:latest", *RUN[1:]) == by_path
    assert output(runner, *RUN[:1], "--target", "ollama:tiny", "--draft", "draft-q8", *RUN[3:])


def test_model_names_that_fit_no_model_or_several(runner, tmp_path, monkeypatch, tiny_pair):
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("coder-a.gguf", "coder-b.gguf"):
        shutil.copy(tiny_pair[0], mine / name)
    monkeypatch.setenv("EDGESPEC_MODEL_DIRS", str(mine))
    result = runner.invoke(cli, ["run", "--target", "coder", "--draft", "none", "hi"])
    assert_one_line_error(result, "'coder' names 2 models: folder:coder-a.gguf, folder:coder-b.gguf")
    assert result.exit_code == 1
    result = runner.invoke(cli, ["run", "--target", "qwen-nope", "--draft", "none", "hi"])
    assert_one_line_error(
        result, "no model named 'qwen-nope': not a file, nor a name `edgespec models` lists"
    )
    result = runner.invoke(cli, ["run", "--target", str(tmp_path / "x.gguf"), "--draft", "none", "hi"])
    assert_one_line_error(result, f"model file not found: {tmp_path / 'x.gguf'}")


def test_pull_resumes_a_broken_transfer_checks_it_and_runs_it_by_name(
    runner, big_model, tiny_pair, monkeypatch
):
    files = {"big-Q4_K_M.gguf": big_model.read_bytes(), "big-Q8_0.gguf": tiny_pair[0].read_bytes()}
    with FakeHub({"org/Big-GGUF": files}, cut={"big-Q4_K_M.gguf": CHUNK + (1 << 20)}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        first = runner.invoke(cli, ["pull", "hf:org/Big-GGUF"])
        assert first.exit_code == 1 and isinstance(first.exception, SystemExit)  # no traceback
        note, error = first.stderr.strip().splitlines()
        assert note.startswith("hf:org/Big-GGUF: big-Q4_K_M.gguf: Q4_K_M, the default quantization")
        assert error.startswith("error: downloading big-Q4_K_M.gguf from hf:org/Big-GGUF broke off")
        assert error.endswith("pull again to resume")
        partial = list(registry.hf_cache_dir().rglob("*.incomplete"))
        assert len(partial) == 1 and partial[0].stat().st_size == CHUNK
        second = runner.invoke(cli, ["pull", "hf:org/Big-GGUF"])
        assert second.exit_code == 0, second.output
        assert "big-Q4_K_M.gguf: Q4_K_M, the default quantization" in second.stderr
        assert "checking big-Q4_K_M.gguf against the Hub's sha256" in second.stderr
        assert second.stdout.startswith("hf:org/Big-GGUF/big-Q4_K_M.gguf")
        assert hub.gets("big-Q4_K_M.gguf") == [None, f"bytes={CHUNK}-"]  # resumed, not restarted
    model = registry.resolve("hf:org/Big-GGUF")
    assert model.path.read_bytes() == big_model.read_bytes()
    assert not list(registry.hf_cache_dir().rglob("*.incomplete"))
    # Offline now: the file is used by name, from the cache.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    by_path = output(runner, *RUN[:1], "--target", str(big_model), *RUN[1:])
    assert output(runner, *RUN[:1], "--target", "hf:org/Big-GGUF", *RUN[1:]) == by_path


def test_pull_deletes_a_file_whose_sha256_is_not_the_hubs(runner, tiny_pair, monkeypatch):
    with FakeHub({"org/Tiny-GGUF": {"tiny.gguf": tiny_pair[0].read_bytes()}}, corrupt={"tiny.gguf"}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        result = runner.invoke(cli, ["pull", "hf:org/Tiny-GGUF"])
    assert_ends_in_error(result, "hf:org/Tiny-GGUF/tiny.gguf does not match the sha256 the Hub records")
    assert not [p for p in registry.hf_cache_dir().rglob("*") if p.is_file() and p.suffix == ".gguf"]
    assert not list((registry.hf_cache_dir()).rglob("blobs/*"))


def test_pull_offline_or_unreachable_says_so_and_lists_what_is_here(runner, tmp_path, monkeypatch, tiny_pair):
    mine = tmp_path / "mine"
    mine.mkdir()
    shutil.copy(tiny_pair[0], mine / "here.gguf")
    monkeypatch.setenv("EDGESPEC_MODEL_DIRS", str(mine))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    result = runner.invoke(cli, ["pull", "hf:org/Some-GGUF"])
    assert_one_line_error(
        result,
        "offline (HF_HUB_OFFLINE is set): not downloading hf:org/Some-GGUF; models here: folder:here.gguf",
    )
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    result = runner.invoke(cli, ["pull", "hf:org/Some-GGUF"])
    assert_one_line_error(result, "cannot reach the Hub (http://127.0.0.1:9)")
    assert "models here: folder:here.gguf" in result.stderr


def test_pull_names_the_choices_when_it_cannot_choose(runner, tiny_pair, monkeypatch):
    data = tiny_pair[0].read_bytes()
    repo = {"m-Q8_0.gguf": data, "m-Q6_K.gguf": data, "mmproj-m-F16.gguf": data}
    with FakeHub({"org/M-GGUF": repo}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        result = runner.invoke(cli, ["pull", "hf:org/M-GGUF"])
        assert_one_line_error(
            result, "hf:org/M-GGUF: that picks nothing; its GGUF models are: m-Q6_K.gguf, m-Q8_0.gguf"
        )
        assert runner.invoke(cli, ["pull", "hf:org/M-GGUF:Q6_K"]).exit_code == 0
        assert_one_line_error(runner.invoke(cli, ["pull", "hf:org/Nope"]), "hf:org/Nope: no such model repo")
    assert registry.resolve("hf:org/M-GGUF").name == "hf:org/M-GGUF/m-Q6_K.gguf"


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("org/repo", "edgespec pull takes hf:REPO"),
        ("hf:repo", "does not name a Hub repo"),
        ("hf:org/repo/README.md", "must be a .gguf file"),
        ("hf:org/repo:", "does not name a Hub repo"),
    ],
)
def test_bad_pull_names(runner, name, message):
    assert_one_line_error(runner.invoke(cli, ["pull", name]), message)


def test_choosing_among_a_repos_files():
    files = ["a-Q4_K_M-00001-of-00002.gguf", "a-Q4_K_M-00002-of-00002.gguf", "a-Q8_0.gguf", "mmproj-a.gguf"]
    plan = hub_module.choose_files("o/r", files, None, None)
    assert plan.files == ("a-Q4_K_M-00001-of-00002.gguf", "a-Q4_K_M-00002-of-00002.gguf")
    assert plan.model_id == "a-Q4_K_M.gguf" and "default quantization" in plan.reason
    assert hub_module.choose_files("o/r", files, None, "q8_0").files == ("a-Q8_0.gguf",)
    assert hub_module.choose_files("o/r", ["only.gguf", "x.md"], None, None).reason.endswith(
        "only GGUF model"
    )
    assert hub_module.choose_files("o/r", files, "a-Q8_0.gguf", None).files == ("a-Q8_0.gguf",)


def test_models_rm_deletes_from_the_hub_cache_and_leaves_ollama_alone(
    runner, tiny_pair, tmp_path, monkeypatch
):
    with FakeHub({"org/Tiny-GGUF": {"tiny.gguf": tiny_pair[0].read_bytes()}}) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        assert runner.invoke(cli, ["pull", "hf:org/Tiny-GGUF"]).exit_code == 0
    path = registry.resolve("hf:org/Tiny-GGUF").path
    kept = runner.invoke(cli, ["models", "rm", "hf:org/Tiny-GGUF"], input="n\n")
    assert kept.exit_code != 0 and path.exists()
    gone = runner.invoke(cli, ["models", "rm", "hf:org/Tiny-GGUF", "--yes"])
    assert gone.exit_code == 0, gone.output
    assert not path.exists() and not list(registry.hf_cache_dir().rglob("blobs/*"))
    store = tmp_path / "ollama"
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    blob = ollama_put(store, tiny_pair[0], "registry.ollama.ai", "library", "tiny", "latest")
    assert_one_line_error(runner.invoke(cli, ["models", "rm", "ollama:tiny", "--yes"]), "belongs to Ollama")
    assert blob.exists()
