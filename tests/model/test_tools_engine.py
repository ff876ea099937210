"""Tool calling through `Engine.chat` on tiny models: calls generated under a grammar parse and
match their schemas, and a special call marker is constrained from the moment it starts."""

from __future__ import annotations

import dataclasses

import jsonschema
import pytest

from edgespec import Engine
from edgespec.errors import SettingsError

from ..tinymodels import TokenType, build_tiny_model, default_vocab, vocab_with_changed_token

WEATHER_PARAMS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city", "days"],
    "additionalProperties": False,
}
TIME_PARAMS = {
    "type": "object",
    "properties": {"zone": {"enum": ["UTC", "CET", "PST"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Forecast", "parameters": WEATHER_PARAMS},
    },
    {"type": "function", "function": {"name": "get_time", "description": "Clock", "parameters": TIME_PARAMS}},
]
SCHEMAS = {"get_weather": WEATHER_PARAMS, "get_time": TIME_PARAMS}
ASK = [{"role": "user", "content": "the cat sat"}]

#: A Hermes-style template (as Qwen2.5's): it renders tools, calls and tool results.
TOOL_TEMPLATE = (
    "{% if tools %}<|im_start|>system\n{% for t in tools %}{{ t | tojson }}\n{% endfor %}"
    "Call tools with <tool_call>...</tool_call><|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}<tool_call>\n"
    '{"name": "{{ c.function.name }}", "arguments": {{ c.function.arguments | tojson }}}\n'
    "</tool_call>{% endfor %}{% else %}{{ m.content }}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def tool_model(tmp_path_factory):
    """A tiny target whose vocabulary has <tool_call> and </tool_call> as user-defined tokens (as
    Qwen2.5's has) and whose template renders tools."""
    vocab = default_vocab()
    n = vocab.size
    vocab = vocab_with_changed_token(vocab, n - 1, "<tool_call>")
    vocab = vocab_with_changed_token(vocab, n - 2, "</tool_call>")
    types = list(vocab.types)
    types[n - 1] = types[n - 2] = TokenType.USER_DEFINED
    vocab = dataclasses.replace(vocab, types=tuple(types))
    path = tmp_path_factory.mktemp("tools") / "tool-target.gguf"
    build_tiny_model(path, seed=1, n_embd=96, n_layer=3, n_ff=192, vocab=vocab, chat_template=TOOL_TEMPLATE)
    return path, n - 1


@pytest.fixture(scope="module")
def engine(tiny_pair):
    with Engine(
        tiny_pair[0], tiny_pair[1], n_ctx=2048, threads=1, cache_prompt=False, kernels="exact"
    ) as engine:
        yield engine


def assert_valid_calls(result):
    assert result.finish_reason == "tool_calls" and result.tool_calls
    for call in result.tool_calls:
        jsonschema.validate(dict(call.arguments), SCHEMAS[call.name])


def test_required_calls_parse_and_match_their_schemas(engine):
    # Several calls are allowed: the tiny model goes on calling until max_tokens, each call whole.
    many = engine.chat(ASK, tools=TOOLS, tool_choice="required", max_tokens=200)
    assert many.text.startswith("<tool_call>\n{") and many.text.count("</tool_call>\n<tool_call>") >= 1
    single = engine.chat(ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=200)
    assert_valid_calls(single)
    assert len(single.tool_calls) == 1
    named = engine.chat(
        ASK, tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_time"}}, max_tokens=100
    )
    assert_valid_calls(named)
    assert [c.name for c in named.tool_calls] == ["get_time"]


def test_tool_calls_under_speculation_equal_target_only(engine):
    spec = engine.chat(ASK, tools=TOOLS, tool_choice="required", max_tokens=150)
    alone = engine.chat(ASK, tools=TOOLS, tool_choice="required", max_tokens=150, draft_max=0)
    assert spec.tokens == alone.tokens
    assert spec.stats.n_forced > 0


def test_none_and_auto_without_a_special_marker(engine):
    none = engine.chat(ASK, tools=TOOLS, tool_choice="none", max_tokens=30)
    assert none.tool_calls == () and none.finish_reason in ("stop", "length")
    # The tiny default vocabulary has no <tool_call> token: auto is unconstrained, calls parsed.
    assert engine.plan_tools(TOOLS, "auto").grammar is None


def test_a_special_call_marker_is_constrained_from_the_moment_it_starts(tool_model):
    path, marker = tool_model
    with Engine(path, "none", n_ctx=2048, threads=1, cache_prompt=False) as engine:
        plan = engine.plan_tools(TOOLS, "auto")
        assert plan.grammar is not None and f"<[{marker}]>" in plan.grammar.source
        # Pushed to start a call at once, the model's call still parses against the schema.
        eager = engine.chat(
            ASK, tools=TOOLS, parallel_tool_calls=False, max_tokens=200, logit_bias={marker: 100.0}
        )
        assert eager.tokens[0] == marker
        assert_valid_calls(eager)
        assert eager.content is None
        # With tool_choice "none" the same push cannot start a call.
        held = engine.chat(ASK, tools=TOOLS, tool_choice="none", max_tokens=30, logit_bias={marker: 100.0})
        assert marker not in held.tokens and held.tool_calls == ()


def test_a_round_trip_renders_calls_and_results(tool_model):
    path, _ = tool_model
    with Engine(path, "none", n_ctx=2048, threads=1, cache_prompt=False) as engine:
        first = engine.chat(
            ASK, tools=TOOLS, tool_choice="required", parallel_tool_calls=False, max_tokens=200
        )
        assert_valid_calls(first)
        call = first.tool_calls[0].to_openai()
        history = [
            *ASK,
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": call["id"], "content": "sunny"},
        ]
        tokens = engine.chat_tokens(history, TOOLS)
        text = b"".join(engine._pair.engine.target.token_bytes(t) for t in tokens).decode()
        assert '"arguments": {' in text and "sunny" in text and "get_weather" in text
        final = engine.chat(history, tools=TOOLS, tool_choice="none", max_tokens=20)
        assert final.tool_calls == ()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"tools": TOOLS, "tool_choice": "maybe"}, "tool_choice must be"),
        ({"tool_choice": "required"}, "tool_choice and parallel_tool_calls need tools"),
        (
            {"tools": TOOLS, "tool_choice": "required", "json_schema": {"type": "object"}},
            "cannot be combined",
        ),
        ({"tools": [{"type": "function"}]}, r"tools\[0\].function must be"),
    ],
)
def test_bad_tool_requests(engine, kwargs, message):
    with pytest.raises(SettingsError, match=message):
        engine.chat(ASK, max_tokens=5, **kwargs)
    assert not engine.busy


