"""edgespec: speculative decoding for local LLMs on laptops and desktops.

A small draft model (or a free n-gram lookup) proposes tokens; the target model checks them all in
one forward pass; the output is exactly what the target alone would produce.

Importing this package is cheap: llama.cpp and numpy-heavy modules load when first used, e.g. when
`edgespec.Engine` (the Python API, `edgespec.api`) is first named.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Chunk", "Engine", "EngineBusy", "Grammar", "Result", "Stream", "TokenLogprob", "__version__"]

if TYPE_CHECKING:
    from edgespec.api import Chunk, Engine, EngineBusy, Grammar, Result, Stream, TokenLogprob

_API = frozenset({"Chunk", "Engine", "EngineBusy", "Grammar", "Result", "Stream", "TokenLogprob"})


def __getattr__(name: str) -> Any:
    if name in _API:
        from edgespec import api

        return getattr(api, name)
    raise AttributeError(f"module 'edgespec' has no attribute {name!r}")
