"""Chat formatting with the model's own template (GGUF key `tokenizer.chat_template`).

Templates are Hugging Face-style Jinja; they are rendered in a sandbox with the helpers such
templates expect (`raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII text).
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from .errors import PromptError


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
) -> str:
    """Render a conversation with a chat template.

    Args:
        template: the Jinja template text.
        messages: [{"role": "system" | "user" | "assistant", "content": str}, ...].
        bos_token, eos_token: the model's special token texts, which templates may insert.
        add_generation_prompt: end with the header that starts the assistant's answer.

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
                tools=None,
            )
        )
    except TemplateError as exc:
        raise PromptError(f"the model's chat template could not be rendered: {exc}") from exc
