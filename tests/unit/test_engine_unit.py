"""The draft → verify loop on a scripted runtime (tests/fakes.py): no model, milliseconds a test.

Greedy speculative output against target-only output for every kind of drafter, what each
generation costs in target passes and rows, the statistics, sampled output against the exact
distribution, every stop condition, and prompt caching.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest

import edgespec.engine as engine_module
from edgespec.drafting import Draft, NgramDrafter
from edgespec.engine import Generation, GenerationSettings, SpeculativeEngine
from edgespec.errors import PromptError, SettingsError
from edgespec.sampling import Dist, SamplingSettings

from ..fakes import (
    BOS,
    EOS,
    FakeRuntime,
    ScriptedDrafter,
    TableDrafter,
    char_id,
    oracle_drafter,
    random_drafter,
    random_logits,
    wrong_drafter,
)

SCRIPT = "the cat sat on the mat. "


def periodic(text: str) -> Callable[[tuple[int, ...]], int]:
    """The next token is the text's character at the context's position (after BOS), cyclically."""
    ids = [char_id(c) for c in text]
    return lambda context: ids[(len(context) - 1) % len(ids)]


def markov(context: tuple[int, ...]) -> int:
    """The next token is a fixed function of the last two (never BOS or EOS)."""
    return 2 + (3 * context[-1] + 7 * context[-2]) % 40


TARGETS: dict[str, Callable[[], FakeRuntime]] = {
    "periodic": lambda: FakeRuntime(periodic(SCRIPT)),
    "markov": lambda: FakeRuntime(markov),
    "random": lambda: FakeRuntime(random_logits(44, seed=1)),
    "random-small": lambda: FakeRuntime(random_logits(6, seed=2), n_vocab=6, eog=()),
}

DRAFTERS: dict[str, Callable[[FakeRuntime], object]] = {
    "oracle": oracle_drafter,
    "wrong": wrong_drafter,
    "ngram": lambda target: NgramDrafter(1, 4),
    "random0": lambda target: random_drafter(target, 0),
    "random1": lambda target: random_drafter(target, 1, p_right=0.9),
    "random2": lambda target: random_drafter(target, 2, p_right=0.3),
}


def prompt_of(target: FakeRuntime, text: str = "the cat sat on the mat. the") -> list[int]:
    if target.vocab.n_vocab < len(text) + 2:
        return [BOS, 2, 3, 2, 3, 4]
    return target.tokenize(text, add_special=True, parse_special=False)


def target_only(target: FakeRuntime, prompt: list[int], **settings) -> Generation:
    settings = {"max_tokens": 40, **settings}
    return SpeculativeEngine(target).generate(prompt, GenerationSettings(draft_max=0, **settings)).run()


def expected_greedy(target: FakeRuntime, prompt: list[int], n: int) -> list[int]:
    """Target-only greedy output computed straight from the table (cut at end-of-generation)."""
    out = target.greedy(prompt, n)
    for i, token in enumerate(out):
        if token in target.vocab.eog:
            return out[:i]
    return out


def check_bookkeeping(gen: Generation, target: FakeRuntime) -> None:
    """The statistics agree with one another and with the passes the target saw."""
    stats = gen.stats
    calls = target.calls
    assert len(calls) == stats.n_steps + 1  # the prompt pass, then one pass per step
    assert calls[0].logits == "last"
    assert all(call.logits == "all" for call in calls[1:])
    assert sum(len(call.tokens) - 1 for call in calls[1:]) == stats.n_drafted
    assert target.n_rows == 1 + stats.n_steps + stats.n_drafted
    assert len(stats.accepted_per_step) == stats.n_steps
    assert sum(stats.accepted_per_step) == stats.n_accepted <= stats.n_drafted
    assert stats.n_generated == len(gen.tokens)
    if stats.n_steps:
        assert stats.tokens_per_step == pytest.approx((stats.n_steps + stats.n_accepted) / stats.n_steps)
    # each step's pass starts where the newest token sits: the cache holds everything before it
    for step in range(1, stats.n_steps):
        assert calls[step + 1].start == calls[step].start + 1 + stats.accepted_per_step[step - 1]


@pytest.mark.parametrize("target_name", TARGETS)
@pytest.mark.parametrize("drafter_name", DRAFTERS)
def test_greedy_speculative_output_equals_target_only(target_name, drafter_name):
    for k in (1, 3, 8):
        base_rt, spec_rt = TARGETS[target_name](), TARGETS[target_name]()
        prompt = prompt_of(base_rt)
        base = target_only(base_rt, prompt, max_tokens=40)
        assert base.tokens == expected_greedy(base_rt, prompt, 40)
        drafter = DRAFTERS[drafter_name](spec_rt)
        spec = SpeculativeEngine(spec_rt, drafter).generate(prompt, GenerationSettings(40, k)).run()
        assert spec.tokens == base.tokens
        assert spec.text == base.text and spec.finish_reason == base.finish_reason
        check_bookkeeping(spec, spec_rt)
        check_bookkeeping(base, base_rt)
        assert base.stats.n_drafted == 0 and base.stats.n_steps == len(base_rt.calls) - 1


def test_target_only_is_one_pass_per_token():
    target = TARGETS["markov"]()
    gen = target_only(target, [BOS, 5, 6], max_tokens=25)
    assert gen.stats.n_steps == 24 and target.n_evals == 25
    assert [len(call.tokens) for call in target.calls] == [3] + [1] * 24
    assert gen.stats.tokens_per_step == 1.0 and gen.stats.acceptance_rate == 0.0
    # the cache holds every context token but the newest
    assert target.tokens == tuple([BOS, 5, 6, *gen.tokens][:-1])


def test_perfect_drafter_fills_every_step():
    """Every draft accepted: each pass yields k + 1 tokens, the last of them the target's own."""
    target = TARGETS["random"]()
    prompt = prompt_of(target)
    gen = SpeculativeEngine(target, oracle_drafter(target)).generate(prompt, GenerationSettings(26, 4))
    flags = [token.from_draft for token in gen]
    assert flags == [False] + [True, True, True, True, False] * 5
    stats = gen.stats
    assert stats.accepted_per_step == [4] * 5 and stats.n_steps == 5 and target.n_evals == 6
    assert stats.n_drafted == stats.n_accepted == 20
    assert stats.tokens_per_step == 5.0 and stats.acceptance_rate == 1.0
    assert target.n_rows == 1 + 5 * 5
    assert gen.tokens == expected_greedy(target, prompt, 26)


