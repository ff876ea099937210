"""Backends that run one model: evaluate tokens, return logits, roll the KV cache back.

A runtime knows nothing about speculation. `base.Runtime` is the protocol; `llama_cpp.LlamaCppRuntime`
implements it over llama-cpp-python's low-level C API. Backends import their heavy libraries inside
their own module, so importing this package is cheap.
"""

from edgespec.runtimes.base import Runtime, RuntimeSettings, VocabInfo

__all__ = ["Runtime", "RuntimeSettings", "VocabInfo"]
