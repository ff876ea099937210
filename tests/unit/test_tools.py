"""Tool calls read out of answers in each family's format, and tool definitions checked."""

from __future__ import annotations

import json

import pytest

from edgespec.errors import SettingsError
from edgespec.tools import (
    FORMATS,
    format_for,
    parse_calls,
    read_tool_choice,
    read_tools,
    template_messages,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
NAMES = {"get_weather", "get_time"}


def test_hermes_calls_and_the_text_before_them():
    text = (
        "Let me check.\n<tool_call>\n"
        '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n<tool_call>\n'
        '{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>'
    )
    content, calls = parse_calls(text, FORMATS["hermes"], NAMES)
    assert content == "Let me check."
    assert [(c.name, dict(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {"zone": "CET"}),
    ]
    assert len({c.id for c in calls}) == 2 and all(c.id.startswith("call_") for c in calls)
    openai = calls[0].to_openai()
    assert openai["type"] == "function" and json.loads(openai["function"]["arguments"]) == {"city": "Paris"}


@pytest.mark.parametrize(
    "text",
    [
        "no calls here",
        '<tool_call>\n{"name": "unknown_tool", "arguments": {}}\n</tool_call>',
        '<tool_call>\n{"name": "get_weather", "arguments": "Paris"}\n</tool_call>',
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par',  # cut short
        "<tool_call>\nnot json\n</tool_call>",
    ],
)
def test_what_is_not_a_whole_call_stays_text(text):
    content, calls = parse_calls(text, FORMATS["hermes"], NAMES)
    assert calls == [] and content == text


def test_mistral_and_llama3_formats():
    content, calls = parse_calls(
        '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Oslo"}}, '
        '{"name": "get_time", "arguments": {}}]',
        FORMATS["mistral"],
        NAMES,
    )
    assert content is None and [c.name for c in calls] == ["get_weather", "get_time"]
    content, calls = parse_calls(
        '{"name": "get_weather", "parameters": {"city": "Rome"}}', FORMATS["llama3"], NAMES
    )
    assert content is None and dict(calls[0].arguments) == {"city": "Rome"}


def test_formats_come_from_the_template():
    assert format_for("... <tool_call> ...").name == "hermes"
    assert format_for("... [TOOL_CALLS] ...").name == "mistral"
    assert format_for("... <|python_tag|> ...").name == "llama3"
    assert format_for(None).name == "hermes"


@pytest.mark.parametrize(
    ("tools", "message"),
    [
        ([], "tools must be a non-empty list"),
        ("get_weather", "tools must be a non-empty list"),
        ([{"type": "retrieval"}], r"tools\[0\] must be"),
        ([{"type": "function", "function": {"name": "a b"}}], r"tools\[0\].function.name must be"),
        ([{"type": "function", "function": {"name": "f", "parameters": []}}], "parameters must be a JSON"),
        (
            [{"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}],
            r"tools\[0\].function.parameters: the JSON schema is not valid",
        ),
        ([WEATHER, WEATHER], "different names"),
    ],
)
def test_bad_tools(tools, message):
    with pytest.raises(SettingsError, match=message):
        read_tools(tools)


def test_tool_choice():
    tools = read_tools([WEATHER])
    assert read_tool_choice(None, tools).mode == "auto"
    assert read_tool_choice("required", tools, False).parallel is False
    named = read_tool_choice({"type": "function", "function": {"name": "get_weather"}}, tools)
    assert (named.mode, named.function, named.parallel) == ("function", "get_weather", False)
    with pytest.raises(SettingsError, match="not in tools"):
        read_tool_choice({"type": "function", "function": {"name": "nope"}}, tools)
    with pytest.raises(SettingsError, match="tool_choice must be"):
        read_tool_choice("sometimes", tools)
    with pytest.raises(SettingsError, match="parallel_tool_calls must be"):
        read_tool_choice("auto", tools, "yes")


def test_messages_for_the_template():
    messages = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "c1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "12 C"},
    ]
    tools = read_tools([WEATHER])
    rendered, specs = template_messages(messages, tools, "{{ tools }} <tool_call>")
    assert rendered[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Oslo"}  # an object
    assert rendered[1]["content"] == "" and specs == [tools[0].to_openai()]
    # A template with no place for tools: they are described in a system message.
    rendered, specs = template_messages(messages, tools, "{% for m in messages %}{% endfor %}")
    assert specs is None and rendered[0]["role"] == "system" and "get_weather" in rendered[0]["content"]


def test_a_call_written_as_a_bare_or_fenced_json_answer_is_a_call():
    for text in (
        '{"name": "get_weather", "arguments": {"city": "Paris"}}',
        '```json\n{\n  "name": "get_weather",\n  "arguments": {"city": "Paris"}\n}\n```',
    ):
        content, calls = parse_calls(text, FORMATS["hermes"], NAMES)
        assert content is None and [(c.name, dict(c.arguments)) for c in calls] == [
            ("get_weather", {"city": "Paris"})
        ]
    # A code block that is not a call, or text around it, stays text.
    for text in ('```json\n{"a": 1}\n```', 'Call: {"name": "get_weather", "arguments": {}} now'):
        assert parse_calls(text, FORMATS["hermes"], NAMES) == (text, [])