def test_wrong_drafter_costs_one_pass_per_token_and_is_never_asked_for_zero():
    target = TARGETS["markov"]()
    drafter = wrong_drafter(target)
    n, k = 12, 4
    gen = SpeculativeEngine(target, drafter).generate([BOS, 5, 6], GenerationSettings(n, k)).run()
    assert gen.tokens == expected_greedy(target, [BOS, 5, 6], n)
    assert gen.stats.n_accepted == 0 and gen.stats.accepted_per_step == [0] * (n - 1)
    # step j (j tokens out) may draft min(k, n - j - 1) tokens; the last step none, so no ask
    ks = [min(k, n - j - 1) for j in range(1, n - 1)]
    assert [asked for _, asked, _ in drafter.proposals] == ks
    assert gen.stats.n_drafted == sum(ks)
    assert drafter.feedback == [(k_j, 0) for k_j in ks]
    check_bookkeeping(gen, target)


def test_drafter_is_told_only_about_non_empty_drafts():
    target = TARGETS["markov"]()
    drafter = random_drafter(target, 5, p_right=0.7)
    gen = SpeculativeEngine(target, drafter).generate([BOS, 5, 6], GenerationSettings(60, 5)).run()
    non_empty = [tokens for _, _, tokens in drafter.proposals if tokens]
    assert 0 < len(non_empty) < len(drafter.proposals)  # the seed gives both kinds
    assert [proposed for proposed, _ in drafter.feedback] == [len(t) for t in non_empty]
    # steps and proposals line up: only the last step can have no room to draft (and no ask)
    accepted = [a for a, (_, _, t) in zip(gen.stats.accepted_per_step, drafter.proposals, strict=False) if t]
    assert [a for _, a in drafter.feedback] == accepted
    assert 0 < gen.stats.n_accepted < gen.stats.n_drafted
    assert drafter.begun == [(BOS, 5, 6)]


