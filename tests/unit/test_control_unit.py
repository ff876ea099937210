"""The controlled drafter inside the engine, on a scripted runtime (tests/fakes.py): which source
it picks from made-up costs, what it learns from verification, and its per-source summary."""

from __future__ import annotations

import numpy as np
import pytest

from edgespec.control import (
    ControlledDrafter,
    GoodputController,
    Plan,
    SourceStats,
    expected_tokens,
    match_bucket,
)
from edgespec.drafting import ModelDrafter, NgramDrafter
from edgespec.engine import Generation, GenerationSettings, SpeculativeEngine
from edgespec.sampling import SamplingSettings

from ..fakes import BOS, FakeRuntime, char_id, random_logits

T1 = 0.020  # seconds per target step
CHEAP = [T1 * (1 + 0.05 * n) for n in range(9)]  # a pass over n + 1 tokens costs 5% more per token
LINEAR = [T1 * n for n in range(1, 10)]  # a pass over n tokens costs n steps: drafting cannot pay
CPU_LIKE = [T1 * r for r in (1.0, 1.52, 2.04, 3.16, 3.52, 4.1, 4.8, 5.53, 5.96)]

SCRIPT = "the cat sat on the mat. "


def periodic(context: tuple[int, ...]) -> int:
    """The next token is SCRIPT's character at the context's position (after BOS), cyclically."""
    return char_id(SCRIPT[(len(context) - 1) % len(SCRIPT)])


def markov(context: tuple[int, ...]) -> int:
    return 2 + (3 * context[-1] + 7 * context[-2]) % 40


def asks(gen: Generation) -> int:
    """How many steps could draft (k > 0), so that the drafter was asked: a step after t tokens
    may draft min(draft_max, max_tokens - t - 1); for generations that end on max_tokens."""
    settings, out, n = gen.settings, 1, 0
    for accepted in gen.stats.accepted_per_step:
        n += min(settings.draft_max, settings.max_tokens - out - 1) > 0
        out += accepted + 1
    return n


def recording(controller: GoodputController) -> list[Plan]:
    """Record every plan the controller makes."""
    plans: list[Plan] = []
    plan = controller.plan

    def spy(*args, **kwargs) -> Plan:
        plans.append(plan(*args, **kwargs))
        return plans[-1]

    controller.plan = spy  # type: ignore[method-assign]
    return plans


def run(
    target: FakeRuntime, drafter: ControlledDrafter, prompt: list[int], n: int, k: int, **kw
) -> Generation:
    return SpeculativeEngine(target, drafter).generate(prompt, GenerationSettings(n, k, **kw)).run()


def check_summary(gen: Generation, summary: dict[str, SourceStats]) -> None:
    """The per-source statistics add up to the engine's."""
    assert set(summary) == {"model", "ngram", "none"}
    assert sum(s.steps for s in summary.values()) == asks(gen)
    assert sum(s.drafted for s in summary.values()) == gen.stats.n_drafted
    assert sum(s.accepted for s in summary.values()) == gen.stats.n_accepted
    assert summary["none"].drafted == summary["none"].accepted == 0


def test_ngram_drafts_while_the_answer_copies_the_prompt():
    target = FakeRuntime(periodic)
    prompt = target.tokenize(SCRIPT + "the", add_special=True, parse_special=False)
    drafter = ControlledDrafter(GoodputController(CHEAP, t_draft=0.0, k_max=8), ngram=NgramDrafter(1, 4))
    plans = recording(drafter.controller)
    gen = run(target, drafter, prompt, 60, 8)
    assert gen.tokens == target.greedy(prompt, 60)
    summary = drafter.summary()
    check_summary(gen, summary)
    assert summary["ngram"].steps == len(plans) and summary["model"].steps == 0
    # the copy is right but where " the" recurs in the script with another continuation
    assert summary["ngram"].drafted * 0.8 < summary["ngram"].accepted < summary["ngram"].drafted
    assert gen.stats.tokens_per_step > 4
    assert {plan.source for plan in plans} == {"ngram"} and max(plan.k for plan in plans) == 8
    assert drafter.runtime is None


