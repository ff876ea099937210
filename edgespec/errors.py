"""Errors a user can act on.

Every failure that reaches a person (CLI, server, an app embedding edgespec) is an `EdgespecError`
whose message is one line saying what is wrong and, where possible, what to do. Anything else that
escapes is a bug.
"""

from __future__ import annotations


class EdgespecError(Exception):
    """Base class: a one-line, user-facing message."""


def one_line(text: str) -> str:
    """`text` on one line: a library's multi-line message quoted inside ours, joined with spaces."""
    return " ".join(part.strip() for part in text.splitlines() if part.strip())


class ModelLoadError(EdgespecError):
    """A model file is missing, not GGUF, truncated, corrupt or of an unsupported architecture."""


class ModelCacheError(EdgespecError):
    """A default model could not be assembled from its packaged parts, or its hash is wrong."""


class IncompatibleModelsError(EdgespecError):
    """The draft model cannot draft for the target (different tokenizer or vocabulary)."""


class PromptError(EdgespecError):
    """The prompt is empty, is not valid Unicode text, or does not fit the context."""


class PromptTooLongError(PromptError):
    """The prompt (a conversation so far, in a chat) does not fit the context."""


def encode_utf8(text: str, what: str = "the prompt") -> bytes:
    """`text` as UTF-8, or a PromptError naming the first character that has no UTF-8 form.

    Such characters are lone surrogates (U+D800 … U+DFFF). They reach edgespec as JSON escapes
    ("\\udcff"), from Python strings, and from bytes that are not UTF-8 read through a stream
    that decodes with surrogateescape (stdin here), where U+DC80 … U+DCFF stands for one raw byte.
    The rule is the same everywhere: refuse, never guess what the text meant.
    """
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(text[exc.start])
        if 0xDC80 <= code <= 0xDCFF:
            found = f"the byte 0x{code - 0xDC00:02X}, which is not UTF-8"
        else:
            found = f"a lone surrogate U+{code:04X}"
        raise PromptError(
            f"{what} is not valid Unicode: character {exc.start} is {found}; send UTF-8 text"
        ) from None


class SettingsError(EdgespecError):
    """A generation or runtime setting is out of range."""


class EngineBusy(EdgespecError):
    """The engine was still generating for someone else when the wait timed out."""


class RuntimeFailure(EdgespecError):
    """A backend call failed while generating (e.g. llama_decode returned an error)."""


class ExportError(EdgespecError):
    """A model cannot be exported or trimmed (unsupported architecture, missing file, bad option)."""


class ProfileError(SettingsError):
    """A placement profile is missing, unknown, not valid TOML or breaks the profile schema."""
