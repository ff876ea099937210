"""A runtime and drafters without a model: logits come from a scripted table.

`FakeRuntime` implements the runtime protocol (`edgespec.runtimes.base.Runtime`) over a function
from the context (the tuple of ids so far) to the logits row of the next token. It keeps one
sequence of ids as its KV cache and checks every call the way the llama.cpp runtime does, so the
engine's bookkeeping (what it evaluates, where it rolls back) is tested without loading a model;
it counts its passes and rows, so tests can check what a generation cost.

The table is either a callable or a mapping. A value may be a full float32 row (n_vocab wide) or
a single token id, which stands for "the next token is this one": a row of zeros with `margin` at
that id. `overrides` (a dict from contexts to the same kinds of values) wins over the table.

The vocabulary: id i is the byte string `pieces[i]`. By default ids 0 and 1 are the control tokens
<s> (BOS) and </s> (EOS, the one end-of-generation token), ids 2 … are single characters of
`ALPHABET` and, when n_vocab asks for more, two-character pieces.
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgespec.drafting import Draft, DrafterBase
from edgespec.errors import PromptError
from edgespec.runtimes.base import LogitRows, RuntimeBase, RuntimeSettings, VocabInfo
from edgespec.sampling import TokenSampler

BOS = 0
EOS = 1
#: ids 2 … are these characters, in order (id 2 is "a")
ALPHABET = "abcdefghijklmnopqrstuvwxyz .,!?-0123456789"
#: what a token id in a table means: the next token is this one by this margin over every other
MARGIN = 8.0

Row = np.ndarray | Sequence[float] | int
Table = Callable[[tuple[int, ...]], Row] | Mapping[tuple[int, ...], Row]


def default_pieces(n_vocab: int) -> list[bytes]:
    """<s>, </s>, the characters of ALPHABET, then two-character pieces, n_vocab in all."""
    singles = [c.encode() for c in ALPHABET]
    pairs = (a + b for a, b in itertools.product(singles, repeat=2))
    return [b"<s>", b"</s>", *itertools.islice(itertools.chain(singles, pairs), n_vocab - 2)]


def char_id(char: str) -> int:
    """The default vocabulary's id for one character of ALPHABET."""
    return 2 + ALPHABET.index(char)


def one_hot_row(token: int, n_vocab: int, margin: float = MARGIN) -> np.ndarray:
    """Zeros with `margin` at `token`: greedy decoding takes it."""
    row = np.zeros(n_vocab, dtype=np.float32)
    row[token] = margin
    return row


def random_logits(n_vocab: int, seed: int = 0, scale: float = 1.5) -> Callable[[Sequence[int]], np.ndarray]:
    """A table of pseudo-random rows: each context gets its own standard normal row times `scale`,
    the same in every process (seeded by `seed` and the context's ids). Rows are read-only."""

    @functools.cache
    def cached(context: tuple[int, ...]) -> np.ndarray:
        rng = np.random.default_rng([seed, len(context), *context])
        row = (rng.standard_normal(n_vocab) * scale).astype(np.float32)
        row.flags.writeable = False
        return row

    return lambda context: cached(tuple(int(t) for t in context))


@dataclass(frozen=True)
class EvalCall:
    """One call to `FakeRuntime.eval`: where it started, what it evaluated, which rows it asked."""

    start: int
    tokens: tuple[int, ...]
    logits: LogitRows

    @property
    def rows(self) -> int:
        return {"last": 1, "all": len(self.tokens), "none": 0}[self.logits]


