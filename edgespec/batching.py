"""Several generations on one model context at once: continuous batching (issue 20).

A `SeqView` is one sequence of a shared llama.cpp context (`RuntimeSettings.n_seq`) behind the
`Runtime` interface a `SpeculativeEngine` drives. Each generation therefore runs its own loop in
its own thread, unchanged: its drafter, its controller, its sampling settings and its own seeded
random stream. Only its evaluations meet: they go through the context's `Batcher`, which gathers
the calls of the sequences generating at the moment into one `llama_decode` (`eval_many`): each
sequence's newest token plus its drafts, a different number per sequence. Sequences join and
leave between passes; a sequence's cache is rolled back on its own (`truncate_seq`).

Answers do not depend on who else is served, under the exact guarantee:
- A call with more rows than `cap` (a prompt, or a long verification under exact kernels) runs in
  a pass of its own, exactly as `LlamaCppRuntime.eval` runs it for a lone sequence (the same
  pieces), so it computes the rows and writes the keys and values that serving it alone would.
- Smaller calls share passes of at most `cap` rows. Under exact kernels `cap` is the invariance
  probe's max_rows, so every row of a shared pass is computed as in a pass of its own
  (`tests/model/test_batching.py` compares whole generations with serving each alone;
  `benchmarks/batch_cost.py` measures the real target). Under llama.cpp's own kernels `cap` is
  the batch size, and rows depend on the batch's shape, as they already do between the steps of
  one sequence: the distribution guarantee holds, each request keeps its own random stream, but a
  near-tie may break otherwise beside other requests.

Prompt processing is chunked under the distribution guarantee: while other sequences are
generating, a joining sequence's prompt goes through in calls of `chunk` rows, each sharing a pass
with the others' steps, so their streams keep flowing (a token per pass) instead of waiting for the
whole prompt. Alone, a prompt runs whole. Under the exact guarantee it runs alone in a lone
sequence's pieces, as above: other pieces would round its keys and values otherwise.

Gathering: the caller that finds no pass running leads the next one. It waits up to `window`
seconds for the sequences of the previous pass to send their next calls (each does its sampling
and drafting in between), then runs what is waiting, first come first served. A sequence that
misses the window joins the pass after.

A model drafter drafts for all its sequences in one batch too: the draft context has a batcher of
its own (`link`ed to the target's), so the sequences of one verification pass draft their first
tokens in one draft pass, then their next ones, and so on. The sequences keep in step: a
verification pass waits (up to `PATIENCE` seconds) for a sequence of the previous one that is
still drafting, rather than leaving it to a pass of its own and the sequences drafting beside it
in turn; and a draft pass does not wait for a sequence that has drafted all it will and gone on to
its verification.
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from edgespec.control import ControlledDrafter
from edgespec.drafting import common_prefix
from edgespec.engine import SpeculativeEngine
from edgespec.errors import EngineBusy

if TYPE_CHECKING:
    from edgespec.drafting import Drafter
    from edgespec.runtimes.base import LogitRows
    from edgespec.runtimes.llama_cpp import LlamaCppRuntime

__all__ = ["BatchStats", "Batcher", "Pass", "SeqView", "Slots"]

CHUNK = 32
"""Rows of a joining prompt per shared pass, under the distribution guarantee. On a 2-core CPU a
pass of 32 rows takes about 15 one-row steps' time (`batch_cost.py`: 16 rows 9.4, 40 rows 18.4),
so the running streams slow to a token per such pass while a prompt joins, instead of waiting for
the whole of it."""

WINDOW = 0.02
"""Seconds a pass waits for the sequences of the previous one (their sampling and drafting, one
thread at a time under the GIL, take about a millisecond each)."""

PATIENCE = 1.0
"""Seconds a verification pass waits for a sequence of the previous one that is drafting with a
model: a few of its passes, each a fraction of a verification pass (a sequence that drafts fewer
tokens than the others waits for them instead of verifying alone, and drafting alone next)."""

_POLL = 0.002  # seconds between looks at the linked batcher while waiting

_order = itertools.count()  # orders the calls of every batcher (which came last, draft or target)


@dataclass(eq=False)
class _Call:
    seq: int
    tokens: list[int]
    logits: LogitRows
    alone: bool
    result: np.ndarray | None = None
    error: BaseException | None = None
    done: bool = False


@dataclass(frozen=True)
class Pass:
    """One native pass: when it started (`time.perf_counter`), how long it took, and the
    sequences and rows it held."""

    start: float
    seconds: float
    seqs: int
    rows: int


@dataclass
class BatchStats:
    """What the batcher did: passes run, calls and rows they held, the largest pass, the time spent
    in passes, and the latest 1,000 passes (to tell the passes' own cost from the time between
    them: `benchmarks/batch_steps.py`)."""

    passes: int = 0
    calls: int = 0
    rows: int = 0
    widest: int = 0  # most sequences in one pass
    shared: int = 0  # passes that held more than one sequence
    busy: float = 0.0  # seconds inside native passes
    history: deque[Pass] = field(default_factory=lambda: deque(maxlen=1000))

    def record(self, start: float, seconds: float, seqs: int, rows: int) -> None:
        self.passes += 1
        self.calls += seqs
        self.rows += rows
        self.widest = max(self.widest, seqs)
        self.shared += seqs > 1
        self.busy += seconds
        self.history.append(Pass(start, seconds, seqs, rows))


class Batcher:
    """Gathers the evaluations of a context's sequences into shared passes (see the module).

    Args:
        runtime: a llama.cpp runtime holding several sequences.
        cap: most rows in one shared pass (None: `runtime.batch_rows`).
        window: seconds the leader of a pass waits for the sequences of the previous pass.
        chunk: rows of a joining prompt per pass while others generate (None: `CHUNK` under the
            distribution guarantee; prompts are never chunked under the exact one).
    """

    def __init__(
        self,
        runtime: LlamaCppRuntime,
        cap: int | None = None,
        window: float = WINDOW,
        chunk: int | None = None,
    ) -> None:
        self.runtime = runtime
        self.cap = cap if cap is not None else runtime.batch_rows
        if self.cap < 1:
            raise ValueError(f"a pass holds at least 1 row, got {self.cap}")
        if runtime.guarantee == "exact":
            self.chunk: int | None = None
        else:
            self.chunk = min(chunk or CHUNK, self.cap)
        self.window = window
        self.stats = BatchStats()
        self._cond = threading.Condition()
        self._pending: deque[_Call] = deque()
        self._running = False  # a pass is being gathered or run (its leader is at work)
        self._native = threading.Lock()  # one native call on the context at a time
        self._last: set[int] = set()
        self._called: dict[int, int] = {}  # each sequence's latest call, in `_order`
        self._inside: set[int] = set()  # sequences whose call is waiting or in the running pass
        self._drafts: Batcher | None = None  # the draft model's batcher, on a target's
        self._verifies: Batcher | None = None  # the target's batcher, on a draft model's

    def link(self, draft: Batcher) -> None:
        """Make `draft` the batcher of this target's draft model, sequence i drafting for
        sequence i: the two keep their sequences in step (see the module)."""
        if draft is self or draft.runtime.n_seq != self.runtime.n_seq:
            raise ValueError(
                "a draft batcher holds as many sequences as its target's, on a context of its own"
            )
        self._drafts, draft._verifies = draft, self

    def eval(self, seq: int, tokens: Sequence[int], logits: LogitRows) -> np.ndarray:
        """Sequence `seq`'s `Runtime.eval`: returns once a pass has evaluated its tokens (the
        rows are the caller's own copy)."""
        # a call that asks for no rows writes a prompt's keys and values: alone, in the lone
        # pieces, under the exact guarantee; chunked (see `SeqView.eval`) under the other
        call = _Call(
            seq, list(tokens), logits, alone=len(tokens) > self.cap or (logits == "none" and not self.chunk)
        )
        with self._cond:
            self._called[seq] = next(_order)
            self._inside.add(seq)
            self._pending.append(call)
            self._cond.notify_all()
            while not call.done:
                if self._running:
                    self._cond.wait()
                    continue
                self._running = True
                try:
                    taken = self._gather()
                    self._cond.release()
                    try:
                        self._run(taken)
                    finally:
                        self._cond.acquire()
                finally:
                    self._running = False
                    self._cond.notify_all()
            self._inside.discard(seq)
        if call.error is not None:
            raise call.error
        assert call.result is not None
        return call.result

    def truncate(self, seq: int, n: int) -> None:
        """Sequence `seq`'s `Runtime.truncate`, between native calls (a pass being gathered waits
        for it: the sequence's next call comes right after)."""
        with self._native:
            self.runtime.truncate_seq(seq, n)

    def others(self, seq: int) -> int:
        """How many sequences other than `seq` were in the latest pass or wait for the next one:
        those generating beside it."""
        with self._cond:
            return len((self._last | {c.seq for c in self._pending}) - {seq})

    def leave(self, seq: int) -> None:
        """Sequence `seq` stops generating: the next pass does not wait for it."""
        with self._cond:
            self._last.discard(seq)
            self._cond.notify_all()

    def _gather(self) -> list[_Call]:
        """Under the lock: wait for the previous pass's sequences (up to `window`, or `PATIENCE`
        while those missing are drafting), then take the calls of the next pass, first come first
        served."""
        head = self._pending[0]
        if not head.alone:
            start = time.monotonic()
            while missing := self._missing():
                drafting = self._drafts is not None and all(map(self._drafts._after(self), missing))
                left = start + (PATIENCE if drafting else self.window) - time.monotonic()
                if left <= 0:
                    break
                # nothing here hears of a call to the linked batcher: look again every _POLL
                self._cond.wait(min(left, _POLL) if self._linked else left)
            head = self._pending[0]
        if head.alone:
            self._pending.popleft()
            return [head]
        taken, rows = [], 0
        for call in list(self._pending):
            if not call.alone and rows + len(call.tokens) <= self.cap:
                taken.append(call)
                rows += len(call.tokens)
                self._pending.remove(call)
        return taken

    @property
    def _linked(self) -> bool:
        return self._drafts is not None or self._verifies is not None

    def _missing(self) -> set[int]:
        """Under the lock: the sequences of the previous pass whose next call has not come. On a
        draft batcher also those of the latest verification pass that draft here, and less those
        waiting for their verification: every sequence verified together drafts together."""
        expected = set(self._last)
        verifies = self._verifies
        if verifies is not None:
            expected |= {s for s in verifies._last if s in self._called}
            expected -= verifies._inside
        return expected - {c.seq for c in self._pending if not c.alone}

    def _after(self, other: Batcher) -> Callable[[int], bool]:
        """Whether a sequence called this batcher after its latest call to `other`."""
        return lambda seq: self._called.get(seq, -1) > other._called.get(seq, -1)

    def _run(self, taken: list[_Call]) -> None:
        """Outside the lock: one pass, its results handed to its calls."""
        start = time.perf_counter()
        try:
            self._native.acquire()
            if taken[0].alone:
                call = taken[0]
                rows = self.runtime.eval(call.tokens, call.logits, seq=call.seq)
                results = [np.array(rows, copy=True)]
            else:
                parts = [(c.seq, c.tokens) for c in taken]
                results = self.runtime.eval_many(parts, [c.logits for c in taken])
            for call, rows in zip(taken, results, strict=True):
                call.result = rows
        except BaseException as exc:
            for call in taken:
                call.error = exc
        finally:
            self._native.release()
        self.stats.record(start, time.perf_counter() - start, len(taken), sum(len(c.tokens) for c in taken))
        with self._cond:
            self._last = {c.seq for c in taken}
            for call in taken:
                call.done = True


