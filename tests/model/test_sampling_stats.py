"""Speculative sampling reproduces the target's distribution: the joint distribution of the first
three generated tokens, sampled through the engine, against the exact one computed by enumeration
from the target's logits.

The tiny models' logits come from llama.cpp once per distinct context (`MemoRuntime`), so tens of
thousands of generations take seconds. Each test is a chi-square goodness-of-fit test at
α = 1e-4 with a fixed seed, so it is deterministic; and on the same samples the test must reject
a distribution only 2% away in total variation, which shows the sample is large enough to see an
error of that size.
"""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest

import edgespec.engine as engine_module
from edgespec.constrain import Constraint, Grammar
from edgespec.drafting import ModelDrafter, NgramDrafter
from edgespec.engine import GenerationSettings, SpeculativeEngine
from edgespec.sampling import LogitsProcessor, SamplingSettings, residual
from edgespec.verify import verify_rejection

from ..conftest import TINY_SETTINGS
from ..memoruntime import MemoRuntime

N_TOKENS = 3  # the joint distribution of the first three tokens
N_SAMPLES = 40_000
Z_ALPHA = 3.719  # one-sided normal quantile for α = 1e-4
TRUNCATED = dict(temperature=1.0, top_k=8, top_p=0.9, min_p=0.05)


@pytest.fixture(scope="module")
def memo_pair(tiny_pair):
    from edgespec.runtimes.llama_cpp import LlamaCppRuntime

    target = MemoRuntime(LlamaCppRuntime(tiny_pair[0], TINY_SETTINGS))
    draft = MemoRuntime(LlamaCppRuntime(tiny_pair[1], TINY_SETTINGS))
    yield target, draft
    target.close()
    draft.close()


@pytest.fixture(scope="module")
def prompt(memo_pair):
    """A prompt that repeats its own greedy continuation, so the n-gram drafter has proposals."""
    target, _ = memo_pair
    seed = target.tokenize("the cat sat on the mat and", add_special=True, parse_special=False)
    greedy = SpeculativeEngine(target).generate(seed, GenerationSettings(max_tokens=24, draft_max=0)).run()
    return seed + greedy.tokens + seed[1:]


def exact_joint(
    target: MemoRuntime, settings: SamplingSettings, prompt: list[int], grammar: Grammar | None = None
) -> dict[tuple, float]:
    """P(first N_TOKENS generated tokens) by enumeration; a sequence ends early at end-of-generation.
    With a grammar, each step's distribution is the target's masked to what the grammar allows
    after the tokens before it."""
    processor = LogitsProcessor(settings, target.vocab.n_vocab)
    eog = target.vocab.eog
    joint: dict[tuple, float] = Counter()
    constraint = None if grammar is None else Constraint(grammar, target)

    def walk(prefix: list[int], prob: float) -> None:
        if len(prefix) == N_TOKENS:
            joint[tuple(prefix)] += prob
            return
        context = prompt + prefix
        masks = None
        if constraint is not None:
            constraint.consume(prefix)
            masks = [constraint.allowed()]
            constraint.rollback(len(prefix))
        (dist,) = processor.distributions(target.logits_after(context)[None], [context], masks)
        for token in dist.support():
            p = dist.prob(int(token)) * prob
            if int(token) in eog:
                joint[tuple(prefix)] += p
            else:
                walk([*prefix, int(token)], p)

    walk([], 1.0)
    return dict(joint)


def sample_joint(
    engine: SpeculativeEngine,
    settings: SamplingSettings,
    prompt: list[int],
    n: int,
    grammar: Grammar | None = None,
):
    """Counts of the first N_TOKENS tokens over n seeded generations, and the drafting totals."""
    counts: Counter = Counter()
    drafted = accepted = 0
    for seed in range(n):
        gen = engine.generate(
            prompt,
            GenerationSettings(
                max_tokens=N_TOKENS + 2, draft_max=3, seed=seed, sampling=settings, grammar=grammar
            ),
        )
        gen.run()
        counts[tuple(gen.tokens[:N_TOKENS])] += 1
        drafted += gen.stats.n_drafted
        accepted += gen.stats.n_accepted
    return counts, drafted, accepted