def test_a_draft_longer_than_k_is_cut_to_k():
    target = TARGETS["random"]()
    prompt = prompt_of(target)
    greedy_plus = ScriptedDrafter(lambda context, k: target.greedy(context, k + 5))
    gen = SpeculativeEngine(target, greedy_plus).generate(prompt, GenerationSettings(30, 3)).run()
    assert gen.tokens == expected_greedy(target, prompt, 30)
    assert all(len(call.tokens) <= 4 for call in target.calls[1:])
    assert gen.stats.accepted_per_step[:5] == [3] * 5


@pytest.mark.parametrize("n", [1, 2, 7, 23])
@pytest.mark.parametrize("k", [0, 1, 8])
def test_max_tokens_is_exact_whatever_k(n, k):
    target = TARGETS["markov"]()
    gen = (
        SpeculativeEngine(target, oracle_drafter(target))
        .generate([BOS, 3, 4], GenerationSettings(n, k))
        .run()
    )
    assert len(gen.tokens) == n and gen.finish_reason == "length"
    assert gen.tokens == expected_greedy(target, [BOS, 3, 4], n)
    check_bookkeeping(gen, target)
    # no pass was wasted on a token that is not emitted: the cache holds all but the newest
    assert target.n_past == 3 + n - 1


def test_guarantee_comes_from_the_runtime():
    for guarantee in ("exact", "distribution"):
        target = FakeRuntime(markov, guarantee=guarantee)
        assert SpeculativeEngine(target).generate(
            [BOS, 2, 3], GenerationSettings(3)
        ).run().stats.guarantee == (guarantee)


def test_greedy_penalties_and_bias_move_the_output_and_drafts_follow():
    """Bias and penalties change the argmax; the drafters get a sampler, and speculative output
    still equals target-only output under the same settings."""
    prompt = [BOS, 2, 3, 2, 3, 2]
    plain = target_only(TARGETS["random-small"](), prompt, max_tokens=40).tokens
    sampling = SamplingSettings(repeat_penalty=1.4, frequency_penalty=0.3, logit_bias={plain[0]: -50.0})
    base = target_only(TARGETS["random-small"](), prompt, max_tokens=40, sampling=sampling)
    assert base.tokens[0] != plain[0] and base.tokens != plain
    for name in ("ngram", "random0", "random1", "wrong"):
        target = TARGETS["random-small"]()
        drafter = DRAFTERS[name](target)
        spec = SpeculativeEngine(target, drafter).generate(
            prompt, GenerationSettings(40, 4, sampling=sampling)
        )
        assert spec.run().tokens == base.tokens, name
        if isinstance(drafter, ScriptedDrafter):
            assert drafter.samplers and all(s is not None for s in drafter.samplers)


def test_plain_greedy_drafters_get_no_sampler():
    target = TARGETS["markov"]()
    drafter = oracle_drafter(target)
    SpeculativeEngine(target, drafter).generate([BOS, 2, 3], GenerationSettings(10, 2)).run()
    assert drafter.samplers and all(s is None for s in drafter.samplers)


def test_multibyte_characters_split_over_tokens():
    pieces = [b"<s>", b"</s>", b"a", b"\xc3", b"\xa9", b" "]
    script = [2, 3, 4, 5]  # a, first byte of é, second byte, space

    target = FakeRuntime(lambda context: script[(len(context) - 1) % 4], n_vocab=6, pieces=pieces)
    gen = SpeculativeEngine(target, oracle_drafter(target)).generate(
        [BOS, 2, 3, 4, 5], GenerationSettings(8, 3)
    )
    assert [token.text for token in gen] == ["a", "", "é", " ", "a", "", "é", " "]
    assert gen.text == "aé aé "
    assert target.tokenize("aé", add_special=False, parse_special=False) == [2, 3, 4]


# -- sampling ---------------------------------------------------------------------------------------

SAMPLED = dict(temperature=0.9)


def sampled_target() -> FakeRuntime:
    return FakeRuntime(random_logits(4, seed=5, scale=1.0), n_vocab=4, eog=())