class SeqView:
    """Sequence `seq` of a batched context, as the `Runtime` a `SpeculativeEngine` drives."""

    def __init__(self, batcher: Batcher, seq: int) -> None:
        self.batcher = batcher
        self.seq = seq
        self._runtime = batcher.runtime

    def eval(self, tokens: Sequence[int], logits: LogitRows = "last") -> np.ndarray:
        if not tokens:
            raise ValueError("eval needs at least one token")
        batcher, chunk = self.batcher, self.batcher.chunk
        if chunk is None or len(tokens) <= chunk:
            return batcher.eval(self.seq, tokens, logits)
        # A long call (a prompt) while others generate: `chunk` rows per pass, each pass shared
        # with the others' steps; the rest in one call once it fits a chunk or nobody else runs.
        held = self.n_past
        done, rows = 0, []
        try:
            while len(tokens) - done > chunk and batcher.others(self.seq):
                piece = batcher.eval(
                    self.seq, tokens[done : done + chunk], "all" if logits == "all" else "none"
                )
                rows.append(piece)
                done += chunk
            last = batcher.eval(self.seq, tokens[done:], logits)
        except BaseException:
            batcher.truncate(self.seq, held)  # as a failed eval: none of the new tokens stay
            raise
        return np.concatenate([*rows, last]) if logits == "all" and rows else last

    def truncate(self, n: int) -> None:
        self.batcher.truncate(self.seq, n)

    @property
    def tokens(self) -> Sequence[int]:
        return self._runtime.seq_tokens(self.seq)

    @property
    def n_past(self) -> int:
        return len(self._runtime.seq_tokens(self.seq))

    @property
    def n_ctx(self) -> int:
        return self._runtime.n_ctx

    def __getattr__(self, name: str) -> Any:
        # Everything else (vocabulary, metadata, guarantee, ...) is the shared model's.
        if name in ("eval_many", "truncate_seq", "close"):
            raise AttributeError(f"a sequence view has no {name}")
        return getattr(self._runtime, name)


