"""OpenAI's completion formats for `edgespec serve`: reading a request's fields into engine options
(every problem a 400 `APIError` naming the field) and rendering results, chunks and errors.

Where it differs from OpenAI's API, on purpose:
- `model` may be any string: clients often hard-code one ("gpt-4o"), and there is one model to
  answer with. Responses name the served model (`Engine.model`); a `model` that is not a string is
  a 400, and GET /v1/models/{id} of another model a 404. With `--models` the server offers several
  and `model` chooses among them (`pool.ModelPool`).
- Omitted sampling settings take edgespec's defaults: greedy decoding (temperature 0), not OpenAI's
  temperature 1.
- Omitted `max_tokens`, or one beyond what the context has room for after the prompt, means "until
  the context is full": the answer then ends with finish_reason "length", and `usage` says how many
  tokens came. llama.cpp's server does the same; OpenAI answers 400 instead. Clients often send a
  fixed max_tokens chosen for a large hosted model, and a laptop's context is small: refusing
  would break them for nothing. A prompt that does not fit the context at all is a 400.
- `n` must be 1.
- `logprobs` (chat: `logprobs: true` with `top_logprobs` 0-20; completions: `logprobs` 0-20, where
  OpenAI stops at 5) are the target model's own log-probabilities: the log-softmax of its logits
  before logit_bias, penalties, a grammar's mask and temperature (as vLLM reports by default). They
  are read from the rows the target verified, so speculation leaves them as target-only decoding
  gives them. A streamed token's entry comes with the chunk that carries its text (a token whose
  text is held back, for a stop string, an unfinished character or a tool call, comes later);
  the entries of all chunks add up to the non-streamed answer's. With tool calls, the entries cover
  the calls' tokens too. A completion's `text_offset` counts characters of the answer, where a token
  starting inside a character gets that character's offset.
- `tools` (chat only) are rendered through the model's chat template, and calls are generated under
  a grammar (see `edgespec.tools`), so `message.tool_calls[].function.arguments` always parses and
  matches the tool's schema when the answer ends with finish_reason "tool_calls". Streamed, the
  text of a call is held back and sent as `delta.tool_calls` once it is whole: one chunk per call
  with its id, name and complete arguments.
- `response_format` {"type": "json_object"} or {"type": "json_schema", ...} constrains the answer
  to JSON (valid against the schema) whether or not `strict` is set: the constraint is the same
  grammar either way. The answer is whole only with finish_reason "stop"; with "length" it was cut.
- edgespec's own settings are accepted too: top_k, min_p, repeat_penalty, penalty_last_n, draft_max,
  and cache_prompt (default true: reuse the cached prefix of the previous request; false evaluates
  the whole prompt, so greedy output is what a fresh `edgespec run` gives; see
  `GenerationSettings.cache_prompt`).
- Responses carry an extra field `edgespec`: the generation's statistics (`Stats.to_dict()`, with
  `n_prompt_cached`, the prompt tokens reused from the cache), `draft`, `draft_max`, `seed`, and
  `sources` under a goodput controller. A stream carries it on its last chunk.
"""

from __future__ import annotations

import codecs
import dataclasses
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from edgespec.api import check_messages
from edgespec.constrain import from_response_format
from edgespec.engine import TOP_LOGPROBS_LIMIT
from edgespec.errors import EdgespecError, PromptError, SettingsError
from edgespec.server.queue import APIError

if TYPE_CHECKING:
    from collections.abc import Sequence

    from edgespec.api import Result
    from edgespec.engine import TokenLogprob
    from edgespec.tools import ToolCall, ToolPlan

# Request fields, beyond each endpoint's own (messages / prompt, max tokens, stream, n).
_OPTIONS = ("temperature", "top_p", "seed", "frequency_penalty", "presence_penalty", "stop", "logit_bias")
# edgespec's own (cache_prompt as llama.cpp's server names it)
_EXTENSIONS = ("top_k", "min_p", "repeat_penalty", "penalty_last_n", "draft_max", "cache_prompt")
_IGNORED = ("model", "user", "metadata", "store", "service_tier", "prompt_cache_key", "safety_identifier")
_TOOLS = ("tools", "tool_choice", "parallel_tool_calls")
# Features edgespec does not have: accepted only when null or set to a do-nothing value.
_UNSUPPORTED = frozenset(
    {
        *("tools", "tool_choice", "parallel_tool_calls", "functions"),
        *("function_call", "modalities", "audio", "prediction", "reasoning_effort"),
        *("verbosity", "web_search_options", "echo", "best_of", "suffix"),
    }
)
_NO_OP: tuple[object, ...] = (None, False, "", "none", [], ["text"], {"type": "text"})
_COMMON = frozenset(
    {
        *("stream", "stream_options", "n", "max_tokens", "response_format", "logprobs", "top_logprobs"),
        *_OPTIONS,
        *_EXTENSIONS,
        *_IGNORED,
    }
)
_FIELDS = {
    True: _COMMON | {"messages", "max_completion_tokens"} | _UNSUPPORTED,
    False: _COMMON | {"prompt"} | _UNSUPPORTED,
}


