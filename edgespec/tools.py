"""Tool calling: tools go into the model's own chat template, and calls come back out of its answer.
The answer is generated under a grammar, so every call parses against its tool's parameter schema.

A model family writes its calls in its own format. The format is read off the chat template, using
the small table `FORMATS`:
- "hermes" (Qwen2.5, Hermes, and many others): `<tool_call>\\n{"name": ..., "arguments": {...}}
  \\n</tool_call>`, one block per call, after optional text;
- "mistral": `[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`;
- "llama3": a bare `{"name": ..., "parameters": {...}}` as the whole answer.
A template that does not render tools at all gets them described in a system message, with the
"hermes" format asked for.

`tool_choice` decides the grammar:
- "required", or a named function: the answer is one call (several with `parallel_tool_calls`),
  from its first token;
- "auto": text, or calls. When the call marker is one special token of the vocabulary (Qwen's
  `<tool_call>` is), text can never produce it, so the call is constrained from the moment the
  model starts it. Otherwise the answer is unconstrained and calls are parsed out of it;
- "none": no call (a special call marker is banned).
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from edgespec.constrain import JSON_STYLE, Grammar, grammar_special
from edgespec.errors import SettingsError

if TYPE_CHECKING:
    from edgespec.runtimes.base import Runtime


@dataclass(frozen=True)
class ToolFormat:
    """How a model family writes tool calls.

    Attributes:
        name: the family's format name.
        start: the text that opens the calls (a call block, or the list of calls).
        end: the text that closes a call block ("" when nothing does).
        arguments_key: the key holding the arguments ("arguments" or "parameters").
        as_list: the calls are one JSON list after `start` (else one block per call).
        marker: text in a chat template that identifies the family.
    """

    name: str
    start: str
    end: str
    arguments_key: str
    as_list: bool
    marker: str


FORMATS = {
    "hermes": ToolFormat("hermes", "<tool_call>", "</tool_call>", "arguments", False, "<tool_call>"),
    "mistral": ToolFormat("mistral", "[TOOL_CALLS]", "", "arguments", True, "[TOOL_CALLS]"),
    "llama3": ToolFormat("llama3", "", "", "parameters", False, "<|python_tag|>"),
}

#: what a template that does not render tools is told, in a system message
_INJECTED = (
    "You can call these functions (JSON schemas of their parameters):\n{tools}\n\n"
    'To call one, answer with <tool_call>\n{{"name": <function-name>, "arguments": <args-json-object>}}\n'
    "</tool_call> (one block per call)."
)


def format_for(template: str | None) -> ToolFormat:
    """The tool-call format a chat template teaches its model ("hermes" when it names none)."""
    for fmt in FORMATS.values():
        if template and fmt.marker in template:
            return fmt
    return FORMATS["hermes"]


def template_renders_tools(template: str | None) -> bool:
    return bool(template) and "tools" in (template or "")


@dataclass(frozen=True)
class Tool:
    """One function the model may call: its name, description and parameter schema."""

    name: str
    description: str
    parameters: Mapping[str, Any]

    def to_openai(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": dict(self.parameters),
            },
        }


@dataclass(frozen=True)
class ToolCall:
    """A call the model made: an id for the tool's answer to refer to, the function's name and its
    arguments (parsed, and valid against the tool's schema when generated under the grammar)."""

    id: str
    name: str
    arguments: Mapping[str, Any]

    def to_openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": json.dumps(self.arguments, ensure_ascii=False)},
        }


def read_tools(tools: Any) -> list[Tool]:
    """OpenAI's `tools` list ([{"type": "function", "function": {name, description, parameters}}])
    as Tools; a SettingsError naming the field otherwise."""
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)) or not tools:
        raise SettingsError("tools must be a non-empty list of {'type': 'function', 'function': {...}}")
    out: list[Tool] = []
    for i, tool in enumerate(tools):
        if isinstance(tool, Tool):
            out.append(tool)
            continue
        if not isinstance(tool, Mapping) or tool.get("type") != "function":
            raise SettingsError(f"tools[{i}] must be {{'type': 'function', 'function': {{...}}}}")
        function = tool.get("function")
        if not isinstance(function, Mapping):
            raise SettingsError(f"tools[{i}].function must be an object with a 'name'")
        name = function.get("name")
        if not isinstance(name, str) or not re.fullmatch(r"[A-Za-z0-9_.\-]{1,64}", name):
            raise SettingsError(f"tools[{i}].function.name must be 1-64 letters, digits, '_', '.' or '-'")
        description = function.get("description") or ""
        if not isinstance(description, str):
            raise SettingsError(f"tools[{i}].function.description must be a string")
        parameters = function.get("parameters")
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        if not isinstance(parameters, Mapping):
            raise SettingsError(f"tools[{i}].function.parameters must be a JSON schema object")
        try:
            Grammar.json_schema(parameters)
        except SettingsError as e:
            raise SettingsError(f"tools[{i}].function.parameters: {e}") from None
        out.append(Tool(name, description, parameters))
    if len({t.name for t in out}) != len(out):
        raise SettingsError("tools must have different names")
    return out