def draft_rows() -> Callable:
    """The drafter's table: close to the target's in places, far in others."""
    return random_logits(4, seed=6, scale=1.0)


@pytest.mark.parametrize(
    "make_drafter",
    [
        lambda: TableDrafter(draft_rows()),
        lambda: ScriptedDrafter(lambda context, k: [2, 3, 2, 3][:k]),
        lambda: NgramDrafter(1, 3),
    ],
    ids=["q", "point", "ngram"],
)
@pytest.mark.parametrize("accept", ["rejection", "exact"])
def test_sampling_is_seeded_and_both_accepts_and_rejects(make_drafter, accept):
    sampling = SamplingSettings(accept=accept, **SAMPLED)
    target, drafter = sampled_target(), make_drafter()
    engine = SpeculativeEngine(target, drafter)
    prompt = [BOS, 2, 3, 2, 3]

    def sample(seed):
        target.reset_counts()
        gen = engine.generate(prompt, GenerationSettings(30, 3, seed=seed, sampling=sampling)).run()
        check_bookkeeping(gen, target)
        return gen

    runs = [sample(seed) for seed in range(20)]
    assert runs[0].seed == 0 and sample(0).tokens == runs[0].tokens
    assert len({tuple(gen.tokens) for gen in runs}) == 20
    accepted = sum(gen.stats.n_accepted for gen in runs)
    assert 0 < accepted < sum(gen.stats.n_drafted for gen in runs)
    if isinstance(drafter, TableDrafter):
        assert drafter.n_with_q > 0  # the drafter did hand over q
    fresh = engine.generate(prompt, GenerationSettings(3, 3, sampling=sampling))
    assert isinstance(fresh.seed, int) and fresh.seed >= 0


def test_q_shorter_than_the_draft_is_an_error():
    target = sampled_target()
    engine = SpeculativeEngine(target, TableDrafter(draft_rows(), q_shortfall=1))
    settings = GenerationSettings(20, 3, seed=1, sampling=SamplingSettings(**SAMPLED))
    with pytest.raises(RuntimeError, match="3 tokens but 2 distributions"):
        engine.generate([BOS, 2, 3], settings).run()
    # exact-match acceptance never reads q
    exact = GenerationSettings(20, 3, seed=1, sampling=SamplingSettings(accept="exact", **SAMPLED))
    assert len(engine.generate([BOS, 2, 3], exact).run().tokens) == 20


def test_q_longer_than_the_draft_is_cut_with_it():
    """A drafter's q beyond k is ignored along with its tokens."""
    target = sampled_target()
    uniform = Dist(np.ones(4), 4.0)
    drafter = ScriptedDrafter(lambda context, k: Draft([2] * (k + 2), [uniform] * (k + 2)))
    settings = GenerationSettings(20, 3, seed=4, sampling=SamplingSettings(**SAMPLED))
    gen = SpeculativeEngine(target, drafter).generate([BOS, 2], settings).run()
    assert len(gen.tokens) == 20 and max(len(call.tokens) for call in target.calls[1:]) == 4


N_SAMPLES = 2000
N_JOINT = 3  # the joint distribution of the first three tokens
Z = 4.753  # one-sided normal quantile for α = 1e-6
PROMPT = [BOS, 2, 3]
TEMPERATURE = 0.9


def exact_joint(target: FakeRuntime, prompt: list[int], temperature: float, top_k: int = 0) -> np.ndarray:
    """P(first N_JOINT tokens), written out by hand: softmax(row / T) over the top_k ids."""
    n_vocab = target.vocab.n_vocab
    joint = np.zeros((n_vocab,) * N_JOINT)
    for outcome in np.ndindex(joint.shape):
        prob, context = 1.0, list(prompt)
        for token in outcome:
            row = target.row(context).astype(np.float64) / temperature
            if top_k:
                row[np.argsort(-row)[top_k:]] = -np.inf
            weights = np.exp(row - row.max())
            prob *= weights[token] / weights.sum()
            context.append(token)
        joint[outcome] = prob
    return joint


