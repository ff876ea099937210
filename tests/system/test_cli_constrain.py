"""`edgespec run --json-schema / --regex / --grammar` on the tiny pair."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from click.testing import CliRunner

from edgespec.cli.main import cli

from ..conftest import tiny_model_args

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 10},
        "n": {"type": "integer", "minimum": 0, "maximum": 999},
    },
    "required": ["name", "n"],
    "additionalProperties": False,
}


@pytest.fixture()
def runner(tmp_path, monkeypatch) -> CliRunner:
    monkeypatch.setenv("EDGESPEC_CACHE_DIR", str(tmp_path / "cache"))
    return CliRunner()


def run_json(runner, tiny_pair, *extra):
    result = runner.invoke(cli, ["run", *tiny_model_args(tiny_pair), "--max-tokens", "60", "--json", *extra])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_json_schema_inline_and_from_a_file_give_valid_json(runner, tiny_pair, tmp_path):
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(SCHEMA))
    inline = run_json(runner, tiny_pair, "--json-schema", json.dumps(SCHEMA), "the cat")
    from_file = run_json(runner, tiny_pair, "--json-schema", str(schema_file), "the cat")
    alone = run_json(runner, tiny_pair, "--json-schema", str(schema_file), "--draft", "none", "the cat")
    assert inline["tokens"] == from_file["tokens"] == alone["tokens"]
    assert inline["finish_reason"] == "stop"
    jsonschema.validate(json.loads(inline["text"]), SCHEMA)
    assert inline["stats"]["n_forced"] > 0


def test_regex_and_grammar(runner, tiny_pair, tmp_path):
    record = run_json(runner, tiny_pair, "--regex", r"(yes|no)\.", "the cat")
    assert re.fullmatch(r"(yes|no)\.", record["text"])
    grammar = tmp_path / "colors.gbnf"
    grammar.write_text('root ::= "red" | "green" | "blue"\n')
    record = run_json(runner, tiny_pair, "--grammar", str(grammar), "the cat")
    assert record["text"] in ("red", "green", "blue")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--json-schema", '{"type": "nonsense"}'], "the JSON schema is not valid"),
        (["--json-schema", "missing.json"], "cannot read missing.json"),
        (["--regex", "(("], "the regular expression is not valid"),
        (["--grammar", "missing.lark"], "cannot read missing.lark"),
        (["--regex", "a", "--json-schema", "{}"], "give at most one of"),
    ],
)
def test_bad_constraints_are_one_line_errors_before_loading(runner, tmp_path, args, message):
    # The model paths do not exist: the constraint is refused before anything loads.
    missing = ["--target", str(tmp_path / "none.gguf"), "--draft", "none"]
    result = runner.invoke(cli, ["run", *missing, *args, "the cat"])
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output
