"""Drafters: cheap proposals for the target to verify.

A drafter is one small protocol: it is shown the prompt once (`begin`, timed as prompt processing,
like the target's own prefill); then, given the full context (prompt + accepted tokens), it
proposes up to k next tokens; afterwards it is told how many the target accepted. A model drafter
and an n-gram drafter are interchangeable.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    from edgespec.control import SourceStats
    from edgespec.runtimes.base import Runtime
    from edgespec.sampling import Dist, TokenSampler


@dataclass(frozen=True)
class Draft:
    """A proposal: the draft tokens and, when they were drawn from a distribution, q.

    Attributes:
        tokens: the proposed token ids (target ids), possibly none.
        q: the distribution each token was drawn from (one per token, for speculative sampling),
            or None for a point proposal (an n-gram copy, a greedy draft): q is then one-hot.
    """

    tokens: list[int] = field(default_factory=list)
    q: list[Dist] | None = None


NO_DRAFT = Draft()


@runtime_checkable
class Drafter(Protocol):
    """The whole drafter lifecycle the engine drives: begin → (propose → accepted)* per
    generation; forget and close from the owner. `DrafterBase` gives the defaults."""

    name: str

    def begin(self, prompt: Sequence[int]) -> None:
        """A new sequence starts with `prompt`: forget the old one and prepare for this one."""
        ...

    def propose(self, context: Sequence[int], k: int, sampler: TokenSampler | None = None) -> Draft:
        """Up to k token ids likely to follow `context` (may be fewer, or none), with their q.

        Args:
            sampler: how to choose tokens from a model's logits when not by plain argmax
                (temperature > 0, penalties, logit bias); None for plain greedy drafting.
        """
        ...

    def accepted(self, n_proposed: int, n_accepted: int) -> None:
        """Feedback after verification: n_accepted of the n_proposed tokens were kept."""
        ...

    @property
    def runtime(self) -> Runtime | None:
        """The draft model's runtime, or None for a drafter without a model."""
        ...

    def summary(self) -> Mapping[str, SourceStats] | None:
        """Per-source statistics of the last generation (a controlled drafter), else None."""
        ...

    def forget(self) -> None:
        """Empty any cache, so the next prompt is processed whole."""
        ...

    def close(self) -> None:
        """Stop background work (the model runtime, owned by the loader, stays open)."""
        ...


class DrafterBase:
    """Defaults for the optional parts of `Drafter`: no feedback, no model, nothing to forget or
    stop."""

    def accepted(self, n_proposed: int, n_accepted: int) -> None:
        pass

    @property
    def runtime(self) -> Runtime | None:
        return None

    def summary(self) -> Mapping[str, SourceStats] | None:
        return None

    def forget(self) -> None:
        pass

    def close(self) -> None:
        pass


#: how far back NgramDrafter measures a match
MATCH_LENGTH_MAX = 64
#: earlier occurrences of an n-gram NgramDrafter remembers (the latest ones)
OCCURRENCES = 8


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def reuse_prefix(
    runtime: Runtime, held: Sequence[int], tokens: Sequence[int], *, redo_last: bool = False
) -> int:
    """Cut `runtime`'s cache back to the longest common prefix of the ids it holds (`held`) and
    `tokens`, and return its length: evaluating `tokens[keep:]` then brings the cache up to date.
    With `redo_last`, at least the last token is left to evaluate, for its logits."""
    keep = common_prefix(held, tokens)
    if redo_last:
        keep = max(0, min(keep, len(tokens) - 1))
    runtime.truncate(keep)
    return keep


class _DraftState:
    """What a model drafter's runtime holds, shared by every variant of one ModelDrafter."""

    def __init__(self) -> None:
        self.cached: list[int] = []  # target ids whose keys/values are in the draft cache
        self.pool: ThreadPoolExecutor | None = None
        # a continuation being drafted in the background: (what it follows, its future)
        self.ahead: tuple[list[int], Future[tuple[list[int], bool]]] | None = None


