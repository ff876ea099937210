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
    """The prompt is empty or does not fit the context."""


class SettingsError(EdgespecError):
    """A generation or runtime setting is out of range."""


class RuntimeFailure(EdgespecError):
    """A backend call failed while generating (e.g. llama_decode returned an error)."""


class ExportError(EdgespecError):
    """A model cannot be exported or trimmed (unsupported architecture, missing file, bad option)."""


class ProfileError(SettingsError):
    """A placement profile is missing, unknown, not valid TOML or breaks the profile schema."""