class FakeRuntime(RuntimeBase):
    """A runtime whose logits come from a scripted table (see the module docstring).

    Args:
        table: context → next-token row (or next-token id); a callable or a mapping. None: every
            context is followed by EOS.
        n_vocab: vocabulary size, the width of a row.
        n_ctx: context size; evaluating past it raises PromptError, as the llama.cpp runtime does.
        overrides: context → row or id, consulted before the table.
        margin: the logit a table's token id gets (every other id gets 0).
        eog: end-of-generation ids.
        pieces: the bytes of each id (default: `default_pieces`); ids 0 and 1 count as control
            tokens (no bytes in generated text) while they are the BOS and EOS.
        add_bos: whether `tokenize(..., add_special=True)` prepends BOS.
        guarantee: what the runtime promises ("exact" or "distribution").
        track_tokens: report the cache's ids through `tokens` (False: None, like a backend that
            does not track them, so every prompt is evaluated whole).
    """

    def __init__(
        self,
        table: Table | None = None,
        *,
        n_vocab: int = len(ALPHABET) + 2,
        n_ctx: int = 256,
        overrides: Mapping[tuple[int, ...], Row] | None = None,
        margin: float = MARGIN,
        eog: Iterable[int] = (EOS,),
        pieces: Sequence[bytes] | None = None,
        add_bos: bool = True,
        guarantee: str = "exact",
        track_tokens: bool = True,
    ) -> None:
        self.table: Table = table if table is not None else (lambda context: EOS)
        self.overrides = dict(overrides or {})
        self.margin = margin
        self.pieces = list(pieces) if pieces is not None else default_pieces(n_vocab)
        if len(self.pieces) != n_vocab:
            raise ValueError(f"need {n_vocab} pieces, got {len(self.pieces)}")
        self.path = Path("fake.gguf")
        kernels = "exact" if guarantee == "exact" else "fast"
        self.settings = RuntimeSettings(n_ctx=n_ctx, n_threads=1, kernels=kernels)
        self.vocab = VocabInfo(
            kind="fake", n_vocab=n_vocab, bos=BOS, eos=EOS, eot=None, add_bos=add_bos, eog=frozenset(eog)
        )
        self._guarantee = guarantee
        self._track_tokens = track_tokens
        self._tokens: list[int] = []
        #: every call to eval, in order
        self.calls: list[EvalCall] = []
        self.closed = False

    # -- the protocol ---------------------------------------------------------------------------

    @property
    def guarantee(self) -> str:
        return self._guarantee

    @property
    def n_ctx(self) -> int:
        return self.settings.n_ctx

    @property
    def n_past(self) -> int:
        return len(self._tokens)

    @property
    def tokens(self) -> Sequence[int] | None:
        return tuple(self._tokens) if self._track_tokens else None

    def eval(self, tokens: Sequence[int], logits: LogitRows = "last") -> np.ndarray:
        n = len(tokens)
        if n == 0:
            raise ValueError("eval needs at least one token")
        if logits not in ("last", "all", "none"):
            raise ValueError(f"logits must be 'last', 'all' or 'none', got {logits!r}")
        if self.n_past + n > self.n_ctx:
            raise PromptError(f"{self.n_past + n} tokens do not fit the context of {self.n_ctx} tokens")
        for token in tokens:
            if not 0 <= token < self.vocab.n_vocab:
                raise ValueError(f"token id {token} is outside the vocabulary of {self.vocab.n_vocab} tokens")
        start = self.n_past
        self.calls.append(EvalCall(start, tuple(int(t) for t in tokens), logits))
        self._tokens.extend(int(t) for t in tokens)
        if logits == "none":
            return np.empty((0, self.vocab.n_vocab), dtype=np.float32)
        ends = range(start + 1, self.n_past + 1) if logits == "all" else [self.n_past]
        out = np.stack([self.row(self._tokens[:end]) for end in ends])
        out.flags.writeable = False  # a caller must never change a backend's logits in place
        return out

    def truncate(self, n: int) -> None:
        if n < 0:
            raise ValueError("cannot truncate to a negative length")
        del self._tokens[n:]

    def tokenize(self, text: str, *, add_special: bool, parse_special: bool) -> list[int]:
        """Longest match over the pieces' bytes; control pieces only with parse_special."""
        data = text.encode()
        lookup = {piece: i for i, piece in enumerate(self.pieces) if piece}
        control = self._control_ids()
        longest = max(len(piece) for piece in lookup)
        ids = [BOS] if add_special and self.vocab.add_bos else []
        pos = 0
        while pos < len(data):
            for size in range(min(longest, len(data) - pos), 0, -1):
                token = lookup.get(data[pos : pos + size])
                if token is not None and (parse_special or token not in control):
                    ids.append(token)
                    pos += size
                    break
            else:
                raise ValueError(f"no token for {data[pos:]!r}")
        return ids

    def token_bytes(self, token: int) -> bytes:
        return b"" if token in self._control_ids() else self.pieces[token]

    def token_text(self, token: int) -> bytes:
        return self.pieces[token]

    def metadata(self, key: str) -> str | None:
        return None

    def close(self) -> None:
        self.closed = True

    # -- for tests --------------------------------------------------------------------------------

    def _control_ids(self) -> frozenset[int]:
        return frozenset(t for t in (self.vocab.bos, self.vocab.eos) if t is not None)

    def row(self, context: Sequence[int]) -> np.ndarray:
        """The logits row after `context` (float32, n_vocab wide); touches neither the cache nor
        the counters."""
        key = tuple(int(t) for t in context)
        if key in self.overrides:
            value = self.overrides[key]
        elif isinstance(self.table, Mapping):
            if key not in self.table:
                raise KeyError(f"the table has no row after {key}")
            value = self.table[key]
        else:
            value = self.table(key)
        if isinstance(value, (int, np.integer)):
            return one_hot_row(int(value), self.vocab.n_vocab, self.margin)
        row = np.asarray(value, dtype=np.float32)
        if row.shape != (self.vocab.n_vocab,):
            raise ValueError(f"a row after {key} has shape {row.shape}, not ({self.vocab.n_vocab},)")
        return row

    def greedy(self, context: Sequence[int], n: int) -> list[int]:
        """The next n tokens by argmax of the raw rows (end-of-generation ids included)."""
        context = list(context)
        out: list[int] = []
        for _ in range(n):
            out.append(int(self.row(context).argmax()))
            context.append(out[-1])
        return out

    def text_of(self, tokens: Iterable[int]) -> str:
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", errors="replace")

    @property
    def n_evals(self) -> int:
        """Forward passes so far."""
        return len(self.calls)

    @property
    def n_rows(self) -> int:
        """Logits rows returned so far."""
        return sum(call.rows for call in self.calls)

    @property
    def n_evaluated(self) -> int:
        """Token positions evaluated so far."""
        return sum(len(call.tokens) for call in self.calls)

    def reset_counts(self) -> None:
        self.calls.clear()