class ModelDrafter(DrafterBase):
    """Drafts from a small model with its own runtime and KV cache: its argmax, or with a sampler
    samples from its distribution q.

    The drafter's cache is kept in step with the context by prefix matching: before drafting it
    rolls back to the longest common prefix of what it has evaluated and the context, then
    evaluates only what is new (usually the target's correction or bonus token). Accepted draft
    tokens are already in its cache, so they are never evaluated twice.

    A VocabTrim drafter (a runtime with a `vocab_map`) is handled here: context ids are mapped to
    its input ids, and its smaller logits rows back to target ids, so the engine only ever sees
    target ids.

    Overlapped drafting (PEARL's post-verify, Liu et al. 2024): with `overlap`, once a draft is
    proposed the drafter goes on drafting its continuation in a background thread, assuming every
    draft token will be accepted, while the target verifies. If the target does accept them all
    and its own next token is the continuation's first, the rest of the continuation is already
    drafted and the next step starts with it; otherwise it is dropped (the prefix match rolls the
    cache back). The backends release the GIL while they compute, so the two models run at once
    when they sit on different devices (two llama.cpp contexts on the CPU decode on one thread:
    `edgespec.runtimes.native`). Only greedy drafts (no sampler) run ahead: a
    sampled continuation would share the generation's random generator with verification.

    Args:
        runtime: the draft model's runtime.
        max_id: draft tokens must be < max_id (the target's vocabulary size); a draft that reaches
            a token the target does not have stops there.
        min_prob: stop drafting when the drafter's own probability for its next token (softmax of
            its raw logits) is below this; 0 drafts all k tokens.
        overlap: draft the next block in the background while the target verifies this one.
    """

    name = "draft"

    def __init__(
        self, runtime: Runtime, max_id: int | None = None, *, min_prob: float = 0.0, overlap: bool = False
    ) -> None:
        if not 0.0 <= min_prob < 1.0:
            raise ValueError(f"min_prob must be in [0, 1), got {min_prob}")
        self._runtime = runtime
        self.min_prob = min_prob
        self.overlap = overlap
        vmap = runtime.vocab_map
        # A VocabTrim drafter: its logits row j is target id keep[j]; its input ids are
        # input_map[target id], unless it still reads target ids (an ONNX export trims outputs only).
        self._keep: np.ndarray | None = None if vmap is None else vmap.keep
        reads_target_ids = vmap is None or runtime.inputs_in_target_ids
        self._input_map: list[int] | None = (
            None if vmap is None or reads_target_ids else vmap.input_map.tolist()
        )
        n_target = runtime.vocab.n_vocab if vmap is None else vmap.target_n_vocab
        self.max_id = n_target if max_id is None else max_id
        self._state = _DraftState()
        #: draft tokens that came from a background continuation instead of being drafted in turn
        self.n_ahead_used = 0

    @property
    def runtime(self) -> Runtime:
        return self._runtime

    def variant(self, *, min_prob: float | None = None, overlap: bool | None = None) -> ModelDrafter:
        """The same model and cache with other options (one runtime must have one cache view)."""
        other = copy.copy(self)
        other.min_prob = self.min_prob if min_prob is None else min_prob
        other.overlap = self.overlap if overlap is None else overlap
        other.n_ahead_used = 0
        return other

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

    def _unsure(self, row: np.ndarray, token: int) -> bool:
        """True when the drafter's own probability for `token` is below min_prob."""
        j = token if self._keep is None else int(np.searchsorted(self._keep, token))
        return float(np.exp(row - row[j], dtype=np.float64).sum()) * self.min_prob > 1.0

    def _draft(self, context: Sequence[int], k: int, sampler: TokenSampler | None) -> tuple[list[int], bool]:
        """Up to k draft tokens after `context`, and whether drafting stopped for low confidence."""
        rt, cached = self.runtime, self._state.cached
        keep = reuse_prefix(rt, cached, context, redo_last=True)
        del cached[keep:]
        logits = rt.eval(self._inputs(context[keep:]), logits="last")
        cached.extend(context[keep:])
        draft: list[int] = []
        tail = list(context[-sampler.window :]) if sampler is not None and sampler.window else []
        while True:
            token = self._choose(logits[0], sampler, tail + draft if tail else ())
            if token < 0:
                return draft, False
            if self.min_prob and self._unsure(logits[0], token):
                return draft, True
            draft.append(token)
            if len(draft) == k:
                return draft, False
            logits = rt.eval(self._inputs([token]), logits="last")
            cached.append(token)

    def _settle(self) -> tuple[list[int], list[int], bool] | None:
        """Wait for a background continuation: (what it follows, its tokens, stopped), or None."""
        state = self._state
        if state.ahead is None:
            return None
        base, future = state.ahead
        state.ahead = None
        tokens, stopped = future.result()
        return base, tokens, stopped

    def propose(self, context: Sequence[int], k: int, sampler: TokenSampler | None = None) -> Draft:
        if sampler is not None:
            sampler.reset()
        tokens = self._propose(context, k, sampler)
        # A sampler records the distribution of every token it drew (none when greedy): q.
        q = sampler.dists[: len(tokens)] if sampler is not None and sampler.dists else None
        return Draft(tokens, q)

    def _propose(self, context: Sequence[int], k: int, sampler: TokenSampler | None) -> list[int]:
        ahead = self._settle()
        k = min(k, self.runtime.n_ctx - len(context))
        if k <= 0:
            return []
        head: list[int] = []
        stopped = False
        if ahead is not None and sampler is None:
            base, tokens, ahead_stopped = ahead
            # The previous draft was accepted whole and the target's next token is the
            # continuation's first: the rest of the continuation is this step's draft.
            if tokens and len(context) == len(base) + 1 and context[-1] == tokens[0] and context[:-1] == base:
                head = tokens[1 : k + 1]
                stopped = ahead_stopped and len(tokens) - 1 <= k
                self.n_ahead_used += len(head)
        draft = head
        if len(head) < k and not stopped:
            more, stopped = self._draft([*context, *head], k - len(head), sampler)
            draft = head + more
        room = self.runtime.n_ctx - len(context) - len(draft)
        if self.overlap and sampler is None and draft and not stopped and room > 0:
            state = self._state
            if state.pool is None:
                state.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="edgespec-draft")
            base = [*context, *draft]
            state.ahead = (base, state.pool.submit(self._draft, base, min(k, room), None))
        return draft

    # accepted(): nothing to do, rejected tokens are dropped lazily by the next prefix match.

    def begin(self, prompt: Sequence[int]) -> None:
        # Process the prompt now, so that the first propose evaluates only the first new token.
        self._settle()
        cached = self._state.cached
        keep = reuse_prefix(self.runtime, cached, prompt)
        del cached[keep:]
        if keep < len(prompt):
            self.runtime.eval(self._inputs(prompt[keep:]), logits="none")
            cached.extend(prompt[keep:])

    def forget(self) -> None:
        """Empty the draft model's cache: the next prompt is evaluated whole."""
        self._settle()
        self.runtime.truncate(0)
        self._state.cached.clear()

    def close(self) -> None:
        """Finish background drafting and stop its thread (the runtime stays open)."""
        self._settle()
        if self._state.pool is not None:
            self._state.pool.shutdown()
            self._state.pool = None


