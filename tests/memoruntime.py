"""A runtime that remembers a real runtime's logits per context, for statistical tests.

A model's logits for a context never change, so thousands of sampled generations from one prompt
only ever need the logits of a few thousand distinct contexts. `MemoRuntime` implements the runtime
protocol (a KV cache of one sequence, `eval`, `truncate`) over a real runtime and computes each
context's logits there once; the engine and the drafters run unchanged on top of it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from edgespec.drafting import common_prefix
from edgespec.runtimes.base import LogitRows, Runtime, RuntimeBase


class MemoRuntime(RuntimeBase):
    def __init__(self, inner: Runtime) -> None:
        self.inner = inner
        self.path = inner.path
        self.settings = inner.settings
        self.guarantee = inner.guarantee
        self.vocab = inner.vocab
        self._tokens: list[int] = []  # this runtime's sequence
        self._inner_tokens: list[int] = []  # what the inner runtime has evaluated
        self._logits: dict[tuple[int, ...], np.ndarray] = {}

    @property
    def n_ctx(self) -> int:
        return self.inner.n_ctx

    @property
    def n_past(self) -> int:
        return len(self._tokens)

    @property
    def tokens(self) -> Sequence[int]:
        return tuple(self._tokens)

    def logits_after(self, context: Sequence[int]) -> np.ndarray:
        """The inner model's logits row for the token after `context` (computed once)."""
        key = tuple(context)
        row = self._logits.get(key)
        if row is None:
            keep = common_prefix(self._inner_tokens, key)
            if keep == len(key):
                keep -= 1
            self.inner.truncate(keep)
            row = self.inner.eval(key[keep:], logits="last")[0].copy()
            self._inner_tokens = list(key)
            self._logits[key] = row
        return row

    def eval(self, tokens: Sequence[int], logits: LogitRows = "last") -> np.ndarray:
        start = len(self._tokens)
        self._tokens.extend(tokens)
        if logits == "none" or not tokens:
            return np.zeros((0, self.vocab.n_vocab), dtype=np.float32)
        ends = range(start + 1, len(self._tokens) + 1) if logits == "all" else [len(self._tokens)]
        return np.stack([self.logits_after(self._tokens[:end]) for end in ends])

    def truncate(self, n: int) -> None:
        del self._tokens[n:]

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        return self.inner.tokenize(text, add_special=add_special, parse_special=parse_special)

    def token_bytes(self, token: int) -> bytes:
        return self.inner.token_bytes(token)

    def token_text(self, token: int) -> bytes:
        return self.inner.token_text(token)

    def metadata(self, key: str) -> str | None:
        return self.inner.metadata(key)

    def close(self) -> None:
        self.inner.close()

    def is_special(self, token: int) -> bool:
        return self.inner.is_special(token)
