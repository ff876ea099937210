"""Sampling: one logits-processing pipeline, applied identically to the draft's and the target's
logits, and the distributions it produces.

The pipeline, in order (temperature first, as in Hugging Face transformers and vLLM; llama.cpp
applies it last, so top-p / min-p figures are not interchangeable with llama.cpp's):

0. a grammar's mask (`constrain`): tokens it forbids after this position become -inf;
1. logit bias: add a fixed amount to chosen tokens (-inf bans a token);
2. penalties over the last `penalty_last_n` context tokens: repetition (CTRL-style: divide a
   positive logit by the penalty, multiply a negative one), frequency (minus penalty × count) and
   presence (minus penalty once);
3. temperature: divide by T; T = 0 means greedy, the argmax of the logits after steps 1-2;
4. top-k: keep the k largest;
5. top-p: keep the smallest set of largest tokens whose probability (renormalised over what
   top-k kept) reaches p;
6. min-p: keep tokens whose probability is at least min_p times the largest one's.

Every truncation keeps an upper set of logits (ties at the cut are all kept), so each is exact and
needs no full sort: candidates are found by thresholds and only those are sorted. Sums,
probabilities, ratios and differences are float64; only the exponentials of a full-vocabulary
row are float32 (see `_weights`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Literal, Protocol

import numpy as np

from edgespec.errors import RuntimeFailure, SettingsError

AcceptMode = Literal["rejection", "exact"]


@dataclass(frozen=True)
class SamplingSettings:
    """How tokens are chosen.

    Attributes:
        temperature: 0 is greedy decoding (the output is exactly target-only greedy output).
        top_k: keep the k most likely tokens (0: off).
        top_p: nucleus sampling threshold in (0, 1] (1: off).
        min_p: keep tokens at least this fraction as likely as the most likely one (0: off).
        repeat_penalty: > 0; 1 is off.
        frequency_penalty, presence_penalty: OpenAI-style penalties (0: off), may be negative.
        penalty_last_n: how many of the latest context tokens the penalties look at.
        logit_bias: token id → amount added to its logit (-inf bans the token).
        accept: how drafts are verified when temperature > 0: "rejection" (speculative sampling,
            keeps a draft token with probability min(1, p/q)) or "exact" (keeps a draft token only
            if it equals the target's own sample, as llama.cpp does). Both sample exactly from the
            target's distribution.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    penalty_last_n: int = 64
    logit_bias: Mapping[int, float] = field(default_factory=dict)
    accept: AcceptMode = "rejection"

    def __post_init__(self) -> None:
        def bad(message: str) -> SettingsError:
            return SettingsError(message)

        for name in (
            "temperature",
            "top_p",
            "min_p",
            "repeat_penalty",
            "frequency_penalty",
            "presence_penalty",
        ):
            try:  # JSON integers have no size limit: 10**400 does not fit a float
                float(getattr(self, name))
            except OverflowError:
                raise bad(f"{name} is out of range, got {getattr(self, name)}") from None
        if not (math.isfinite(self.temperature) and 0 <= self.temperature <= 100):
            raise bad(f"temperature must be between 0 and 100, got {self.temperature}")
        if self.top_k < 0:
            raise bad(f"top_k must be 0 (off) or more, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise bad(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            raise bad(f"min_p must be in [0, 1), got {self.min_p}")
        if not (math.isfinite(self.repeat_penalty) and self.repeat_penalty > 0):
            raise bad(f"repeat_penalty must be above 0, got {self.repeat_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and -10 <= value <= 10):
                raise bad(f"{name} must be between -10 and 10, got {value}")
        if self.penalty_last_n < 0:
            raise bad(f"penalty_last_n must be 0 or more, got {self.penalty_last_n}")
        if self.accept not in ("rejection", "exact"):
            raise bad(f"accept must be 'rejection' or 'exact', got {self.accept!r}")
        bias: dict[int, float] = {}
        for token, value in dict(self.logit_bias).items():
            if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or token < 0:
                raise bad(f"logit_bias keys must be token ids (integers >= 0), got {token!r}")
            try:
                value = float(value)
            except OverflowError:  # a huge JSON integer: -10**400 bans the token, as -inf does
                value = -math.inf if value < 0 else math.inf
            if math.isnan(value) or value == math.inf or (value != -math.inf and abs(value) > 1e30):
                raise bad(f"logit_bias for token {token} must be a number within ±1e30, or -inf; got {value}")
            bias[int(token)] = value
        object.__setattr__(self, "logit_bias", bias)

    def to_dict(self) -> dict[str, object]:
        """Plain JSON-safe values (a banned token's -inf bias becomes the string "-inf")."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["logit_bias"] = {str(t): v if math.isfinite(v) else "-inf" for t, v in self.logit_bias.items()}
        return data

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.penalty_last_n > 0 and (
            self.repeat_penalty != 1 or self.frequency_penalty != 0 or self.presence_penalty != 0
        )

    @property
    def penalty_window(self) -> int:
        """How many of the latest tokens the penalties need to see (0 when they are off)."""
        return self.penalty_last_n if self.penalized else 0


GREEDY = SamplingSettings()

#: per logits row, the tokens a grammar allows (bool arrays), or None for no grammar
Masks = Sequence[np.ndarray] | None


class Guide(Protocol):
    """What sampling needs of a grammar (`constrain.Constraint`): the mask for the next token, and
    to advance over the chosen one."""

    def allowed(self) -> np.ndarray: ...

    def consume(self, tokens: Sequence[int]) -> None: ...


@dataclass(frozen=True)
class Dist:
    """A probability distribution over token ids, as unnormalised float64 weights.

    Attributes:
        weights: non-negative weights (float32 or float64); probabilities are weights / total.
        total: sum of weights (> 0), accumulated in float64.
        ids: sorted token ids the weights belong to, or None when `weights` covers every token id
            0 … len(weights)-1 (ids beyond have probability 0).
    """

    weights: np.ndarray
    total: float
    ids: np.ndarray | None = None

    @classmethod
    def one_hot(cls, token: int) -> Dist:
        return cls(np.ones(1), 1.0, np.array([token], dtype=np.int64))

    def probs(self, tokens: Sequence[int] | np.ndarray) -> np.ndarray:
        """Probabilities of `tokens` (shape (n,), float64)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if self.ids is None:
            inside = tokens < len(self.weights)
            out = np.zeros(len(tokens))
            out[inside] = self.weights[tokens[inside]]
            return out / self.total
        pos = np.searchsorted(self.ids, tokens)
        pos_ok = np.minimum(pos, len(self.ids) - 1)
        found = self.ids[pos_ok] == tokens
        return np.where(found, self.weights[pos_ok].astype(np.float64), 0.0) / self.total

    def prob(self, token: int) -> float:
        return float(self.probs([token])[0])

    def sample(self, u: float) -> int:
        """The token at quantile u ∈ [0, 1) of the distribution (inverse-CDF sampling)."""
        return _inverse_cdf(self.weights, self.ids, u)

    def support(self) -> np.ndarray:
        """Token ids with probability > 0."""
        nonzero = np.flatnonzero(self.weights > 0)
        return nonzero if self.ids is None else self.ids[nonzero]

    def as_dense(self, n_vocab: int) -> np.ndarray:
        """Probabilities over ids 0 … n_vocab-1 (float64)."""
        out = np.zeros(n_vocab)
        if self.ids is None:
            n = min(n_vocab, len(self.weights))
            out[:n] = self.weights[:n]
        else:
            keep = self.ids < n_vocab
            out[self.ids[keep]] = self.weights[keep]
        return out / self.total


_BLOCK = 1024


def _inverse_cdf(weights: np.ndarray, ids: np.ndarray | None, u: float) -> int:
    """Index of the first weight whose cumulative sum exceeds u × total (zero weights are never
    chosen). A long row is searched in two levels, block sums then one block, because a float64
    cumulative sum over a whole 152k-token vocabulary costs half a millisecond."""
    start = 0
    if len(weights) <= 4 * _BLOCK:
        cdf = np.cumsum(weights, dtype=np.float64)
        target = u * cdf[-1]
    else:
        n_full = len(weights) // _BLOCK * _BLOCK
        sums = weights[:n_full].reshape(-1, _BLOCK).sum(axis=1, dtype=np.float64)
        sums = np.append(sums, weights[n_full:].sum(dtype=np.float64))
        block_cdf = np.cumsum(sums)
        target = u * block_cdf[-1]
        b = min(int(np.searchsorted(block_cdf, target, side="right")), len(sums) - 1)
        while sums[b] <= 0:  # u × total rounded up to the total: the last block with weight
            b -= 1
        target -= block_cdf[b - 1] if b else 0.0
        start = b * _BLOCK
        cdf = np.cumsum(weights[start : start + _BLOCK], dtype=np.float64)
    i = int(np.searchsorted(cdf, target, side="right"))
    if i >= len(cdf):  # rounding at the top end: the last token with weight
        i = int(np.flatnonzero(weights[start : start + len(cdf)] > 0)[-1])
    return start + i if ids is None else int(ids[start + i])


def residual(p: Dist, q: Dist, n_vocab: int) -> Dist | None:
    """norm(max(0, p − q)): what to sample from after rejecting a draft token drawn from q.

    Returns None when p − q has no positive mass (p equals q up to rounding), in which case the
    rejection had probability 0 in exact arithmetic and the caller samples from p.
    """
    if p.ids is None and q.ids is None and len(p.weights) == n_vocab and len(q.weights) == n_vocab:
        # both dense over the vocabulary: four float64 passes, no temporaries beyond one
        diff = np.multiply(p.weights, 1.0 / p.total, dtype=np.float64)
        diff -= np.multiply(q.weights, 1.0 / q.total, dtype=np.float64)
        np.maximum(diff, 0.0, out=diff)
        ids = None
    elif p.ids is None:
        diff = np.maximum(p.as_dense(n_vocab) - q.as_dense(n_vocab), 0.0)
        ids = None
    else:
        ids = p.ids
        diff = np.maximum(p.weights.astype(np.float64) / p.total - q.probs(ids), 0.0)
    total = float(diff.sum())
    if not total > 1e-300:
        return None
    return Dist(diff, total, ids)


class LogitsProcessor:
    """The sampling pipeline for one model's logits rows.

    Args:
        settings: the sampling settings.
        n_vocab: width of the rows this processor sees (columns beyond are ignored; a draft
            model's rows are cut to the target's vocabulary).
        check_ids: refuse logit_bias ids outside the vocabulary (off for a draft model, whose
            narrower vocabulary simply cannot propose them).
    """

    def __init__(self, settings: SamplingSettings, n_vocab: int, *, check_ids: bool = True) -> None:
        self.settings = settings
        self.n_vocab = n_vocab
        if check_ids:
            outside = [t for t in settings.logit_bias if t >= n_vocab]
            if outside:
                raise SettingsError(
                    f"logit_bias token {outside[0]} is not in the vocabulary (ids 0 … {n_vocab - 1})"
                )
        bias = {t: v for t, v in settings.logit_bias.items() if t < n_vocab}
        if check_ids and sum(v == -math.inf for v in bias.values()) == n_vocab:
            # greedy decoding would otherwise take the argmax of all -inf: token 0, silently
            raise SettingsError("logit_bias bans every token: nothing is left to sample")
        self._bias_ids = np.array(sorted(bias), dtype=np.int64)
        self._bias_values = np.array([bias[t] for t in sorted(bias)], dtype=np.float32)
        #: how many of the latest context tokens a caller must pass as `recent`
        self.window = settings.penalty_window

    @property
    def adjusts(self) -> bool:
        """Whether steps 1-2 (bias, penalties) change anything."""
        return bool(len(self._bias_ids)) or self.window > 0

    def adjusted(
        self, rows: np.ndarray, recents: Sequence[Sequence[int]] = (), masks: Masks = None
    ) -> np.ndarray:
        """Apply a grammar's masks, logit bias and penalties (steps 0-2).

        Args:
            rows: float32 logits, shape (r, ≥ n_vocab); not modified.
            recents: per row, the tokens before its position (only the last `window` are used);
                needed when penalties are on.
            masks: per row, which tokens a grammar allows (bool, ≥ n_vocab wide); the others
                become -inf. None: no grammar.

        Returns:
            float32 array (r, n_vocab): a view of `rows` when nothing applies, else a copy.
        """
        rows = rows[:, : self.n_vocab]
        if not self.adjusts and masks is None:
            return rows
        out = np.array(rows, dtype=np.float32, copy=True)
        if masks is not None:
            if len(masks) != len(out):
                raise ValueError(f"need {len(out)} masks, got {len(masks)}")
            for row, mask in zip(out, masks, strict=True):
                np.copyto(row, -np.inf, where=~mask[: self.n_vocab])
        if len(self._bias_ids):
            out[:, self._bias_ids] += self._bias_values
        if self.window:
            s = self.settings
            if len(recents) != len(out):
                raise ValueError(f"need {len(out)} recent-token lists for the penalties, got {len(recents)}")
            for row, recent in zip(out, recents, strict=True):
                window = np.asarray(recent[-self.window :] if len(recent) else [], dtype=np.int64)
                window = window[window < self.n_vocab]
                if not len(window):
                    continue
                ids, counts = np.unique(window, return_counts=True)
                values = row[ids]
                if s.repeat_penalty != 1:
                    values = np.where(values > 0, values / s.repeat_penalty, values * s.repeat_penalty)
                row[ids] = values - (counts * s.frequency_penalty + s.presence_penalty)
        return out

    def argmax(
        self, rows: np.ndarray, recents: Sequence[Sequence[int]] = (), masks: Masks = None
    ) -> np.ndarray:
        """Greedy choice per row after the masks, bias and penalties: shape (r,) int64."""
        x = self.adjusted(rows, recents, masks)
        best = x.argmax(axis=1)
        if masks is not None and not np.all(np.isfinite(x[np.arange(len(x)), best])):
            raise SettingsError("logit_bias bans every token the grammar allows: nothing is left to choose")
        return best

    def choose(
        self, row: np.ndarray, recent: Sequence[int], rng: np.random.Generator, mask: np.ndarray | None = None
    ) -> tuple[int, Dist | None]:
        """The next token from one logits row (shape (n,)): the argmax after the mask, bias and
        penalties when temperature is 0, else a sample from the row's distribution, which is
        returned too."""
        rows = row.reshape(1, -1)
        masks = None if mask is None else [mask]
        if self.settings.greedy:
            return int(self.argmax(rows, [recent], masks)[0]), None
        dist = self.distributions(rows, [recent], masks)[0]
        return dist.sample(float(rng.random())), dist

    def distributions(
        self, rows: np.ndarray, recents: Sequence[Sequence[int]] = (), masks: Masks = None
    ) -> list[Dist]:
        """The full pipeline for each row (temperature must be > 0).

        Args:
            rows: float32 logits, shape (r, ≥ n_vocab).
            recents, masks: as for `adjusted`.

        Returns:
            r distributions.
        """
        s = self.settings
        if s.greedy:
            raise ValueError("distributions need temperature > 0; use argmax for greedy decoding")
        x = self.adjusted(rows, recents, masks)
        t = s.temperature
        top = x.max(axis=1)
        if not np.all(np.isfinite(top)):
            if np.isnan(x).any() or np.isposinf(top).any():
                raise RuntimeFailure("the model gave NaN or infinite scores: its weights may be damaged")
            if masks is not None:
                raise SettingsError(
                    "logit_bias bans every token the grammar allows: nothing is left to sample"
                )
            raise SettingsError("logit_bias bans every token: nothing is left to sample")
        return [self._one(row, float(m), t) for row, m in zip(x, top, strict=True)]

    def _one(self, x: np.ndarray, m: float, t: float) -> Dist:
        s = self.settings
        cut = -math.inf  # keep tokens with x >= cut
        candidates = None  # token ids that include every kept token (None: all of them)
        if 0 < s.top_k < len(x):
            cut, candidates = _top_k_cut(x, s.top_k, m)
        if s.top_p < 1:
            top_p_cut, candidates = _top_p_cut(x, candidates, m, t, s.top_p)
            cut = max(cut, top_p_cut)
        if s.min_p > 0:
            # p_i >= min_p * p_max  ⇔  (x_i - m) / t >= ln(min_p)
            cut = max(cut, m + t * math.log(s.min_p))
        if cut == -math.inf:
            w = _weights(x, m, t)
            return Dist(w, float(w.sum(dtype=np.float64)))
        ids = np.flatnonzero(x >= cut) if candidates is None else candidates[x[candidates] >= cut]
        w = np.exp((x[ids].astype(np.float64) - m) / t)
        return Dist(w, float(w.sum()), ids)


def _weights(x: np.ndarray, m: float, t: float) -> np.ndarray:
    """exp((x - m) / t) over a whole row, in float32.

    A full-vocabulary pass is the one place where float32 pays (its exp is several times faster
    than float64's, which keeps a k = 8 verification step within 2 ms); its relative error, about
    1e-7, is far below the rounding already in the model's float32 logits. Everything these
    weights feed (totals, cumulative sums, p/q, p - q) is computed in float64.
    """
    if t < 1e-30:  # 1 / t would overflow float32 (T below ~3e-39): divide in float64
        with np.errstate(over="ignore"):
            return np.exp((x.astype(np.float64) - m) / t)
    with np.errstate(over="ignore"):  # x - m <= 0: an overflow is towards -inf, whose exp is 0
        w = x - np.float32(m)
        if t != 1:
            w *= np.float32(1 / t)
        return np.exp(w, out=w)


def _top_k_cut(x: np.ndarray, k: int, m: float) -> tuple[float, np.ndarray | None]:
    """The k-th largest value of x, and the ids of the tokens at or above it.

    Looks at values near the maximum first (cheap), widening the window until it holds at least
    k values, so that only a small window is partitioned.
    """
    delta = 8.0
    while True:
        near = np.flatnonzero(x >= m - delta)
        if len(near) >= k or not math.isfinite(delta):
            break
        if delta == 8.0 and np.count_nonzero(x > -np.inf) < k:
            return -math.inf, None  # a grammar or bias left fewer than k tokens: keep them all
        # grow slowly: logits are dense a few units below the top, and a window holding most of
        # the vocabulary would make the partition below cost as much as a full sort
        delta = delta * 1.5 if delta < 1e6 else math.inf
    if len(near) < k:  # fewer than k tokens at all: top-k keeps everything
        return -math.inf, None
    values = x[near]
    kth = float(np.partition(values, len(near) - k)[len(near) - k])
    return kth, near[values >= kth]


def _top_p_cut(
    x: np.ndarray, kept: np.ndarray | None, m: float, t: float, top_p: float
) -> tuple[float, np.ndarray]:
    """The smallest logit of the nucleus: the fewest largest tokens among `kept` (ids; None: all)
    whose probabilities, normalised over `kept`, sum to at least top_p.

    Returns:
        (that logit, ids of the candidates searched, which include the whole nucleus).
    """
    values = x if kept is None else x[kept]
    weights = _weights(values, m, t)
    # This total only places the cut (p and q are cut by this same code, and the distribution
    # returned afterwards is normalised in float64), so numpy's pairwise float32 sum will do.
    total = float(weights.sum())
    # Candidates: tokens at least `ratio` as likely as the top one; widen until they hold top_p.
    ratio = 1e-3
    while True:
        floor = m + t * math.log(ratio) if ratio > 0 else -math.inf
        candidates = np.flatnonzero(values >= floor)
        cand_w = weights[candidates]
        if cand_w.sum(dtype=np.float64) >= top_p * total or ratio == 0:
            break
        ratio = ratio * 1e-3 if ratio > 1e-200 else 0.0
    order = np.argsort(-cand_w, kind="stable")
    mass = np.cumsum(cand_w[order], dtype=np.float64)
    n = min(int(np.searchsorted(mass, top_p * total, side="left")), len(order) - 1)
    ids = candidates if kept is None else kept[candidates]
    return float(values[candidates[order[n]]]), ids


class LazyDists(Sequence[Dist]):
    """The target's distributions for the rows of one verification pass, each computed when first
    read: verification stops at the first rejected draft, and the rows after it are never needed.

    Args:
        processor: the target's pipeline.
        rows: logits, shape (k + 1, ≥ n_vocab); must stay valid while this is read.
        recents: per row, the tokens before its position (for penalties).
        masks: per row, what a grammar allows (read lazily too), or None.
    """

    def __init__(
        self,
        processor: LogitsProcessor,
        rows: np.ndarray,
        recents: Sequence[Sequence[int]],
        masks: Masks = None,
    ) -> None:
        self._processor = processor
        self._rows = rows
        self._recents = recents
        self._masks = masks
        self._cache: dict[int, Dist] = {}

    def __len__(self) -> int:
        return len(self._rows)

    def __getitem__(self, i: int) -> Dist:  # type: ignore[override]
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        dist = self._cache.get(i)
        if dist is None:
            recent = [self._recents[i]] if self._processor.window else ()
            masks = None if self._masks is None else [self._masks[i]]
            dist = self._cache[i] = self._processor.distributions(self._rows[i : i + 1], recent, masks)[0]
        return dist

    @property
    def computed(self) -> int:
        """How many rows were processed."""
        return len(self._cache)


class TokenSampler:
    """Picks tokens one at a time (a model drafter's draft) through the pipeline, remembering the
    distribution each was drawn from: q, for verification.

    Args:
        settings: the sampling settings, the same as the target's.
        rng: the generation's random generator.
    """

    def __init__(
        self, settings: SamplingSettings, rng: np.random.Generator, constraint: Guide | None = None
    ) -> None:
        self.settings = settings
        self.rng = rng
        self.dists: list[Dist] = []
        self._processors: dict[int, LogitsProcessor] = {}
        #: how many of the latest tokens `pick` needs in `recent`
        self.window = settings.penalty_window
        #: the generation's grammar, if any: each row is masked by it, and each pick advances it
        self.constraint = constraint
        #: tokens picked since `reset`, each of which advanced the constraint
        self.picked = 0

    def reset(self) -> None:
        """Forget the distributions of the previous draft."""
        self.dists = []
        self.picked = 0

    def pick(self, row: np.ndarray, recent: Sequence[int]) -> int:
        """Choose the next token from one logits row (shape (n,), cut by the caller to the ids it
        may propose): the argmax after the grammar's mask, bias and penalties when temperature is
        0, else a sample. -1 when the grammar allows none of the row's tokens."""
        processor = self._processors.get(len(row))
        if processor is None:
            processor = self._processors[len(row)] = LogitsProcessor(self.settings, len(row), check_ids=False)
        mask = None
        if self.constraint is not None:
            mask = self.constraint.allowed()[: len(row)]
            if not np.isfinite(row[mask]).any():
                return -1
        token, dist = processor.choose(row, recent, self.rng, mask)
        if dist is not None:
            self.dists.append(dist)
        if self.constraint is not None:
            self.constraint.consume([token])
            self.picked += 1
        return token


def log_softmax_top(row: np.ndarray, token: int, n_top: int) -> tuple[float, list[tuple[int, float]]]:
    """The log-probability of `token` under the softmax of one raw logits row, and the n_top most
    likely tokens with theirs (largest first, ties by lower id). The sum runs in float64.

    Raises:
        RuntimeFailure: the row holds NaN or an infinity (damaged weights).
    """
    m = float(row.max())
    if not math.isfinite(m) or np.isnan(row).any():
        raise RuntimeFailure("the model gave NaN or infinite scores: its weights may be damaged")
    with np.errstate(under="ignore"):
        total = float(np.exp(row - np.float32(m)).sum(dtype=np.float64))
    lse = m + math.log(total)
    top: list[tuple[int, float]] = []
    if n_top > 0:
        n = min(n_top, len(row))
        cut = np.partition(row, len(row) - n)[len(row) - n]  # the n-th largest value
        ids = np.flatnonzero(row >= cut)  # all ties at the cut, so the lowest ids win them
        ids = ids[np.lexsort((ids, -row[ids]))][:n]
        top = [(int(i), float(row[i]) - lse) for i in ids]
    return float(row[token]) - lse, top