def test_linear_costs_never_draft():
    target = FakeRuntime(periodic)
    prompt = target.tokenize(SCRIPT + "the", add_special=True, parse_special=False)
    drafter = ControlledDrafter(GoodputController(LINEAR, t_draft=0.0, k_max=8), ngram=NgramDrafter(1, 4))
    gen = run(target, drafter, prompt, 40, 8)
    assert gen.tokens == target.greedy(prompt, 40)
    assert gen.stats.n_drafted == 0 and gen.stats.n_steps == 39
    assert all(len(call.tokens) == 1 for call in target.calls[1:])
    summary = drafter.summary()
    check_summary(gen, summary)
    assert summary["none"].steps == 38  # the last step has no room to draft: no ask


def test_engine_k_caps_the_controllers_choice():
    target = FakeRuntime(periodic)
    prompt = target.tokenize(SCRIPT + "the", add_special=True, parse_special=False)
    drafter = ControlledDrafter(GoodputController(CHEAP, t_draft=0.0, k_max=8), ngram=NgramDrafter(1, 4))
    gen = run(target, drafter, prompt, 40, 2)
    assert gen.tokens == target.greedy(prompt, 40)
    assert max(gen.stats.accepted_per_step) == 2 and max(len(c.tokens) for c in target.calls[1:]) == 3


def test_failing_ngram_guesses_turn_drafting_off():
    """A random answer over 6 tokens: 1-gram matches are everywhere, their continuations mostly
    wrong. The controller tries them, learns, and ends up decoding plainly."""
    target = FakeRuntime(random_logits(6, seed=3), n_vocab=6, eog=())
    prompt = [BOS, 2, 3, 4, 5, 2, 3]
    controller = GoodputController(CPU_LIKE, t_draft=0.0, k_max=8)
    drafter = ControlledDrafter(controller, ngram=NgramDrafter(1, 4))
    plans = recording(controller)
    gen = run(target, drafter, prompt, 80, 8)
    assert gen.tokens == target.greedy(prompt, 80)
    summary = drafter.summary()
    check_summary(gen, summary)
    assert summary["ngram"].steps > 0 and summary["none"].steps > 0
    assert summary["ngram"].accepted < summary["ngram"].drafted / 2
    # what it learned lowered the estimates of the buckets it tried, and the last plans are plain
    tried = {plan.bucket for plan in plans if plan.source == "ngram"}
    assert all(controller.ngram[b].alphas()[0] < controller.ngram[b].prior[0] for b in tried)
    assert all(plan.source is None for plan in plans[-10:])


def test_an_identical_draft_model_is_chosen_and_always_accepted():
    target, draft_rt = FakeRuntime(markov), FakeRuntime(markov)
    model = ModelDrafter(draft_rt)
    controller = GoodputController(CPU_LIKE, t_draft=0.02 * T1, k_max=8, model_prior=[0.9])
    drafter = ControlledDrafter(controller, model=model)
    prompt = [BOS, 5, 6]
    gen = run(target, drafter, prompt, 50, 8)
    assert gen.tokens == target.greedy(prompt, 50)
    summary = drafter.summary()
    check_summary(gen, summary)
    assert summary["model"].steps == asks(gen) and summary["model"].accepted == summary["model"].drafted > 0
    assert drafter.runtime is draft_rt
    # acceptance learned upwards from the prior
    assert controller.model.alphas()[0] > 0.9
    drafter.forget()
    assert draft_rt.n_past == 0


def test_a_wrong_draft_model_is_dropped_for_the_ngram_copy():
    """The model drafts another script, so it is rejected and its estimate falls; once the answer
    starts repeating itself (after one period of the script) the n-gram copy takes over."""
    target = FakeRuntime(periodic)
    draft_rt = FakeRuntime(markov)
    prompt = target.tokenize("zzzz", add_special=True, parse_special=False)
    controller = GoodputController(CPU_LIKE, t_draft=0.02 * T1, k_max=8, model_prior=[0.9])
    drafter = ControlledDrafter(controller, model=ModelDrafter(draft_rt), ngram=NgramDrafter(1, 4))
    plans = recording(controller)
    gen = run(target, drafter, prompt, 60, 8)
    assert gen.tokens == target.greedy(prompt, 60)
    summary = drafter.summary()
    check_summary(gen, summary)
    assert summary["model"].steps > 0 and summary["model"].accepted < summary["model"].drafted
    assert summary["ngram"].accepted > 0
    assert plans[-1].source == "ngram"
    assert controller.model.alphas()[0] < 0.9


