"""How much to draft, and from where, before every step: a goodput controller.

Speculation pays only when the tokens a step is expected to yield outweigh what the step costs.
Before each step the controller picks the draft source s (the model drafter, the n-gram drafter or
none) and the draft length k that maximise the expected tokens per second,

    goodput(s, k) = E[accepted + 1 | s, k] / (k · T_draft(s) + T_verify(k + 1)),

where T_verify(n) is the target's measured cost for one pass over n tokens, T_draft the measured
cost of one draft token (0 for n-gram drafts), and k = 0 is an ordinary target step (goodput
1 / T_verify(1)). With a_i the probability that draft token i is accepted given that the tokens
before it were, E[accepted + 1 | k] = 1 + a_1 + a_1·a_2 + … + a_1·…·a_k.

Beside other sequences (continuous batching, `edgespec.batching`), m others each add one row to
the pass. llama.cpp splits a pass whose sequences have different row counts into ubatches of
equal rows per sequence (one KV stream per sequence), so a sequence's k drafts cost a pass of
their own on top of the shared one: the aggregate goodput the controller then maximises is

    (m + E[accepted + 1 | s, k]) / (T_verify(m + 1) + [k > 0] · T_verify(k) + k · T_draft(s)),

with m + 1 sequences of one row priced as one sequence's m + 1 rows (they cost the same within
3% on the default target: `benchmarks/batch_cost.py`). Where a row costs almost as much in a
batch as alone, as on a 2-core CPU, speculation then pays only for near-certain copies.

The a_i are learned online, per source, from every verified draft, with exponential forgetting,
so the choice follows the text: n-gram drafts while the answer copies the prompt, model drafts
where they are accepted and cheap enough, plain decoding elsewhere. N-gram acceptance depends
strongly on how long the match behind the proposal is (a 1-token match is a guess, a 12-token match
means the text is being copied), so it is learned separately for each match-length bucket. The
model drafter's own confidence cuts its drafts short (`ModelDrafter.min_prob`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from edgespec.drafting import NO_DRAFT, Draft, DrafterBase

if TYPE_CHECKING:
    from edgespec.drafting import ModelDrafter, NgramDrafter
    from edgespec.runtimes.base import Runtime
    from edgespec.sampling import TokenSampler

#: n-gram match lengths are grouped into buckets starting at these lengths: 1, 2, 3-4, 5-8, 9-16, 17+
MATCH_BUCKETS = (1, 2, 3, 5, 9, 17)

#: Prior acceptance of an n-gram draft's first token, per match-length bucket. Measured by replaying
#: the default target's greedy answers to 39 Spec-Bench prompts (the last 3 of each category, which
#: the benchmarks do not use) through the n-gram drafter (benchmarks/ngram_acceptance.py).
NGRAM_PRIOR = (0.24, 0.47, 0.74, 0.58, 0.74, 0.92)

#: prior for a model drafter's per-position acceptance before anything was measured
MODEL_PRIOR = 0.6


def match_bucket(length: int) -> int:
    """The bucket index of an n-gram match of `length` tokens (length >= 1)."""
    bucket = 0
    for i, start in enumerate(MATCH_BUCKETS):
        if length >= start:
            bucket = i
    return bucket


class Acceptance:
    """Per-position acceptance of one kind of draft, learned online.

    `alphas()[i]` estimates the probability that draft token i + 1 is accepted given that the
    tokens before it were. A verified draft of length L with n accepted is a trial at positions
    1 … min(n + 1, L) and a success at positions 1 … n. Before each update the counts decay by
    `decay`, so about 1 / (1 - decay) recent drafts carry the estimate; `prior_weight`
    pseudo-trials at the prior rates keep it sensible before there is data.

    With `pooled_from = p`, positions p + 1 … k_max share one estimate, learned from the trials
    at all of them. An n-gram copy is accepted token after token at one rate while the answer
    restates the prompt, so what positions 2 and 3 showed holds for position 40 too; estimated
    position by position, a position never drafted keeps its prior, and the controller, seeing no
    evidence that longer drafts pay, would never draft them.

    Args:
        k_max: positions tracked.
        prior: prior acceptance per position (the last value repeats; empty: 0.5).
        prior_weight: how many drafts the prior counts as.
        decay: forgetting factor per observed draft, in (0, 1].
        pooled_from: the number of leading positions estimated one by one (None: all).
    """

    def __init__(
        self,
        k_max: int,
        prior: Sequence[float] = (),
        prior_weight: float = 2.0,
        decay: float = 0.9,
        pooled_from: int | None = None,
    ) -> None:
        if k_max < 1:
            raise ValueError(f"k_max must be at least 1, got {k_max}")
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        values = list(prior) or [0.5]
        values += [values[-1]] * (k_max - len(values))
        self.prior = np.clip(np.asarray(values[:k_max], dtype=np.float64), 0.0, 1.0)
        self.prior_weight = prior_weight
        self.decay = decay
        self.pooled_from = pooled_from
        self.trials = np.zeros(k_max)
        self.successes = np.zeros(k_max)

    def alphas(self) -> np.ndarray:
        """Estimated conditional acceptance per position, shape (k_max,)."""
        w = self.prior_weight
        alphas = (self.successes + w * self.prior) / (self.trials + w)
        p = self.pooled_from
        if p is not None and p < len(alphas):
            alphas[p:] = (self.successes[p:].sum() + w * self.prior[p]) / (self.trials[p:].sum() + w)
        return alphas

    def observe(self, n_proposed: int, n_accepted: int) -> None:
        """A draft of n_proposed tokens was verified and its first n_accepted were kept."""
        if not 0 <= n_accepted <= n_proposed:
            raise ValueError(f"accepted {n_accepted} of {n_proposed}")
        self.trials *= self.decay
        self.successes *= self.decay
        tried = min(n_accepted + 1, n_proposed, len(self.trials))
        self.trials[:tried] += 1.0
        self.successes[: min(n_accepted, tried)] += 1.0


def expected_tokens(alphas: Sequence[float] | np.ndarray, k: int) -> float:
    """E[accepted + 1] for a k-token draft whose position i is accepted with alphas[i-1] given the
    earlier ones were: 1 + a_1 + a_1·a_2 + … + a_1·…·a_k."""
    if k <= 0:
        return 1.0
    return 1.0 + float(np.cumprod(np.asarray(alphas[:k], dtype=np.float64)).sum())


def best_k(
    alphas: Sequence[float] | np.ndarray, step_cost: Sequence[float] | np.ndarray, others: int = 0
) -> tuple[int, float]:
    """(k, goodput) maximising expected tokens per second.

    Args:
        alphas: conditional acceptance per position (at least len(step_cost) - 1 values).
        step_cost: step_cost[k] = seconds for a step with k draft tokens (drafting + verifying);
            step_cost[0] is a plain target step.
        others: tokens the same pass gives other sequences (one each), counted in the goodput.
    """
    products = np.cumprod(np.asarray(alphas[: len(step_cost) - 1], dtype=np.float64))
    tokens = np.concatenate(([1.0], 1.0 + np.cumsum(products))) + others
    rates = tokens / np.asarray(step_cost[: len(tokens)], dtype=np.float64)
    k = int(rates.argmax())
    return k, float(rates[k])


@dataclass(frozen=True)
class Plan:
    """What one step drafts: `source` ("model", "ngram" or None for a plain step) and k tokens,
    with the expected tokens per second that made it the choice."""

    source: str | None
    k: int
    goodput: float
    bucket: int = 0


@dataclass
class SourceStats:
    """How often a source was chosen and how its drafts fared (for reports)."""

    steps: int = 0
    drafted: int = 0
    accepted: int = 0


class GoodputController:
    """Chooses the draft source and length before every step (see the module docstring).

    Args:
        t_verify: T_verify(n) for n = 1 … len, in seconds (measured: `edgespec profile tune`,
            `costs.measure`); longer passes are extrapolated linearly.
        t_draft: seconds per model-draft token.
        k_max: the most draft tokens per step.
        model_prior: prior per-position acceptance of the model drafter.
        ngram_prior: prior first-token acceptance per match-length bucket (MATCH_BUCKETS).
        margin: a draft must promise this much more goodput than a plain step (1.05 = 5%), so that
            estimation noise does not make speculation lose (with 2%, and costs measured without
            the switching excess of `costs.measure`, a bench on the development VM lost 12% on
            Spec-Bench's extraction prompts).
        decay: forgetting factor of the acceptance estimates.
    """

    def __init__(
        self,
        t_verify: Sequence[float],
        t_draft: float,
        k_max: int = 16,
        *,
        model_prior: Sequence[float] = (MODEL_PRIOR,),
        ngram_prior: Sequence[float] = NGRAM_PRIOR,
        margin: float = 1.05,
        decay: float = 0.9,
    ) -> None:
        if len(t_verify) < 2 or min(t_verify) <= 0:
            raise ValueError("t_verify needs at least T(1) and T(2), all positive")
        if k_max < 1:
            raise ValueError(f"k_max must be at least 1, got {k_max}")
        if len(ngram_prior) != len(MATCH_BUCKETS):
            raise ValueError(f"ngram_prior needs {len(MATCH_BUCKETS)} values, one per match-length bucket")
        self.k_max = k_max
        self.t_draft = t_draft
        self.margin = margin
        self.decay = decay
        measured = [float(t) for t in t_verify]
        slope = measured[-1] - measured[-2]
        while len(measured) < k_max + 1:
            measured.append(measured[-1] + max(slope, 0.0))
        # Timing noise can make a longer pass look cheaper than a shorter one; it never is.
        self.t_verify = np.maximum.accumulate(np.asarray(measured[: k_max + 1]))
        self._shared: dict[int, np.ndarray] = {}  # _pass_costs per number of other sequences
        self._model_prior = tuple(model_prior)
        # After a first accepted n-gram token the next ones are more likely: halfway to certain.
        self._ngram_prior = tuple((p, (1.0 + p) / 2) for p in ngram_prior)
        self.reset()

    def reset(self) -> None:
        """Back to the priors (a new generation)."""
        self.model = Acceptance(self.k_max, self._model_prior, decay=self.decay)
        # An n-gram draft's first token is a guess at whether the copy goes on; after it the copy
        # runs at one rate (see Acceptance.pooled_from).
        self.ngram = [
            Acceptance(self.k_max, prior, decay=self.decay, pooled_from=1) for prior in self._ngram_prior
        ]

    def plan(
        self, k_cap: int, ngram_available: int = 0, ngram_match: int = 0, model: bool = False, others: int = 0
    ) -> Plan:
        """The best plan for the next step.

        Args:
            k_cap: the most draft tokens this step may have (output and context room).
            ngram_available: tokens the n-gram drafter proposes (0: it found no match).
            ngram_match: the length of the match behind them.
            model: whether a model drafter can be asked.
            others: sequences sharing the target's pass, one row each (see the module); the
                goodput is then theirs and this one's together.
        """
        verify = self._pass_costs(others)
        plain = (others + 1.0) / verify[0]
        best = Plan(None, 0, plain)
        cap = min(k_cap, self.k_max)
        if cap <= 0:
            return best
        if ngram_available > 0:
            bucket = match_bucket(max(ngram_match, 1))
            n = min(cap, ngram_available)
            k, rate = best_k(self.ngram[bucket].alphas(), verify[: n + 1], others)
            if k and rate > best.goodput:
                best = Plan("ngram", k, rate, bucket)
        if model:
            cost = verify[: cap + 1] + self.t_draft * np.arange(cap + 1)
            k, rate = best_k(self.model.alphas(), cost, others)
            if k and rate > best.goodput:
                best = Plan("model", k, rate)
        if best.source is not None and best.goodput < plain * self.margin:
            return Plan(None, 0, plain)
        return best

    def _pass_costs(self, others: int) -> np.ndarray:
        """cost[k]: the target pass of a step with k drafts, beside `others` one-row sequences."""
        if others <= 0:
            return self.t_verify
        costs = self._shared.get(others)
        if costs is None:
            shared = self._t(others + 1)
            costs = np.array([shared] + [shared + self._t(k) for k in range(1, self.k_max + 1)])
            self._shared[others] = costs
        return costs

    def _t(self, n: int) -> float:
        """T_verify(n), extrapolated linearly past the measured lengths."""
        t = self.t_verify
        if n <= len(t):
            return float(t[n - 1])
        return float(t[-1] + (n - len(t)) * max(t[-1] - t[-2], 0.0))

    def observe(self, plan: Plan, n_proposed: int, n_accepted: int) -> None:
        """Learn from a verified draft made under `plan`."""
        if plan.source == "model":
            self.model.observe(n_proposed, n_accepted)
        elif plan.source == "ngram":
            self.ngram[plan.bucket].observe(n_proposed, n_accepted)


def _fresh_stats() -> dict[str, SourceStats]:
    return {"model": SourceStats(), "ngram": SourceStats(), "none": SourceStats()}


@dataclass
class ControlledDrafter(DrafterBase):
    """A drafter that asks a GoodputController, before every step, which source to draft from
    (the model drafter, the n-gram drafter or none) and how many tokens.

    It satisfies the Drafter protocol, so the engine runs it like any other drafter; k from the
    engine (GenerationSettings.draft_max) caps what the controller may choose.
    """

    controller: GoodputController
    model: ModelDrafter | None = None
    ngram: NgramDrafter | None = None
    name: str = "auto"
    #: how many other sequences share the target's passes now (continuous batching: set by
    #: `batching.Slots`); None: none ever do
    sharing: Callable[[], int] | None = None
    #: this generation's choices per source ("model", "ngram", "none")
    stats: dict[str, SourceStats] = field(default_factory=_fresh_stats, init=False)

    def __post_init__(self) -> None:
        self._plan = Plan(None, 0, 0.0)

    @property
    def runtime(self) -> Runtime | None:
        return self.model.runtime if self.model is not None else None

    def propose(self, context: Sequence[int], k: int, sampler: TokenSampler | None = None) -> Draft:
        proposal = self.ngram.propose(context, k).tokens if self.ngram is not None else []
        match = self.ngram.match_length if self.ngram is not None else 0
        others = self.sharing() if self.sharing is not None else 0
        plan = self.controller.plan(k, len(proposal), match, model=self.model is not None, others=others)
        self._plan = plan
        if plan.source == "ngram":
            draft = Draft(proposal[: plan.k])
        elif plan.source == "model" and self.model is not None:
            draft = self.model.propose(context, plan.k, sampler)
        else:
            draft = NO_DRAFT
        entry = self.stats[plan.source or "none"]
        entry.steps += 1
        entry.drafted += len(draft.tokens)
        return draft

    def accepted(self, n_proposed: int, n_accepted: int) -> None:
        self.controller.observe(self._plan, n_proposed, n_accepted)
        self.stats[self._plan.source or "none"].accepted += n_accepted

    def begin(self, prompt: Sequence[int]) -> None:
        # Every generation starts from the priors, and its statistics from zero.
        self.controller.reset()
        self.stats = _fresh_stats()
        self._plan = Plan(None, 0, 0.0)
        if self.model is not None:
            self.model.begin(prompt)
        if self.ngram is not None:
            self.ngram.begin(prompt)

    def forget(self) -> None:
        if self.model is not None:
            self.model.forget()

    def close(self) -> None:
        if self.model is not None:
            self.model.close()

    def summary(self) -> Mapping[str, SourceStats] | None:
        return dict(self.stats)
