"""Fuzzing what a hostile user types (issue 17), with hypothesis, on the tiny target.

Prompt strings include lone surrogates, control characters and every plane; standard input gets
arbitrary bytes; profile files get arbitrary sizes, types and contents. Each surface must answer
or refuse in one line, and never fail any other way:
- the API: a result, or a PromptError;
- the CLI (`run` and `chat`, through standard input): exit 0, or exit 1 with one `error:` line;
- both server endpoints: 200, or a 400 with an OpenAI-style body (in test_server.py, which has
  the server helpers);
- profile files: a Profile, or a one-line ProfileError.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from edgespec import Engine
from edgespec.cli.main import cli
from edgespec.errors import ProfileError, PromptError
from edgespec.placement.profiles import read_profile

from ..helpers import ANY_CHAR, HOSTILE_TEXT, fast_model_args, has_utf8_form

FUZZ = settings(max_examples=60, deadline=None, database=None, suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def engine(tiny_pair):
    with Engine(tiny_pair[0], "none", n_ctx=256, threads=1, kernels="fast") as engine:
        yield engine


@FUZZ
@given(text=HOSTILE_TEXT, raw=st.booleans())
@example(text="hi \udcff", raw=False)
@example(text="\x00\x1b[2J\u202e", raw=True)
def test_the_api_answers_any_string_or_refuses_it_in_one_line(engine, text, raw):
    try:
        result = engine.generate(text, raw=raw, max_tokens=2)
    except PromptError as exc:
        assert "\n" not in str(exc)
        assert (
            not has_utf8_form(text) or not text or "the prompt is empty" in str(exc) or "context" in str(exc)
        )
    else:
        assert has_utf8_form(text) and result.stats.n_generated <= 2


@settings(FUZZ, max_examples=25)
@given(data=st.binary(min_size=1, max_size=60))
@example(data=b"hi \xff\xfe")
@example(data=b"\xed\xa0\x80")  # a surrogate encoded in UTF-8: not valid UTF-8
def test_the_cli_answers_any_bytes_on_stdin_or_refuses_them_in_one_line(tiny_pair, data):
    result = CliRunner().invoke(cli, ["run", *fast_model_args(tiny_pair), "--max-tokens", "2"], input=data)
    if result.exit_code == 0:
        return
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        assert "is not valid Unicode" in lines[0]
    else:
        assert "empty" in lines[0] or "context" in lines[0], lines[0]


@settings(FUZZ, max_examples=10)
@given(
    lines=st.lists(
        st.binary(min_size=1, max_size=20).filter(lambda b: b"\n" not in b), min_size=1, max_size=4
    )
)
def test_a_chat_on_any_bytes_keeps_going(tiny_pair, lines):
    data = b"\n".join(lines) + b"\n"
    result = CliRunner().invoke(cli, ["chat", *fast_model_args(tiny_pair), "--max-tokens", "2"], input=data)
    assert result.exit_code == 0, (result.output, result.exception)
    assert "Traceback" not in result.output


PROFILE_CONTENT = st.one_of(
    st.binary(max_size=300),
    st.text(ANY_CHAR, max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.builds(
        lambda name, k, extra: f'schema = 1\nname = "{name}"\n[speculation]\nk = {k}\n{extra}'.encode(
            "utf-8", "surrogatepass"
        ),
        st.text(ANY_CHAR, max_size=12),
        st.integers(-(2**70), 2**70),
        st.text(ANY_CHAR, max_size=30),
    ),
)


@settings(FUZZ, max_examples=150)
@given(content=PROFILE_CONTENT)
@example(content=b"schema = 1\nname = \n")
@example(content=b"\xff\xfe")
def test_a_profile_file_of_any_content_reads_or_is_one_line(tmp_path_factory, content):
    path = Path(tmp_path_factory.mktemp("profile")) / "fuzzed.toml"
    path.write_bytes(content)
    try:
        read_profile(path)
    except ProfileError as exc:
        assert "\n" not in str(exc) and str(path) in str(exc)


@pytest.mark.parametrize("kind", ["folder", "fifo", "device", "symlink-loop", "empty", "huge"])
def test_a_profile_path_of_any_type_reads_or_is_one_line(tmp_path, kind):
    path = tmp_path / "p.toml"
    if kind == "folder":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path = Path("/dev/zero")
    elif kind == "symlink-loop":
        path.symlink_to(path)
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        path.write_bytes(b"# " * (1 << 20))
    with pytest.raises(ProfileError) as caught:
        read_profile(path)
    assert "\n" not in str(caught.value) and str(path) in str(caught.value)