def test_summary_covers_the_last_generation_only():
    target = FakeRuntime(periodic)
    prompt = target.tokenize(SCRIPT + "the", add_special=True, parse_special=False)
    drafter = ControlledDrafter(GoodputController(CHEAP, t_draft=0.0, k_max=8), ngram=NgramDrafter(1, 4))
    engine = SpeculativeEngine(target, drafter)
    engine.generate(prompt, GenerationSettings(60, 8)).run()
    first = drafter.summary()
    assert first["ngram"].steps > 0
    second = engine.generate(prompt[:5], GenerationSettings(20, 3)).run()
    check_summary(second, drafter.summary())  # would count both generations without the reset
    assert first["ngram"].steps > 0  # an earlier summary is not cleared by the next generation


def test_no_sources_means_plain_decoding():
    target = FakeRuntime(markov)
    drafter = ControlledDrafter(GoodputController(CHEAP, t_draft=0.0, k_max=8))
    gen = run(target, drafter, [BOS, 5, 6], 20, 4)
    assert gen.tokens == target.greedy([BOS, 5, 6], 20) and gen.stats.n_drafted == 0
    assert drafter.summary()["none"].steps == asks(gen) == 18


@pytest.mark.parametrize("accept", ["rejection", "exact"])
def test_sampled_generation_with_both_sources_is_seeded(accept):
    """Model drafts carry q, n-gram drafts are point proposals; both verify, and a seed repeats
    the output."""
    n_vocab = 8

    def make():
        target = FakeRuntime(random_logits(n_vocab, seed=7, scale=2.0), n_vocab=n_vocab, eog=())
        draft_rt = FakeRuntime(random_logits(n_vocab, seed=7, scale=1.5), n_vocab=n_vocab, eog=())
        controller = GoodputController(CHEAP, t_draft=0.01 * T1, k_max=4)
        return target, ControlledDrafter(controller, model=ModelDrafter(draft_rt), ngram=NgramDrafter(1, 3))

    sampling = SamplingSettings(temperature=0.7, accept=accept)
    prompt = [BOS, 2, 3, 4, 2, 3, 4, 2, 3]
    outputs = []
    for seed in (11, 11, 12):
        target, drafter = make()
        gen = run(target, drafter, prompt, 40, 4, seed=seed, sampling=sampling)
        check_summary(gen, drafter.summary())
        outputs.append(gen.tokens)
    assert outputs[0] == outputs[1] != outputs[2]
    assert 0 < gen.stats.n_accepted < gen.stats.n_drafted
    assert np.all(np.array(outputs) < n_vocab)


def test_beside_other_sequences_a_draft_pays_for_the_pass_it_adds():
    # T(n) of a compute-bound 2-core CPU: a row costs almost as much in a batch as alone
    t = [0.080, 0.130, 0.170, 0.210, 0.250, 0.290, 0.330, 0.370, 0.410]
    cpu = GoodputController(t, 0.0, k_max=8)
    alphas = cpu.ngram[match_bucket(20)].alphas()  # a long n-gram match: a near-certain copy
    alone = cpu.plan(8, ngram_available=8, ngram_match=20)
    assert alone.source == "ngram" and alone.k >= 4
    assert alone.goodput == pytest.approx(expected_tokens(alphas, alone.k) / t[alone.k])
    # 3 others in the pass: 4 tokens for T(4) plainly, against 3 + E(k) for T(4) + T(k) with k
    # drafts (a pass of their own); no k pays here
    assert all((3 + expected_tokens(alphas, k)) / (t[3] + t[k - 1]) < 4 / t[3] for k in range(1, 9))
    assert cpu.plan(8, ngram_available=8, ngram_match=20, others=3) == Plan(None, 0, pytest.approx(4 / t[3]))
    # where rows are nearly free (a memory-bound machine), drafting beside others still pays
    flat = GoodputController([0.100 + 0.001 * n for n in range(9)], 0.0, k_max=8)
    plan = flat.plan(8, ngram_available=8, ngram_match=20, others=1)
    tokens = 1 + expected_tokens(flat.ngram[match_bucket(20)].alphas(), plan.k)
    assert plan.source == "ngram" and plan.k >= 4
    assert plan.goodput == pytest.approx(tokens / (0.101 + 0.100 + 0.001 * (plan.k - 1)))
    # the pass is extrapolated past the measured lengths, as for one sequence
    assert flat.plan(1, others=12).goodput == pytest.approx(13 / (0.108 + 4 * 0.001))