def chi_square(counts: np.ndarray, probs: np.ndarray) -> tuple[float, float]:
    """(statistic, critical value at α = 1e-6) of a goodness-of-fit test; cells expected to hold
    fewer than 5 samples are pooled into one, and a sample where p is 0 fails outright."""
    counts, probs = counts.ravel().astype(float), probs.ravel()
    n = counts.sum()
    if counts[probs <= 0].sum() > 0:
        return math.inf, 0.0
    big = n * probs >= 5
    observed = np.append(counts[big], counts[~big].sum())
    expected = np.append(n * probs[big], n * probs[~big].sum())
    keep = expected > 0
    observed, expected = observed[keep], expected[keep]
    stat = float(((observed - expected) ** 2 / expected).sum())
    df = len(observed) - 1
    # the chi-square quantile by the Wilson-Hilferty cube approximation
    critical = df * (1 - 2 / (9 * df) + Z * math.sqrt(2 / (9 * df))) ** 3
    return stat, critical


def sample_joint(drafter, sampling: SamplingSettings) -> tuple[np.ndarray, Counter]:
    """Counts of the first N_JOINT tokens over N_SAMPLES seeds, and drafting totals. Generating one
    token more than N_JOINT lets the first step verify a 2-token draft: tokens 2 and 3 are kept
    drafts, corrections from the residual, or the bonus token after a full draft."""
    engine = SpeculativeEngine(sampled_target(), drafter)
    counts = np.zeros((4,) * N_JOINT)
    totals: Counter = Counter()
    for seed in range(N_SAMPLES):
        settings = GenerationSettings(N_JOINT + 1, 2, seed=seed, sampling=sampling)
        gen = engine.generate(PROMPT, settings).run()
        counts[tuple(gen.tokens[:N_JOINT])] += 1
        totals.update(drafted=gen.stats.n_drafted, accepted=gen.stats.n_accepted)
        totals["full"] += gen.stats.accepted_per_step[0] == 2
    return counts, totals


@pytest.mark.parametrize(
    "make_drafter, accept, top_k",
    [
        (lambda: TableDrafter(draft_rows()), "rejection", 0),
        (lambda: ScriptedDrafter(lambda context, k: [3, 2, 3][:k]), "rejection", 3),
        (lambda: TableDrafter(draft_rows()), "exact", 0),
    ],
    ids=["q", "point-top3", "exact-match"],
)
def test_sampled_output_has_the_targets_distribution(make_drafter, accept, top_k):
    """The first three tokens over N_SAMPLES fixed seeds (so the test is deterministic) against the
    joint computed from the table by hand; the sample must also be large enough to tell the target
    from a nearby distribution (the same logits at a 50% higher temperature, 0.13-0.15 away in
    total variation)."""
    sampling = SamplingSettings(temperature=TEMPERATURE, top_k=top_k, accept=accept)
    counts, totals = sample_joint(make_drafter(), sampling)
    # every branch of verification ran: drafts kept, drafts rejected, a full draft and its bonus
    assert 0 < totals["accepted"] < totals["drafted"] and totals["full"] > 0
    exact = exact_joint(sampled_target(), PROMPT, TEMPERATURE, top_k)
    assert exact.sum() == pytest.approx(1.0)
    stat, critical = chi_square(counts, exact)
    assert stat < critical, f"chi-square {stat:.1f} > {critical:.1f}: not the target's distribution"
    # the first token alone: the target's softmax after the prompt
    stat, critical = chi_square(counts.sum(axis=(1, 2)), exact.sum(axis=(1, 2)))
    assert stat < critical
    nearby = exact_joint(sampled_target(), PROMPT, TEMPERATURE * 1.5, top_k)
    stat, critical = chi_square(counts, nearby)
    assert stat > critical, f"{N_SAMPLES} samples cannot tell T={TEMPERATURE} from T={TEMPERATURE * 1.5}"