@dataclass(frozen=True)
class ToolChoice:
    """What the answer may be: "auto" (text or calls), "none", "required" (calls), or one named
    function; `parallel` allows several calls."""

    mode: str
    function: str | None = None
    parallel: bool = True


def read_tool_choice(value: Any, tools: Sequence[Tool], parallel: Any = None) -> ToolChoice:
    """OpenAI's `tool_choice` ("auto", "none", "required" or {"type": "function", "function":
    {"name": ...}}) and `parallel_tool_calls`."""
    if parallel is not None and not isinstance(parallel, bool):
        raise SettingsError(f"parallel_tool_calls must be true or false, got {parallel!r}")
    allow_many = True if parallel is None else parallel
    if value is None:
        return ToolChoice("auto", parallel=allow_many)
    if value in ("auto", "none", "required"):
        return ToolChoice(value, parallel=allow_many)
    if isinstance(value, Mapping) and value.get("type") == "function":
        function = value.get("function")
        name = function.get("name") if isinstance(function, Mapping) else None
        if name not in {t.name for t in tools}:
            raise SettingsError(f"tool_choice names a function that is not in tools: {name!r}")
        return ToolChoice("function", name, parallel=False)
    raise SettingsError(
        "tool_choice must be 'auto', 'none', 'required' or {'type': 'function', 'function': {'name': ...}}"
    )


def _call_schema(tools: Sequence[Tool], fmt: ToolFormat) -> dict[str, Any]:
    """The JSON schema of one call to any of `tools`."""
    options = [
        {
            "type": "object",
            "properties": {"name": {"const": t.name}, fmt.arguments_key: dict(t.parameters)},
            "required": ["name", fmt.arguments_key],
            "additionalProperties": False,
        }
        for t in tools
    ]
    schema: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "x-guidance": JSON_STYLE}


def _special_token(runtime: Runtime, text: str) -> int | None:
    """The id of the one special token that spells `text`, or None when no single special token
    does (then the text is written as ordinary tokens)."""
    if not text:
        return None
    ids = runtime.tokenize(text, add_special=False, parse_special=True)
    return ids[0] if len(ids) == 1 and grammar_special(runtime, ids[0]) else None