def as_api_error(exc: BaseException) -> APIError:
    """The API error for an exception: 400 for a bad setting or prompt, 500 otherwise."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, (SettingsError, PromptError)):
        name = str(exc).split(" ", 1)[0]  # "temperature must be ...", "messages[0].role must be ..."
        known = re.split(r"[\[.]", name)[0] in _FIELDS[True] | _FIELDS[False]
        return APIError(400, str(exc), param=name if known else None)
    if isinstance(exc, EdgespecError):
        return APIError(500, str(exc), type="server_error")
    return APIError(500, f"unexpected {type(exc).__name__}: {exc}", type="server_error")


@dataclass(frozen=True)
class Params:
    stream: bool
    include_usage: bool
    options: dict[str, Any]
    #: tools, tool_choice and parallel_tool_calls as sent (chat), or None without tools
    tools: dict[str, Any] | None = None


def typed(body: dict[str, Any], key: str, kind: type, what: str, param: str = "") -> Any:
    """body[key], None when absent or null; a 400 APIError when it is not `what`."""
    value = body.get(key)
    if value is not None and (not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool)):
        raise APIError(400, f"{param or key} must be {what}, got {value!r}", param=param or key)
    return value


def params(body: dict[str, Any], chat: bool) -> Params:
    """Check a completion request's fields and gather the engine options (a 400 APIError if bad)."""
    for key, value in body.items():
        if key not in _FIELDS[chat]:
            raise APIError(400, f"unrecognized request argument supplied: {key}", param=key)
        if key in _TOOLS and chat:
            continue
        if key in _UNSUPPORTED and value not in _NO_OP and (key != "best_of" or value != 1):
            raise APIError(400, f"{key} is not supported by edgespec serve", param=key)
    if typed(body, "n", int, "an integer") not in (None, 1):
        raise APIError(400, "n must be 1: edgespec serve generates one choice per request", param="n")
    typed(body, "model", str, "a string")
    stream = bool(typed(body, "stream", bool, "true or false"))
    stream_options = typed(body, "stream_options", dict, "an object")
    if stream_options is not None and not stream:
        raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")
    include_usage = stream_options is not None and bool(
        typed(stream_options, "include_usage", bool, "true or false", "stream_options.include_usage")
    )
    options = {key: body[key] for key in (*_OPTIONS, *_EXTENSIONS) if body.get(key) is not None}
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = typed(body, name, int, "an integer of at least 1")
    if max_tokens is not None:
        if max_tokens < 1:
            raise APIError(400, f"{name} must be an integer of at least 1, got {max_tokens}", param=name)
        options["max_tokens"] = max_tokens
    if (typed(body, "seed", int, "an integer of 0 or more") or 0) < 0:
        raise APIError(400, f"seed must be an integer of 0 or more, got {body['seed']}", param="seed")
    if "logit_bias" in options:
        options["logit_bias"] = logit_bias(options["logit_bias"])
    n_top = logprobs(body, chat)
    if n_top is not None:
        options["logprobs"] = n_top
    if body.get("response_format") is not None:
        try:
            grammar = from_response_format(body["response_format"])
        except SettingsError as e:
            raise APIError(400, str(e), param="response_format") from None
        if grammar is not None:
            options["grammar"] = grammar
    tools = None
    if chat and body.get("tools") not in (None, []):
        tools = {key: body.get(key) for key in _TOOLS}
    elif chat and (body.get("tool_choice") not in (None, "none", "auto")):
        raise APIError(400, "tool_choice needs tools", param="tool_choice")
    return Params(stream, include_usage, options, tools)