NEAR = 64
"""Tokens of cached prefix a slot choice gives up to keep the busy sequences' ids consecutive
(evaluating them again takes 1.5-2 s on a 2-core CPU; a gap slowed every step of the sequences
in the pass by 16-25%: `batch_steps.py --layout`)."""


def _runs(ids: set[int]) -> int:
    """How many runs of consecutive ids `ids` makes ({0, 1, 3}: 2)."""
    return sum(1 for i in ids if i - 1 not in ids)


class Slots:
    """The sequences of a batched target context (and of a batched draft context), each lent as a
    `SpeculativeEngine` to one generation at a time.

    Args:
        target: the target's batcher.
        make_drafter: the drafter of slot i, given its view of the draft context (None without
            one), e.g. `lambda view: NgramDrafter()`.
        draft: the draft model's batcher, or None.
    """

    def __init__(
        self,
        target: Batcher,
        make_drafter: Callable[[SeqView | None], Drafter | None],
        draft: Batcher | None = None,
    ) -> None:
        n = target.runtime.n_seq
        if draft is not None and draft.runtime.n_seq != n:
            raise ValueError("the draft context must hold as many sequences as the target's")
        self.target, self.draft = target, draft
        if draft is not None:
            target.link(draft)
        self.engines = [
            SpeculativeEngine(SeqView(target, i), make_drafter(None if draft is None else SeqView(draft, i)))
            for i in range(n)
        ]
        for i, engine in enumerate(self.engines):
            if isinstance(engine.drafter, ControlledDrafter):  # its controller prices the shared pass
                engine.drafter.sharing = functools.partial(target.others, i)
        self._free = set(range(n))
        self._queue: deque[object] = deque()
        self._cond = threading.Condition()

    def __len__(self) -> int:
        return len(self.engines)

    @property
    def busy(self) -> int:
        with self._cond:
            return len(self.engines) - len(self._free)

    @property
    def waiting(self) -> int:
        with self._cond:
            return len(self._queue)

    def acquire(self, prompt: Sequence[int], timeout: float | None = None, reuse: bool = True) -> int:
        """A free slot for a generation of `prompt`: the one whose cache shares the longest prefix
        with it (a chat's next turn finds its previous turn), unless `reuse` is False. Among slots
        within `NEAR` tokens of the longest prefix, the one that keeps the busy sequences' ids
        consecutive: llama.cpp evaluates sequences with a gap between their ids in separate
        ubatches (2 sequences 0 and 2 took 1.25 times as long as 0 and 1). Callers are served in
        the order they came; raises EngineBusy after `timeout` seconds."""
        ticket = object()
        with self._cond:
            self._queue.append(ticket)
            try:
                if not self._cond.wait_for(lambda: self._free and self._queue[0] is ticket, timeout):
                    raise EngineBusy(f"every slot is busy (waited {timeout:g} s)")
            finally:
                self._queue.remove(ticket)
                self._cond.notify_all()
            free = sorted(self._free)
            busy = set(range(len(self.engines))) - self._free
            held = {
                i: common_prefix(self.engines[i].target.tokens or (), prompt) if reuse else 0 for i in free
            }
            near = [i for i in free if held[i] >= max(held.values()) - NEAR]
            best = min(near, key=lambda i: (_runs(busy | {i}), -held[i], i))
            self._free.remove(best)
            return best

    def release(self, slot: int) -> None:
        self.target.leave(slot)
        if self.draft is not None:
            self.draft.leave(slot)
        with self._cond:
            self._free.add(slot)
            self._cond.notify_all()