def chi_square(counts: Counter, probs: dict[tuple, float]) -> tuple[float, float]:
    """(statistic, critical value at α = 1e-4). Cells expected to hold fewer than 5 samples are
    pooled; an outcome the exact distribution rules out fails outright."""
    n = sum(counts.values())
    if any(probs.get(outcome, 0.0) <= 0 for outcome in counts):
        return math.inf, 0.0
    observed, expected, pool_obs, pool_exp = [], [], 0, 0.0
    for outcome, p in probs.items():
        if n * p >= 5:
            observed.append(counts.get(outcome, 0))
            expected.append(n * p)
        else:
            pool_obs += counts.get(outcome, 0)
            pool_exp += n * p
    if pool_exp > 0:
        observed.append(pool_obs)
        expected.append(pool_exp)
    obs, exp = np.array(observed, dtype=float), np.array(expected)
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = len(obs) - 1
    # Wilson-Hilferty approximation of the chi-square quantile
    critical = df * (1 - 2 / (9 * df) + Z_ALPHA * math.sqrt(2 / (9 * df))) ** 3
    return stat, critical


def shifted(probs: dict[tuple, float], tv: float) -> dict[tuple, float]:
    """A distribution `tv` away in total variation, moved the way that is hardest to detect: mass
    scaled up on one half of the outcomes and down on the other."""
    outcomes = sorted(probs, key=probs.get, reverse=True)
    upper, mass = set(), 0.0
    for outcome in outcomes[::2]:
        upper.add(outcome)
        mass += probs[outcome]
    return {o: p * (1 + tv / mass) if o in upper else p * (1 - tv / (1 - mass)) for o, p in probs.items()}


def check(memo_pair, prompt, drafter, settings, n=N_SAMPLES, grammar=None) -> None:
    target, _ = memo_pair
    exact = exact_joint(target, settings, prompt, grammar)
    assert math.isclose(sum(exact.values()), 1.0, rel_tol=1e-9)
    counts, drafted, accepted = sample_joint(SpeculativeEngine(target, drafter), settings, prompt, n, grammar)
    # Both branches ran: drafts were kept, and drafts were rejected.
    assert 0 < accepted < drafted, (accepted, drafted)
    stat, critical = chi_square(counts, exact)
    assert stat < critical, f"chi-square {stat:.1f} > {critical:.1f}: not the target's distribution"
    stat, critical = chi_square(counts, shifted(exact, 0.02))
    assert stat > critical, f"too few samples to see a 2% error (chi-square {stat:.1f} < {critical:.1f})"


def test_model_drafter_rejection_sampling(memo_pair, prompt):
    _, draft = memo_pair
    settings = SamplingSettings(**TRUNCATED, repeat_penalty=1.2, presence_penalty=0.3)
    check(memo_pair, prompt, ModelDrafter(draft), settings)


def test_ngram_drafter_rejection_sampling(memo_pair, prompt):
    check(memo_pair, prompt, NgramDrafter(n_min=1, n_max=3), SamplingSettings(**TRUNCATED))


def test_exact_match_acceptance_is_exact_too(memo_pair, prompt):
    _, draft = memo_pair
    check(memo_pair, prompt, ModelDrafter(draft), SamplingSettings(**TRUNCATED, accept="exact"), n=20_000)


def test_a_broken_verifier_fails_the_test(memo_pair, prompt, monkeypatch):
    """The classic bug: after a rejection, sample from p instead of norm(max(0, p - q))."""

    def broken(draft, q, p, uniforms, n_vocab):
        n, token = verify_rejection(draft, q, p, uniforms, n_vocab)
        if n < len(draft) and q is not None and residual(p[n], q[n], n_vocab) is not None:
            token = p[n].sample(float(uniforms[-1]))
        return n, token

    monkeypatch.setattr(engine_module, "verify_rejection", broken)
    with pytest.raises(AssertionError, match="not the target's distribution"):
        check(memo_pair, prompt, ModelDrafter(memo_pair[1]), SamplingSettings(**TRUNCATED))


#: a small grammar: free choices, then "=" (forced once the key has 3 characters), then more
SMALL_GRAMMAR = Grammar.lark('start: /[a-z ]{1,3}/ "=" /[a-z ]{2,12}/\n')
#: hot enough that the masked distributions have many outcomes (about 200 over three tokens)
HOT = dict(temperature=2.5, top_k=12)


def test_constrained_rejection_sampling_is_the_constrained_target(memo_pair, prompt):
    """Under a grammar, q is masked like p and forced tokens are one-hot drafts: the first
    tokens are still distributed as the constrained target's."""
    _, draft = memo_pair
    check(memo_pair, prompt, ModelDrafter(draft), SamplingSettings(**HOT), n=20_000, grammar=SMALL_GRAMMAR)


def test_constrained_ngram_drafts_cut_at_the_grammar_keep_the_distribution(memo_pair, prompt):
    drafter = NgramDrafter(n_min=1, n_max=3)
    check(memo_pair, prompt, drafter, SamplingSettings(**HOT), n=20_000, grammar=SMALL_GRAMMAR)