def logprobs(body: dict[str, Any], chat: bool) -> int | None:
    """How many alternatives per token the request's logprobs ask for, or None when it asks for no
    logprobs (a 400 APIError if the fields are bad)."""
    limit = TOP_LOGPROBS_LIMIT
    if not chat:
        if body.get("top_logprobs") is not None:
            why = "top_logprobs is a chat completions field; completions take logprobs: N"
            raise APIError(400, why, param="top_logprobs")
        n = typed(body, "logprobs", int, f"an integer from 0 to {limit}")
        if n is not None and not 0 <= n <= limit:
            raise APIError(400, f"logprobs must be an integer from 0 to {limit}, got {n}", param="logprobs")
        return n
    wanted = typed(body, "logprobs", bool, "true or false")
    n = typed(body, "top_logprobs", int, f"an integer from 0 to {limit}")
    if n is not None and not 0 <= n <= limit:
        why = f"top_logprobs must be an integer from 0 to {limit}, got {n}"
        raise APIError(400, why, param="top_logprobs")
    if n is not None and not wanted:
        raise APIError(400, "top_logprobs needs logprobs set to true", param="top_logprobs")
    return (n or 0) if wanted else None


def logit_bias(value: Any) -> dict[int, float]:
    """OpenAI's logit_bias, {"token id": bias}, with integer keys."""
    if not isinstance(value, dict):
        raise APIError(400, f"logit_bias must map token ids to numbers, got {value!r}", param="logit_bias")
    bias: dict[int, float] = {}
    for key, amount in value.items():
        try:
            token = int(key)
        except ValueError:
            raise APIError(
                400, f"logit_bias keys must be token ids, got {key!r}", param="logit_bias"
            ) from None
        if isinstance(amount, bool) or not isinstance(amount, (int, float)):
            raise APIError(400, f"logit_bias[{key!r}] must be a number, got {amount!r}", param="logit_bias")
        bias[token] = amount
    return bias


def messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """The conversation; role "developer" is read as "system", text content parts are joined with
    newlines."""
    messages = body.get("messages")
    if messages is None:
        raise APIError(400, "missing required parameter: 'messages'", param="messages")
    if isinstance(messages, list):
        messages = [_message(i, m) if isinstance(m, dict) else m for i, m in enumerate(messages)]
    check_messages(messages)
    return messages


def _message(i: int, message: dict[str, Any]) -> dict[str, Any]:
    role, content = message.get("role"), message.get("content")
    extra = {
        key: message[key] for key in ("tool_calls", "tool_call_id", "name") if message.get(key) is not None
    }
    if isinstance(content, list):
        texts = [p.get("text") if isinstance(p, dict) and p.get("type") == "text" else None for p in content]
        strings = [t for t in texts if isinstance(t, str)]
        if len(strings) != len(texts):
            raise PromptError(
                f"messages[{i}].content parts must be {{'type': 'text', 'text': ...}} (text only)"
            )
        content = "\n".join(strings)
    return {"role": "system" if role == "developer" else role, "content": content, **extra}


def prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if prompt is None:
        raise APIError(400, "missing required parameter: 'prompt'", param="prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise APIError(400, "prompt must be a string, or a list of exactly one string", param="prompt")
    return prompt


@dataclass
class Reply:
    """Renders one request's answer as OpenAI's objects."""

    chat: bool
    model: str
    include_usage: bool
    draft: str
    draft_max: int
    tools: ToolPlan | None = None
    #: whether logprobs were asked for
    logprobs: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])
    # a completion's text_offset: characters of the answer before the next token's, and the
    # decoder that counts them across a token that ends inside a character
    _offset: int = field(default=0, init=False)
    _decoder: codecs.IncrementalDecoder = field(
        default_factory=lambda: codecs.getincrementaldecoder("utf-8")(errors="replace"), init=False
    )

    def logprobs_of(self, entries: Sequence[TokenLogprob] | None) -> dict[str, Any] | None:
        """OpenAI's logprobs object for the answer's next tokens (None when none were asked for).
        Completions count `text_offset` on from the tokens given before."""
        if not self.logprobs:
            return None
        entries = entries or ()
        if self.chat:
            return {"content": [_chat_entry(e, e.top) for e in entries], "refusal": None}
        offsets = []
        for entry in entries:
            offsets.append(self._offset)
            self._offset += len(self._decoder.decode(entry.bytes))
        return {
            "tokens": [e.text for e in entries],
            "token_logprobs": [e.logprob for e in entries],
            # OpenAI: the n most likely, and the chosen token whether or not among them
            "top_logprobs": [{**{a.text: a.logprob for a in e.top}, e.text: e.logprob} for e in entries],
            "text_offset": offsets,
        }

    def calls(self, result: Result) -> tuple[str | None, list[ToolCall]]:
        """(the answer's text, or what came before its calls; the calls), when tools were offered."""
        if self.tools is None or result.finish_reason != "stop":
            return result.text, []
        return self.tools.parse(result.text)

    def _head(self, obj: str) -> dict[str, Any]:
        prefix = "chatcmpl-" if self.chat else "cmpl-"
        return {"id": prefix + self.id, "object": obj, "created": self.created, "model": self.model}

    def usage(self, result: Result) -> dict[str, Any]:
        return {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": result.stats.n_prompt_cached},
        }

    def extra(self, result: Result) -> dict[str, Any]:
        """The `edgespec` field: how the generation went."""
        data: dict[str, Any] = {"draft": self.draft, "draft_max": self.draft_max, "seed": result.seed}
        data.update(result.stats.to_dict())
        if result.sources is not None:
            data["sources"] = {name: dataclasses.asdict(s) for name, s in result.sources.items()}
        return data

    def response(self, result: Result) -> dict[str, Any]:
        """The non-streamed answer."""
        finish: str = result.finish_reason
        if self.chat:
            head = self._head("chat.completion")
            content, calls = self.calls(result)
            message: dict[str, Any] = {"role": "assistant", "content": content}
            if calls:
                message["tool_calls"] = [call.to_openai() for call in calls]
                finish = "tool_calls"
            choice: dict[str, Any] = {"index": 0, "message": message}
        else:
            head = self._head("text_completion")
            choice = {"index": 0, "text": result.text}
        choice.update(logprobs=self.logprobs_of(result.logprobs), finish_reason=finish)
        return {**head, "choices": [choice], "usage": self.usage(result), "edgespec": self.extra(result)}

    def chunk(
        self,
        text: str | None = None,
        finish: str | None = None,
        role: bool = False,
        calls: list[dict[str, Any]] | None = None,
        logprobs: Sequence[TokenLogprob] | None = None,
    ) -> dict[str, Any]:
        """One streamed chunk: text, a finish reason, (chat) the first one with the role, or
        tool calls; with the logprobs of the tokens whose text it carries, when asked for."""
        if self.chat:
            head = self._head("chat.completion.chunk")
            delta: dict[str, Any] = (
                {"role": "assistant", "content": ""} if role else {} if text is None else {"content": text}
            )
            if calls:
                delta["tool_calls"] = calls
            choice: dict[str, Any] = {"index": 0, "delta": delta}
        else:
            head = self._head("text_completion")
            choice = {"index": 0, "text": text or ""}
        choice.update(logprobs=self.logprobs_of(logprobs) if logprobs else None, finish_reason=finish)
        return {**head, "choices": [choice], **({"usage": None} if self.include_usage else {})}

    def last_chunks(
        self, result: Result, shown: int = 0, pending: Sequence[TokenLogprob] = ()
    ) -> list[dict[str, Any]]:
        """The chunks that end a stream: text held back (of `result.text`, whose first `shown`
        characters were sent), the calls, the finish reason, then the usage if asked for; the last
        one carries `edgespec`. The first carries the logprobs of the tokens not yet sent
        (`pending`)."""
        chunks = []
        finish: str = result.finish_reason
        content, calls = self.calls(result)
        rest = (content or "")[shown:] if calls else result.text[shown:]
        if rest:
            chunks.append(self.chunk(rest, logprobs=pending))
        for i, call in enumerate(calls):
            first = pending if not chunks else None
            chunks.append(self.chunk(calls=[{"index": i, **call.to_openai()}], logprobs=first))
        if calls:
            finish = "tool_calls"
        chunks.append(self.chunk(finish=finish, logprobs=pending if not chunks else None))
        if self.include_usage:
            chunks.append({**self.chunk(), "choices": [], "usage": self.usage(result)})
        chunks[-1]["edgespec"] = self.extra(result)
        return chunks

    def safe_text(self, text: str) -> int:
        """How much of the answer so far can be streamed as content: all of it without tools;
        with tools, what comes before anything that may start a call."""
        return len(text) if self.tools is None else self.tools.visible(text)


def _chat_entry(entry: TokenLogprob, top: Sequence[TokenLogprob] | None) -> dict[str, Any]:
    """One token of a chat answer's logprobs.content (with its top_logprobs unless top is None)."""
    out: dict[str, Any] = {"token": entry.text, "logprob": entry.logprob, "bytes": list(entry.bytes)}
    if top is not None:
        out["top_logprobs"] = [_chat_entry(a, None) for a in top]
    return out


def sse(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"
