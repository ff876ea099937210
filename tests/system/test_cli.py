"""The command line through click's CliRunner (and once as a real process)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgespec import __version__
from edgespec.cli.main import cli

from ..conftest import tiny_model_args
from ..helpers import assert_one_line_error


@pytest.fixture()
def runner(tmp_path, monkeypatch) -> CliRunner:
    monkeypatch.setenv("EDGESPEC_CACHE_DIR", str(tmp_path / "cache"))
    return CliRunner()


def tiny_args(tiny_pair, *extra: str) -> list[str]:
    return ["run", *tiny_model_args(tiny_pair), *extra]


def test_version(runner):
    result = runner.invoke(cli, ["--version"])
    assert result.exit_code == 0 and __version__ in result.stdout


def test_run_streams_the_same_text_as_json_and_target_only(runner, tiny_pair):
    streamed = runner.invoke(cli, tiny_args(tiny_pair, "--max-tokens", "24", "the cat sat"))
    assert streamed.exit_code == 0, streamed.output
    record = json.loads(
        runner.invoke(cli, tiny_args(tiny_pair, "--max-tokens", "24", "--json", "the cat sat")).stdout
    )
    assert streamed.stdout == record["text"] + "\n"
    assert len(record["tokens"]) == 24 and record["finish_reason"] == "length"
    assert record["stats"]["n_generated"] == 24 and record["draft_max"] == 4
    alone = json.loads(
        runner.invoke(
            cli, tiny_args(tiny_pair, "--draft", "none", "--max-tokens", "24", "--json", "the cat sat")
        ).stdout
    )
    assert alone["tokens"] == record["tokens"] and alone["draft"] == "none"
    ngram = json.loads(
        runner.invoke(
            cli, tiny_args(tiny_pair, "--draft", "ngram", "--max-tokens", "24", "--json", "the cat sat")
        ).stdout
    )
    assert ngram["tokens"] == record["tokens"]


def test_raw_prompt_from_stdin_and_stats(runner, tiny_pair):
    result = runner.invoke(
        cli,
        tiny_args(tiny_pair, "--raw", "--max-tokens", "8", "--stats", "-k", "2"),
        input="once upon a time",
    )
    assert result.exit_code == 0, result.output
    assert "tokens/s" in result.stderr and "tokens per target pass" in result.stderr
    assert "acceptance" in result.stderr and result.stdout.strip()


def test_chat_template_is_applied(runner, tiny_pair):
    chat = json.loads(runner.invoke(cli, tiny_args(tiny_pair, "--json", "--max-tokens", "4", "hi")).stdout)
    raw = json.loads(
        runner.invoke(cli, tiny_args(tiny_pair, "--json", "--raw", "--max-tokens", "4", "hi")).stdout
    )
    # "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n" is far longer than BOS + "hi"
    assert chat["prompt_tokens"] > raw["prompt_tokens"] + 5


def test_stop_string_option(runner, tiny_pair):
    full = json.loads(
        runner.invoke(cli, tiny_args(tiny_pair, "--json", "--max-tokens", "30", "the cat")).stdout
    )
    stop = full["text"].split()[4]
    cut = json.loads(
        runner.invoke(
            cli, tiny_args(tiny_pair, "--json", "--max-tokens", "30", "--stop", stop, "the cat")
        ).stdout
    )
    assert cut["finish_reason"] == "stop" and cut["text"] == full["text"][: full["text"].index(stop)]


def test_missing_model_file(runner, tmp_path):
    result = runner.invoke(cli, ["run", "--target", str(tmp_path / "none.gguf"), "--draft", "none", "hi"])
    assert_one_line_error(result, "model file not found")


def test_file_that_is_not_gguf(runner, tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04 this is a zip")
    result = runner.invoke(cli, ["run", "--target", str(path), "--draft", "none", "hi"])
    assert_one_line_error(result, "is not a GGUF model file")


def test_truncated_gguf(runner, tiny_pair, tmp_path):
    path = tmp_path / "cut.gguf"
    path.write_bytes(tiny_pair[0].read_bytes()[:5000])
    result = runner.invoke(cli, ["run", "--target", str(path), "--draft", "none", "hi"])
    assert_one_line_error(result, "could not load")


def test_incompatible_pair(runner, tiny_pair, tiny_changed_vocab):
    result = runner.invoke(
        cli, ["run", "--target", str(tiny_pair[0]), "--draft", str(tiny_changed_vocab), "hi"]
    )
    assert_one_line_error(result, "token 300 differs")


def test_empty_prompt(runner, tiny_pair):
    assert_one_line_error(runner.invoke(cli, tiny_args(tiny_pair, "   ")), "the prompt is empty")
    assert_one_line_error(runner.invoke(cli, tiny_args(tiny_pair), input=""), "the prompt is empty")


def test_prompt_longer_than_context(runner, tiny_pair):
    result = runner.invoke(cli, tiny_args(tiny_pair, "--raw", "the cat sat on the mat " * 100))
    assert_one_line_error(result, "the context holds 256")


def test_max_tokens_zero(runner, tiny_pair):
    assert_one_line_error(runner.invoke(cli, tiny_args(tiny_pair, "--max-tokens", "0", "hi")), "--max-tokens")


def test_models_lists_the_default_pair(runner):
    result = runner.invoke(cli, ["models", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {m["role"] for m in data["default_pair"]} == {"target", "draft"}
    assert all(not m["cached"] and not m["verified"] for m in data["default_pair"])  # empty temporary cache
    assert "cache:" in runner.invoke(cli, ["models"]).stdout


def test_real_process_error_has_no_traceback(tmp_path: Path):
    proc = subprocess.run(
        [sys.executable, "-m", "edgespec", "run", "--target", str(tmp_path / "x.gguf"), "hi"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip() == f"error: model file not found: {tmp_path / 'x.gguf'}"


def test_unexpected_failure_is_one_line_unless_debugging(runner, tiny_pair, monkeypatch):
    import edgespec.engine as engine

    def broken(*_args):
        raise ZeroDivisionError("boom")

    monkeypatch.setattr(engine, "verify_greedy", broken)
    assert_one_line_error(
        runner.invoke(cli, tiny_args(tiny_pair, "hi")), "unexpected ZeroDivisionError: boom"
    )
    monkeypatch.setenv("EDGESPEC_DEBUG", "1")
    assert isinstance(runner.invoke(cli, tiny_args(tiny_pair, "hi")).exception, ZeroDivisionError)


def test_sampling_options(runner, tiny_pair):
    args = ["--temperature", "0.8", "--top-p", "0.95", "--top-k", "20", "--seed", "7", "--json"]
    first = runner.invoke(cli, tiny_args(tiny_pair, *args, "--max-tokens", "20", "the cat sat"))
    assert first.exit_code == 0, first.output
    record = json.loads(first.stdout)
    assert record["seed"] == 7 and record["sampling"]["temperature"] == 0.8
    again = runner.invoke(cli, tiny_args(tiny_pair, *args, "--max-tokens", "20", "the cat sat"))
    assert json.loads(again.stdout)["tokens"] == record["tokens"]
    extra = ["--accept", "exact", "--logit-bias", "5=-inf", "hi"]
    exact = runner.invoke(cli, tiny_args(tiny_pair, *args, *extra))
    assert exact.exit_code == 0, exact.output
    assert json.loads(exact.stdout)["sampling"]["logit_bias"] == {"5": "-inf"}


def test_bad_sampling_options(runner, tiny_pair):
    result = runner.invoke(cli, tiny_args(tiny_pair, "--logit-bias", "x", "hi"))
    assert_one_line_error(result, "TOKEN_ID=BIAS")
    result = runner.invoke(cli, tiny_args(tiny_pair, "--logit-bias", "99999=1", "hi"))
    assert_one_line_error(result, "logit_bias token 99999 is not in the vocabulary")
    assert_one_line_error(runner.invoke(cli, tiny_args(tiny_pair, "--top-p", "0", "hi")), "--top-p")


def test_a_multi_line_library_message_is_printed_on_one_line(runner, tiny_pair, monkeypatch):
    """An error quoting a library's multi-line message still reaches the user as one line."""
    from edgespec import api
    from edgespec.errors import ExportError

    def fail(*args, **kwargs):
        raise ExportError("the exporter failed:\nTraceback-like detail\n  more detail")

    monkeypatch.setattr(api.Engine, "_build", fail)
    result = runner.invoke(cli, ["run", *tiny_model_args(tiny_pair), "hi"])
    assert result.exit_code == 1
    assert result.stderr == "error: the exporter failed: Traceback-like detail more detail\n"