def test_a_verifier_that_skips_the_residual_fails_the_distribution_check(monkeypatch):
    """The classic mistake, resampling p instead of max(0, p - q) after a rejection, is caught."""

    def resample_p(draft, q, p, uniforms, n_vocab):
        n = 0
        while n < len(draft):
            qx = 1.0 if q is None else q[n].prob(draft[n])
            if not uniforms[n] * qx < p[n].prob(draft[n]):
                break
            n += 1
        return n, p[n].sample(float(uniforms[len(draft)]))

    monkeypatch.setattr(engine_module, "verify_rejection", resample_p)
    counts, _ = sample_joint(TableDrafter(draft_rows()), SamplingSettings(temperature=TEMPERATURE))
    stat, critical = chi_square(counts, exact_joint(sampled_target(), PROMPT, TEMPERATURE))
    assert stat > critical


# -- stopping ------------------------------------------------------------------------------------


def test_end_of_generation_token_stops_inside_an_accepted_draft():
    """EOS after the 7th output token; the oracle drafts past it, the output still ends there."""
    table = lambda context: EOS if len(context) == 10 else markov(context)  # noqa: E731
    target = FakeRuntime(table)
    prompt = [BOS, 5, 6]
    gen = SpeculativeEngine(target, oracle_drafter(target)).generate(prompt, GenerationSettings(30, 5))
    tokens = list(gen)
    assert gen.finish_reason == "stop"
    assert [t.id for t in tokens] == gen.tokens == expected_greedy(target, prompt, 30)
    assert len(gen.tokens) == 7 and EOS not in gen.tokens
    assert gen.stats.n_steps == 2 and gen.stats.accepted_per_step == [5, 5]  # the EOS was a draft
    assert gen.stats.n_generated == 7


def test_end_of_generation_as_the_first_token():
    target = FakeRuntime()  # every context is followed by EOS
    gen = (
        SpeculativeEngine(target, oracle_drafter(target)).generate([BOS, 2], GenerationSettings(10, 4)).run()
    )
    assert gen.tokens == [] and gen.text == "" and gen.finish_reason == "stop"
    assert gen.stats.n_steps == 0 and target.n_evals == 1


def test_extra_end_of_generation_ids_stop_too():
    target = FakeRuntime(periodic(SCRIPT), eog={EOS, char_id(".")})
    gen = (
        SpeculativeEngine(target, NgramDrafter(1, 3))
        .generate(prompt_of(target), GenerationSettings(40, 4))
        .run()
    )
    assert gen.finish_reason == "stop" and gen.text == " cat sat on the mat"


@pytest.mark.parametrize("k", [0, 2, 8])
def test_stop_string_ends_generation_and_is_cut(k):
    target = FakeRuntime(periodic(SCRIPT))
    prompt = target.tokenize("the cat", add_special=True, parse_special=False)
    gen = SpeculativeEngine(target, oracle_drafter(target)).generate(
        prompt, GenerationSettings(60, k, stop=("the m", "xyz"))
    )
    streamed = "".join(token.text for token in gen)
    assert gen.finish_reason == "stop"
    assert gen.text == streamed == " sat on "
    # the tokens run up to the one that completed the stop string
    assert target.text_of(gen.tokens) == " sat on the m"
    assert gen.stats.n_generated == len(gen.tokens)


def test_stop_string_never_seen_is_flushed_at_the_end():
    target = FakeRuntime(periodic(SCRIPT))
    prompt = target.tokenize("the cat", add_special=True, parse_special=False)
    gen = SpeculativeEngine(target).generate(prompt, GenerationSettings(6, 0, stop=(" on the",)))
    pieces = [token.text for token in gen]
    # a space or " o" might begin the stop string: held back until the next token shows otherwise
    assert pieces == ["", " s", "a", "t", "", ""]
    assert gen.text == " sat o" and gen.finish_reason == "length"


def test_one_stop_string_is_one_stop_string_not_its_characters():
    settings = GenerationSettings(60, 0, stop=" on the")  # type: ignore[arg-type]
    assert settings.stop == (" on the",)
    target = FakeRuntime(periodic(SCRIPT))
    prompt = target.tokenize("the cat", add_special=True, parse_special=False)
    # split into characters, " " would stop it at once
    assert SpeculativeEngine(target).generate(prompt, settings).run().text == " sat"
    with pytest.raises(SettingsError, match="stop must be a string or a sequence of strings"):
        GenerationSettings(6, 0, stop=(" on", 7))  # type: ignore[arg-type]