def test_edgespec_chat_shows_calls_and_asks_for_their_results(tool_model, tmp_path, monkeypatch):
    """`edgespec chat --tools`: a call is shown as name(arguments), not as its raw text; the next
    input line is its result, and the model goes on from it."""
    import json

    from click.testing import CliRunner

    from edgespec.cli.main import cli

    path, marker = tool_model
    monkeypatch.setenv("EDGESPEC_CONFIG_DIR", str(tmp_path / "config"))
    tools_file = tmp_path / "tools.json"
    tools_file.write_text(json.dumps(TOOLS[:1]))
    args = ["chat", "--target", str(path), "--draft", "none", "--threads", "1", "--ctx", "2048"]
    args += ["--max-tokens", "80", "--logit-bias", "2=100", "--logit-bias", "3=100"]
    args += ["--logit-bias", f"{marker}=100", "--tools", str(tools_file)]
    # The biases make every answer one call (ended where the grammar allows an end): the chat shows
    # each and reads its result, until input ends.
    result = CliRunner().invoke(cli, args, input="the cat sat\nsunny\n")
    assert result.exit_code == 0, result.output
    shown = [line for line in result.stderr.splitlines() if line.startswith("→ get_weather(")]
    assert len(shown) == 2, result.stderr
    arguments = json.loads(shown[0][len("→ get_weather(") : -1])
    jsonschema.validate(arguments, WEATHER_PARAMS)
    assert "<tool_call>" not in result.stdout  # the call's raw text is never printed
    bad = tmp_path / "bad.json"
    bad.write_text('[{"type": "function"}]')
    refused = CliRunner().invoke(cli, [*args[:-2], "--tools", str(bad)], input="hi\n")
    assert refused.exit_code == 2 and "tools[0].function must be" in refused.output
