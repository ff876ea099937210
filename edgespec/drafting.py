"""Drafters: cheap proposals for the target to verify.

A drafter is one small protocol: it is shown the prompt once (`begin`, timed as prompt processing,
like the target's own prefill); then, given the full context (prompt + accepted tokens), it
proposes up to k next tokens; afterwards it is told how many the target accepted. A model drafter
and an n-gram drafter are interchangeable.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from .runtimes.base import Runtime
    from .sampling import TokenSampler


@runtime_checkable
class Drafter(Protocol):
    name: str
    #: True if draft tokens are drawn through the sampler passed to `propose`, so that the
    #: sampler's distributions are q for verification; False for point proposals (one-hot q).
    samples_from_q: bool

    def propose(self, context: Sequence[int], k: int, sampler: TokenSampler | None = None) -> list[int]:
        """Up to k token ids likely to follow `context` (may be fewer, or none).

        Args:
            sampler: how to choose tokens from a model's logits when not by plain argmax
                (temperature > 0, penalties, logit bias); None for plain greedy drafting.
        """
        ...

    def accepted(self, n_proposed: int, n_accepted: int) -> None:
        """Feedback after verification: n_accepted of the n_proposed tokens were kept."""
        ...

    def begin(self, prompt: Sequence[int]) -> None:
        """A new sequence starts with `prompt`: forget the old one and prepare for this one."""
        ...


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class ModelDrafter:
    """Drafts from a small model with its own runtime and KV cache: its argmax, or with a sampler
    samples from its distribution q.

    The drafter's cache is kept in step with the context by prefix matching: before drafting it
    rolls back to the longest common prefix of what it has evaluated and the context, then
    evaluates only what is new (usually the target's correction or bonus token). Accepted draft
    tokens are already in its cache, so they are never evaluated twice.

    A VocabTrim drafter (a runtime with a `vocab_map`) is handled here: context ids are mapped to
    its input ids, and its smaller logits rows back to target ids, so the engine only ever sees
    target ids.

    Args:
        runtime: the draft model's runtime.
        max_id: draft tokens must be < max_id (the target's vocabulary size); a draft that reaches
            a token the target does not have stops there.
    """

    name = "draft"
    samples_from_q = True

    def __init__(self, runtime: Runtime, max_id: int | None = None) -> None:
        self.runtime = runtime
        vmap = getattr(runtime, "vocab_map", None)
        # A VocabTrim drafter: its logits row j is target id keep[j]; its input ids are
        # input_map[target id], unless it still reads target ids (an ONNX export trims outputs only).
        self._keep: np.ndarray | None = None if vmap is None else vmap.keep
        reads_target_ids = vmap is None or getattr(runtime, "inputs_in_target_ids", False)
        self._input_map: list[int] | None = None if reads_target_ids else vmap.input_map.tolist()
        n_target = runtime.vocab.n_vocab if vmap is None else vmap.target_n_vocab
        self.max_id = n_target if max_id is None else max_id
        self._cached: list[int] = []  # target ids whose keys/values are in the draft cache

    def _inputs(self, tokens: Sequence[int]) -> list[int]:
        input_map = self._input_map
        return list(tokens) if input_map is None else [input_map[t] for t in tokens]

    def _choose(self, row: np.ndarray, sampler: TokenSampler | None, recent: Sequence[int]) -> int:
        """The next draft token (a target id) from one logits row, or -1 when it is out of range."""
        keep = self._keep
        if sampler is None:
            j = int(row.argmax())
            token = j if keep is None else int(keep[j])
            return token if token < self.max_id else -1
        if keep is None:
            # Only ids the target has can be drawn, so q is a distribution over them.
            return sampler.pick(row[: self.max_id], recent)
        # Spread the trimmed row over the target's ids: dropped ids get probability 0 in q.
        full = np.full(self.max_id, -np.inf, dtype=np.float32)
        inside = keep < self.max_id
        full[keep[inside]] = row[inside]
        return sampler.pick(full, recent)

    def propose(self, context: Sequence[int], k: int, sampler: TokenSampler | None = None) -> list[int]:
        if k <= 0:
            return []
        rt = self.runtime
        room = rt.n_ctx - len(context)
        k = min(k, room)
        if k <= 0:
            return []
        keep = common_prefix(self._cached, context)
        if keep == len(context):
            keep -= 1  # logits are needed for the last context token, so evaluate it again
        rt.truncate(keep)
        del self._cached[keep:]
        logits = rt.eval(self._inputs(context[keep:]), logits="last")
        self._cached.extend(context[keep:])
        draft: list[int] = []
        tail = list(context[-sampler.window :]) if sampler is not None and sampler.window else []
        while True:
            token = self._choose(logits[0], sampler, tail + draft if tail else ())
            if token < 0:
                break
            draft.append(token)
            if len(draft) == k:
                break
            logits = rt.eval(self._inputs([token]), logits="last")
            self._cached.append(token)
        return draft

    def accepted(self, n_proposed: int, n_accepted: int) -> None:
        # Rejected tokens are dropped lazily, by the prefix match at the next propose.
        pass

    def begin(self, prompt: Sequence[int]) -> None:
        # Process the prompt now, so that the first propose evaluates only the first new token.
        keep = common_prefix(self._cached, prompt)
        self.runtime.truncate(keep)
        del self._cached[keep:]
        if keep < len(prompt):
            self.runtime.eval(self._inputs(prompt[keep:]), logits="none")
            self._cached.extend(prompt[keep:])


@dataclass
class NgramDrafter:
    """Prompt lookup: find the latest earlier occurrence of the context's last n tokens and
    propose what followed it. Free to run; pays off when the answer repeats the prompt (code
    edits, extraction, summaries that quote).

    An index maps every n-gram (n_min ≤ n ≤ n_max) to the position just after its latest
    occurrence that has a continuation. It is updated incrementally as the context grows.

    Args:
        n_min, n_max: n-gram lengths tried, longest first.
    """

    n_min: int = 2
    n_max: int = 4
    name: str = "ngram"
    samples_from_q: ClassVar[bool] = False

    def __post_init__(self) -> None:
        if not 1 <= self.n_min <= self.n_max:
            raise ValueError(f"need 1 <= n_min <= n_max, got {self.n_min}, {self.n_max}")
        self._tokens: list[int] = []
        self._index: dict[tuple[int, ...], int] = {}

    def _extend_index(self, context: Sequence[int]) -> None:
        if common_prefix(self._tokens, context) < len(self._tokens):
            self._tokens = []
            self._index = {}
        old = len(self._tokens)
        self._tokens.extend(context[old:])
        tokens = self._tokens
        # An n-gram ending at position e (exclusive) is indexed once token e exists to follow it.
        for end in range(max(old, 1), len(tokens)):
            for n in range(self.n_min, self.n_max + 1):
                if end - n < 0:
                    break
                self._index[tuple(tokens[end - n : end])] = end

    def propose(self, context: Sequence[int], k: int, sampler: TokenSampler | None = None) -> list[int]:
        if k <= 0 or len(context) < self.n_min + 1:
            return []
        self._extend_index(context)
        tokens = self._tokens
        for n in range(min(self.n_max, len(tokens) - 1), self.n_min - 1, -1):
            start = self._index.get(tuple(tokens[-n:]))
            if start is not None:
                return tokens[start : start + k]
        return []

    def accepted(self, n_proposed: int, n_accepted: int) -> None:
        pass

    def begin(self, prompt: Sequence[int]) -> None:
        self._tokens = []
        self._index = {}
        self._extend_index(prompt)