@pytest.mark.parametrize("drafter_name", ["oracle", "wrong", "ngram", "random1"])
def test_full_context_finishes_with_length(drafter_name):
    target = FakeRuntime(periodic(SCRIPT), n_ctx=40)
    prompt = prompt_of(target)
    base = target_only(FakeRuntime(periodic(SCRIPT), n_ctx=40), prompt, max_tokens=100)
    gen = SpeculativeEngine(target, DRAFTERS[drafter_name](target)).generate(
        prompt, GenerationSettings(100, 8)
    )
    gen.run()
    assert gen.finish_reason == base.finish_reason == "length"
    assert len(prompt) + len(gen.tokens) == 40
    assert gen.tokens == base.tokens
    assert max(call.start + len(call.tokens) for call in target.calls) <= 40  # never past n_ctx


def test_prompt_that_leaves_one_token_of_room():
    target = FakeRuntime(markov, n_ctx=16)
    gen = SpeculativeEngine(target, oracle_drafter(target)).generate(
        [BOS] + [5] * 14, GenerationSettings(9, 4)
    )
    gen.run()
    assert len(gen.tokens) == 1 and gen.finish_reason == "length" and gen.stats.n_steps == 0


def test_bad_prompts_and_settings():
    engine = SpeculativeEngine(FakeRuntime(markov, n_ctx=16))
    with pytest.raises(PromptError, match="empty"):
        engine.generate([])
    with pytest.raises(PromptError, match="context holds 16"):
        engine.generate([5] * 16)
    for kwargs in (dict(max_tokens=0), dict(draft_max=-1), dict(draft_max=10**6), dict(seed=-1)):
        with pytest.raises(SettingsError):
            GenerationSettings(**kwargs)


def test_cancel_stops_before_the_next_step():
    """Tokens the current step already accepted are still emitted; no further pass runs."""
    target = TARGETS["markov"]()
    gen = SpeculativeEngine(target, oracle_drafter(target)).generate([BOS, 5, 6], GenerationSettings(50, 4))
    seen = []
    for token in gen:
        seen.append(token.id)
        if len(seen) == 3:  # inside the first step's five tokens
            gen.cancel()
    assert gen.finish_reason == "cancelled" and gen.cancelled
    assert seen == gen.tokens == expected_greedy(target, [BOS, 5, 6], 6)
    assert gen.stats.n_steps == 1 and target.n_evals == 2


def test_cancel_before_iterating_and_after_finishing():
    target = TARGETS["markov"]()
    engine = SpeculativeEngine(target, oracle_drafter(target))
    early = engine.generate([BOS, 5, 6], GenerationSettings(50, 4))
    early.cancel()
    early.run()
    # the prompt pass has already produced the first token when the flag is first checked
    assert early.finish_reason == "cancelled" and len(early.tokens) == 1 and early.stats.n_steps == 0
    done = engine.generate([BOS, 5, 6], GenerationSettings(5, 4)).run()
    done.cancel()
    assert done.finish_reason == "length" and len(done.tokens) == 5


def test_a_generation_runs_once():
    gen = SpeculativeEngine(TARGETS["markov"]()).generate([BOS, 2, 3], GenerationSettings(3))
    gen.run()
    with pytest.raises(RuntimeError, match="only once"):
        iter(gen)


# -- prompt caching --------------------------------------------------------------------------------


def test_cache_prompt_reuses_what_the_runtime_holds():
    target = TARGETS["random"]()
    drafter = oracle_drafter(target)
    engine = SpeculativeEngine(target, drafter)
    prompt = prompt_of(target)
    first = engine.generate(prompt, GenerationSettings(12, 3)).run()
    assert first.stats.n_prompt_cached == 0
    # a chat's next turn: the conversation so far plus new tokens
    turn = [*prompt, *first.tokens, *target.tokenize(" and", add_special=False, parse_special=False)]
    target.reset_counts()
    second = engine.generate(turn, GenerationSettings(12, 3, cache_prompt=True)).run()
    held = len(prompt) + len(first.tokens) - 1  # all but the newest token was in the cache
    assert second.stats.n_prompt_cached == held
    assert target.calls[0].start == held and target.calls[0].tokens == tuple(turn[held:])
    assert drafter.begun[-1] == tuple(turn)
    fresh_rt = TARGETS["random"]()
    fresh = SpeculativeEngine(fresh_rt).generate(turn, GenerationSettings(12, 0)).run()
    assert second.tokens == fresh.tokens
    assert fresh.stats.n_prompt_cached == 0 and fresh_rt.calls[0].tokens == tuple(turn)