Rule = Callable[[tuple[int, ...], int], "Sequence[int] | Draft"]


class ScriptedDrafter(DrafterBase):
    """A drafter whose proposals come from `rule(context, k)`: a list of ids (a point proposal) or
    a whole `Draft` (to hand the engine a q, or a malformed one). It records what it was asked.

    Attributes:
        proposals: (len(context), k, proposed tokens) per call to propose.
        feedback: (n_proposed, n_accepted) per call to accepted.
        begun: the prompts `begin` was shown.
        samplers: the sampler the engine passed with each proposal (None for plain greedy).
        n_forgotten: calls to `forget`.
    """

    def __init__(self, rule: Rule, name: str = "scripted") -> None:
        self.rule = rule
        self.name = name
        self.proposals: list[tuple[int, int, list[int]]] = []
        self.feedback: list[tuple[int, int]] = []
        self.begun: list[tuple[int, ...]] = []
        self.samplers: list[TokenSampler | None] = []
        self.n_forgotten = 0

    def begin(self, prompt: Sequence[int]) -> None:
        self.begun.append(tuple(prompt))

    def propose(self, context: Sequence[int], k: int, sampler: TokenSampler | None = None) -> Draft:
        result = self.rule(tuple(context), k)
        draft = result if isinstance(result, Draft) else Draft([int(t) for t in result])
        self.proposals.append((len(context), k, list(draft.tokens)))
        self.samplers.append(sampler)
        return draft

    def accepted(self, n_proposed: int, n_accepted: int) -> None:
        self.feedback.append((n_proposed, n_accepted))

    def forget(self) -> None:
        self.n_forgotten += 1


def oracle_drafter(target: FakeRuntime) -> ScriptedDrafter:
    """Proposes exactly the target's greedy continuation: every draft token is accepted."""
    return ScriptedDrafter(lambda context, k: target.greedy(context, k), name="oracle")


def wrong_drafter(target: FakeRuntime) -> ScriptedDrafter:
    """Proposes k tokens, the first of which is never the target's greedy choice."""

    def rule(context: tuple[int, ...], k: int) -> list[int]:
        right = target.greedy(context, 1)[0]
        return [(right + 1 + i) % target.vocab.n_vocab for i in range(k)]

    return ScriptedDrafter(rule, name="wrong")


def random_drafter(target: FakeRuntime, seed: int, p_right: float = 0.6) -> ScriptedDrafter:
    """Seeded random drafts of 0 … k tokens; each token is the target's greedy continuation of the
    draft so far with probability p_right, else a random id (which may be right by chance)."""
    rng = np.random.default_rng(seed)

    def rule(context: tuple[int, ...], k: int) -> list[int]:
        draft: list[int] = []
        for _ in range(int(rng.integers(0, k + 1))):
            if rng.random() < p_right:
                draft.append(target.greedy([*context, *draft], 1)[0])
            else:
                draft.append(int(rng.integers(0, target.vocab.n_vocab)))
        return draft

    return ScriptedDrafter(rule, name=f"random{seed}")


class TableDrafter(DrafterBase):
    """A draft "model" without a cache: drafts from a table's rows (e.g. another FakeRuntime's
    `row`), by argmax without a sampler, else through the engine's sampler, which records q.

    Args:
        row: context → logits row.
        q_shortfall: hand back this many fewer distributions than tokens (a broken drafter).
    """

    name = "table"

    def __init__(self, row: Callable[[Sequence[int]], np.ndarray], q_shortfall: int = 0) -> None:
        self.row = row
        self.q_shortfall = q_shortfall
        self.n_with_q = 0

    def begin(self, prompt: Sequence[int]) -> None:
        pass

    def propose(self, context: Sequence[int], k: int, sampler: TokenSampler | None = None) -> Draft:
        draft: list[int] = []
        if sampler is not None:
            sampler.reset()
        for _ in range(k):
            row = self.row([*context, *draft])
            if sampler is None:
                draft.append(int(row.argmax()))
            else:
                recent = list(context[-sampler.window :]) + draft if sampler.window else ()
                draft.append(sampler.pick(row, recent))
        if sampler is None or not sampler.dists:
            return Draft(draft)
        self.n_with_q += 1
        return Draft(draft, sampler.dists[: max(len(draft) - self.q_shortfall, 0)])
