"""Prompts as token ids: chat formatting with the model's own template (GGUF key
`tokenizer.chat_template`), or the raw text.

Templates are Hugging Face-style Jinja; they are rendered in a sandbox with the helpers such
templates expect (`raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII text).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from edgespec.errors import PromptError

if TYPE_CHECKING:
    from edgespec.runtimes.base import Runtime


def _raise(message: str) -> None:
    raise PromptError(f"the model's chat template refused the conversation: {message}")


def _tojson(value: Any, indent: int | None = None, **_: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=indent)


@lru_cache(maxsize=8)
def _compile(template: str) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)


def render_chat(
    template: str,
    messages: Sequence[Mapping[str, str]],
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> str:
    """Render a conversation with a chat template.

    Args:
        template: the Jinja template text.
        messages: [{"role": "system" | "user" | "assistant", "content": str}, ...].
        bos_token, eos_token: the model's special token texts, which templates may insert.
        add_generation_prompt: end with the header that starts the assistant's answer.
        tools: OpenAI-style tool definitions, for a template that renders them.

    Returns:
        The prompt text (to be tokenized with special tokens parsed).
    """
    from jinja2 import TemplateError

    try:
        return str(
            _compile(template).render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                bos_token=bos_token,
                eos_token=eos_token,
                tools=list(tools) if tools else None,
            )
        )
    except TemplateError as exc:
        raise PromptError(f"the model's chat template could not be rendered: {exc}") from exc


def prompt_tokens(target: Runtime, text: str, *, raw: bool = False, system: str | None = None) -> list[int]:
    """Tokenize a user prompt, formatted with the model's chat template unless `raw`.

    Special tokens in the text are parsed in both modes, so a hand-formatted prompt works with
    `raw`. BOS is added when the model asks for it and the template did not already write it.
    """
    if not text.strip():
        raise PromptError("the prompt is empty")
    template = target.chat_template()
    if raw or not template:
        if not raw and not template:
            raise PromptError(
                f"{target.path.name} has no chat template (tokenizer.chat_template); pass --raw to send the "
                "prompt as it is"
            )
        return target.tokenize(text, add_special=True, parse_special=True)
    messages: list[Mapping[str, str]] = []
    if system:
        messages.append({"role": "system", "content": system})
    messages.append({"role": "user", "content": text})
    return chat_tokens(target, template, messages)


def chat_tokens(
    target: Runtime,
    template: str,
    messages: Sequence[Mapping[str, Any]],
    tools: Sequence[Mapping[str, Any]] | None = None,
) -> list[int]:
    vocab = target.vocab
    bos = target.token_text(vocab.bos).decode("utf-8", "replace") if vocab.bos is not None else ""
    eos = target.token_text(vocab.eos).decode("utf-8", "replace") if vocab.eos is not None else ""
    rendered = render_chat(template, messages, bos_token=bos, eos_token=eos, tools=tools)
    add_bos = vocab.add_bos and not (bos and rendered.startswith(bos))
    tokens = target.tokenize(rendered, add_special=False, parse_special=True)
    if add_bos and vocab.bos is not None:
        tokens.insert(0, vocab.bos)
    return tokens