@dataclass(frozen=True)
class ToolPlan:
    """How to generate and read one answer that may call tools.

    Attributes:
        tools: the tools offered.
        choice: what the answer may be.
        format: the model family's call format.
        grammar: the constraint on the answer (None: unconstrained, calls parsed afterwards).
    """

    tools: tuple[Tool, ...]
    choice: ToolChoice
    format: ToolFormat
    grammar: Grammar | None

    def parse(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(the text before any call, or None when there is none; the calls)."""
        return parse_calls(text, self.format, {t.name for t in self.tools})

    def visible(self, text: str) -> int:
        """How much of an answer so far can be shown as text while it streams: what comes
        before anything that may start a call (a call is shown once it is whole and parsed)."""
        start = self.format.start
        if not start:  # a bare JSON call: nothing is known to be text until the end
            return 0
        at = text.find(start)
        if at >= 0:
            return at
        for n in range(min(len(start) - 1, len(text)), 0, -1):  # a start cut at the end
            if text.endswith(start[:n]):
                return len(text) - n
        return len(text)


def plan_tools(runtime: Runtime, template: str | None, tools: Sequence[Tool], choice: ToolChoice) -> ToolPlan:
    """The grammar and format for answering with `tools` under `choice` on this model."""
    fmt = format_for(template) if template_renders_tools(template) else FORMATS["hermes"]
    offered = [t for t in tools if choice.function in (None, t.name)]
    start_id = _special_token(runtime, fmt.start)
    end_id = _special_token(runtime, fmt.end)
    start = f"<[{start_id}]>" if start_id is not None else json.dumps(fmt.start)
    end = f"<[{end_id}]>" if end_id is not None else json.dumps(fmt.end)
    body = "%json " + json.dumps(_call_schema(offered, fmt))
    if fmt.as_list:
        many = '"[" body ("," " " body)* "]"' if choice.parallel else '"[" body "]"'
        calls = f"{start} {many}"
    elif fmt.start:
        block = f'{start} "\\n" body "\\n" {end}'
        calls = f'{block} ("\\n" {block})*' if choice.parallel else block
    else:
        calls = "body"
    if choice.mode == "none":
        source = "start: TEXT?\nTEXT: /(?s:.+)/\n" if start_id is not None else None
    elif choice.mode == "auto":
        # Text cannot spell a special token, so a call can start only through `calls`.
        source = f"start: TEXT | TEXT? calls\ncalls: {calls}\nbody: {body}\nTEXT: /(?s:.+)/\n"
        source = source if start_id is not None else None
    else:
        source = f"start: calls\ncalls: {calls}\nbody: {body}\n"
    grammar = None if source is None else Grammar.lark(source)
    return ToolPlan(tuple(tools), choice, fmt, grammar)


def parse_calls(text: str, fmt: ToolFormat, names: set[str]) -> tuple[str | None, list[ToolCall]]:
    """The calls in an answer written in `fmt`, and the text before them. A block that does not
    parse, or names no offered tool, is left in the text."""
    found: list[dict[str, Any]] = []
    cut = len(text)
    if fmt.as_list:
        at = text.find(fmt.start)
        if at >= 0:
            calls = _json_at(text, at + len(fmt.start))
            if isinstance(calls, list) and all(_is_call(c, fmt, names) for c in calls):
                found, cut = calls, at
    elif fmt.start:
        pattern = re.compile(re.escape(fmt.start) + r"\s*(.*?)\s*" + re.escape(fmt.end), re.S)
        for match in pattern.finditer(text):
            call = _json_at(match.group(1), 0)
            if not _is_call(call, fmt, names):
                break
            found.append(call)
            cut = min(cut, match.start())
    else:
        call = _json_at(text.strip(), 0)
        if _is_call(call, fmt, names):
            found, cut = [call], 0
    if not found:
        # A small model may write its call as a bare JSON answer, or in a Markdown code block,
        # instead of its family's format: the whole answer is then the call.
        whole = _json_at(_unfenced(text), 0)
        whole = whole if isinstance(whole, list) else [whole]
        if whole and all(_is_call(c, fmt, names) or _is_call(c, FORMATS["hermes"], names) for c in whole):
            found, cut = whole, 0
    if not found:
        return text, []
    content = text[:cut].strip() or None
    key = fmt.arguments_key
    calls = [
        ToolCall(f"call_{secrets.token_hex(12)}", c["name"], c[key] if key in c else c["arguments"])
        for c in found
    ]
    return content, calls


def _unfenced(text: str) -> str:
    """The answer without a Markdown code block around it (```json ... ```), when it is one."""
    body = text.strip()
    if body.startswith("```") and body.endswith("```") and len(body) > 6:
        body = body[3:-3]
        return body.split("\n", 1)[1] if "\n" in body else body
    return body


def _json_at(text: str, start: int) -> Any:
    try:
        value, _ = json.JSONDecoder().raw_decode(text[start:].lstrip())
    except ValueError:
        return None
    return value


def _is_call(value: Any, fmt: ToolFormat, names: set[str]) -> bool:
    return (
        isinstance(value, dict)
        and value.get("name") in names
        and isinstance(value.get(fmt.arguments_key), dict)
    )


def template_messages(
    messages: Sequence[Mapping[str, Any]], tools: Sequence[Tool] | None, template: str | None
):
    """The conversation as chat templates expect it: a call's arguments as an object, not JSON
    text; and, for a template that does not render tools, the tools described in a system message.

    Returns (messages, tools for the template or None)."""
    out: list[dict[str, Any]] = []
    for message in messages:
        message = dict(message)
        calls = message.get("tool_calls")
        if calls:
            message["tool_calls"] = [_template_call(c) for c in calls]
            if message.get("content") is None:
                message["content"] = ""
        out.append(message)
    if not tools:
        return out, None
    specs = [t.to_openai() for t in tools]
    if template_renders_tools(template):
        return out, specs
    described = _INJECTED.format(
        tools="\n".join(json.dumps(s["function"], ensure_ascii=False) for s in specs)
    )
    if out and out[0].get("role") == "system":
        out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{described}"}
    else:
        out.insert(0, {"role": "system", "content": described})
    return out, None


def _template_call(call: Mapping[str, Any]) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, Mapping) else None
    if not isinstance(function, Mapping):
        return dict(call)
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        with contextlib.suppress(ValueError):
            arguments = json.loads(arguments)
    return {**call, "function": {**function, "arguments": arguments}}