@pytest.mark.parametrize(
    "change, cached",
    [
        (lambda prompt: prompt, -1),  # the same prompt: only its last token is evaluated again
        (lambda prompt: prompt[:5] + [char_id("x")] + prompt[6:], 5),  # differs at position 5
        (lambda prompt: prompt[:4], 3),  # shorter
    ],
    ids=["same", "diverges", "shorter"],
)
def test_cache_prompt_keeps_the_longest_common_prefix(change, cached):
    target = TARGETS["markov"]()
    engine = SpeculativeEngine(target)
    prompt = prompt_of(target)
    engine.generate(prompt, GenerationSettings(10, 0)).run()
    new = change(prompt)
    target.reset_counts()
    gen = engine.generate(new, GenerationSettings(10, 0, cache_prompt=True)).run()
    keep = cached % len(prompt)
    assert gen.stats.n_prompt_cached == keep and target.calls[0].start == keep
    assert gen.tokens == expected_greedy(target, new, 10)


def test_no_reuse_without_cache_prompt_or_tracked_tokens():
    for target, cache_prompt in (
        (TARGETS["markov"](), False),
        (FakeRuntime(markov, track_tokens=False), True),
    ):
        engine = SpeculativeEngine(target)
        prompt = prompt_of(target)
        engine.generate(prompt, GenerationSettings(5, 0)).run()
        target.reset_counts()
        gen = engine.generate(prompt, GenerationSettings(5, 0, cache_prompt=cache_prompt)).run()
        assert gen.stats.n_prompt_cached == 0
        assert target.calls[0].start == 0 and target.calls[0].tokens == tuple(prompt)


def test_forget_empties_both_caches():
    target = TARGETS["markov"]()
    drafter = oracle_drafter(target)
    engine = SpeculativeEngine(target, drafter)
    prompt = prompt_of(target)
    engine.generate(prompt, GenerationSettings(5, 2)).run()
    engine.forget()
    assert target.n_past == 0 and drafter.n_forgotten == 1
    gen = engine.generate(prompt, GenerationSettings(5, 2, cache_prompt=True)).run()
    assert gen.stats.n_prompt_cached == 0


# -- the fake itself ----------------------------------------------------------------------------------


def test_fake_runtime_checks_what_the_engine_asks():
    target = FakeRuntime(markov, n_ctx=8, overrides={(BOS, 2): 7})
    assert int(target.eval([BOS, 2])[0].argmax()) == 7  # the override wins
    rows = target.eval([3, 4], logits="all")
    assert rows.shape == (2, target.vocab.n_vocab) and not rows.flags.writeable
    assert [int(r.argmax()) for r in rows] == [markov((BOS, 2, 3)), markov((BOS, 2, 3, 4))]
    assert target.eval([5], logits="none").shape == (0, target.vocab.n_vocab)
    assert target.n_past == 5 and target.n_evals == 3 and target.n_rows == 3 and target.n_evaluated == 5
    with pytest.raises(PromptError):
        target.eval([1, 2, 3, 4])
    with pytest.raises(ValueError):
        target.eval([])
    with pytest.raises(ValueError):
        target.eval([target.vocab.n_vocab])
    target.truncate(2)
    assert target.tokens == (BOS, 2)
    assert target.tokenize("ab c", add_special=True, parse_special=False) == [BOS, 2, 3, char_id(" "), 4]
    assert target.token_bytes(EOS) == b"" and target.token_text(EOS) == b"</s>"
    assert target.metadata("general.name") is None and target.chat_template() is None
    with pytest.raises(KeyError):
        FakeRuntime({(BOS,): 3}).eval([BOS, 3], logits="all")