@dataclass
class NgramDrafter(DrafterBase):
    """Prompt lookup: find an earlier occurrence of the context's last n tokens and propose what
    followed it. Free to run; pays off when the answer repeats the prompt (code edits, extraction,
    summaries that quote).

    An index maps every n-gram (n_min ≤ n ≤ n_max) to the positions just after its latest
    OCCURRENCES occurrences that have a continuation. It is updated incrementally as the context
    grows. Of the occurrences of the longest n-gram that matches, the one whose match reaches
    furthest back (the latest among equals) is copied from: while an answer restates a stretch of
    the prompt, that is the stretch being copied, so the copy position follows the answer from
    step to step even where a short n-gram recurs elsewhere (a `self.` or a `    return`).

    Args:
        n_min, n_max: n-gram lengths tried, longest first.

    After each proposal `match_length` says how far back the matched text agrees with the
    context's end (at least the n-gram's n, at most MATCH_LENGTH_MAX).
    """

    n_min: int = 2
    n_max: int = 4
    name: str = "ngram"

    def __post_init__(self) -> None:
        if not 1 <= self.n_min <= self.n_max:
            raise ValueError(f"need 1 <= n_min <= n_max, got {self.n_min}, {self.n_max}")
        #: after `propose`: how many context tokens the match behind the proposal covers (up to
        #: MATCH_LENGTH_MAX; 0 when nothing was proposed)
        self.match_length = 0
        self._tokens: list[int] = []
        self._index: dict[tuple[int, ...], list[int]] = {}

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
                seen = self._index.setdefault(tuple(tokens[end - n : end]), [])
                seen.append(end)
                if len(seen) > OCCURRENCES:
                    del seen[0]

    def propose(self, context: Sequence[int], k: int, sampler: TokenSampler | None = None) -> Draft:
        """A copy of what followed the best earlier match (a point proposal: q is None)."""
        self.match_length = 0
        if k <= 0 or len(context) < self.n_min + 1:
            return NO_DRAFT
        self._extend_index(context)
        tokens = self._tokens
        for n in range(min(self.n_max, len(tokens) - 1), self.n_min - 1, -1):
            starts = self._index.get(tuple(tokens[-n:]))
            if starts:
                # How far each match really reaches back (past n_max): a long match means the
                # text is being copied, and its continuation is likely right (the controller
                # uses this). Later occurrences win ties.
                length, start = max((self._reach(s, n), s) for s in starts)
                self.match_length = length
                return Draft(tokens[start : start + k])
        return NO_DRAFT

    def _reach(self, start: int, n: int) -> int:
        """How many tokens before `start` agree with the context's end (n known to, at most
        MATCH_LENGTH_MAX)."""
        tokens = self._tokens
        length, end = n, len(tokens)
        while (
            length < MATCH_LENGTH_MAX
            and start - length > 0
            and tokens[start - length - 1] == tokens[end - length - 1]
        ):
            length += 1
        return length

    def begin(self, prompt: Sequence[int]) -> None:
        self._tokens = []
        self._index = {}
        self._extend_index(prompt)
