"""The goodput controller, the controlled drafter, confidence stops and overlapped drafting."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from edgespec.control import (
    MATCH_BUCKETS,
    NGRAM_PRIOR,
    Acceptance,
    ControlledDrafter,
    GoodputController,
    best_k,
    expected_tokens,
    match_bucket,
)
from edgespec.drafting import ModelDrafter, NgramDrafter
from edgespec.engine import GenerationSettings, SpeculativeEngine
from edgespec.runtimes.llama_cpp import LlamaCppRuntime

from ..conftest import TINY_SETTINGS

T1 = 0.030  # seconds per target step
LINEAR = [T1 * n for n in range(1, 18)]  # verifying n tokens costs n steps: speculation cannot pay
FREE = [T1] * 17  # verifying n tokens costs one step
CPU_LIKE = [T1 * r for r in (1.0, 1.52, 2.04, 3.16, 3.52, 4.1, 4.8, 5.53, 5.96)]  # the dev VM's curve


def test_expected_tokens_and_best_k():
    assert expected_tokens([0.5, 0.5], 0) == 1.0
    assert expected_tokens([0.5, 0.5], 2) == pytest.approx(1.75)
    # free verification, certain acceptance: the longest draft
    assert best_k([1.0] * 16, FREE) == (16, pytest.approx(17 / T1))
    # linear cost: even certain acceptance only ties, so k = 0 (the first best) wins
    assert best_k([1.0] * 16, LINEAR)[0] == 0


@pytest.mark.parametrize("alpha", [0.5, 0.9, 0.99, 1.0])
def test_controller_picks_plain_decoding_when_verification_is_linear_in_k(alpha):
    controller = GoodputController(LINEAR, t_draft=0.0, k_max=16, ngram_prior=[alpha] * len(MATCH_BUCKETS))
    controller.model = Acceptance(16, [alpha])
    for match in (1, 4, 20, 64):
        plan = controller.plan(16, ngram_available=16, ngram_match=match, model=True)
        assert (plan.source, plan.k) == (None, 0)


def test_controller_picks_long_drafts_when_they_are_free_and_accepted():
    controller = GoodputController(FREE, t_draft=0.0, k_max=16, ngram_prior=[0.99] * len(MATCH_BUCKETS))
    plan = controller.plan(16, ngram_available=16, ngram_match=30)
    assert (plan.source, plan.k) == ("ngram", 16)
    # capped by what the n-gram drafter has and by the engine's k
    assert controller.plan(16, ngram_available=5, ngram_match=30).k == 5
    assert controller.plan(3, ngram_available=16, ngram_match=30).k == 3


def test_controller_weighs_the_model_drafters_cost():
    cheap = GoodputController(CPU_LIKE, t_draft=0.02 * T1, k_max=8, model_prior=[0.9])
    assert cheap.plan(8, model=True).source == "model"
    dear = GoodputController(CPU_LIKE, t_draft=0.6 * T1, k_max=8, model_prior=[0.9])
    assert dear.plan(8, model=True).source is None
    # a long n-gram match beats a mediocre model drafter when both are on offer
    both = GoodputController(CPU_LIKE, t_draft=0.3 * T1, k_max=8, model_prior=[0.5])
    assert both.plan(8, ngram_available=8, ngram_match=20, model=True).source == "ngram"


def test_controller_learns_from_rejections_and_returns_when_drafts_pay_again():
    controller = GoodputController(CPU_LIKE, t_draft=0.0, k_max=8)
    bucket = match_bucket(20)
    plan = controller.plan(8, ngram_available=8, ngram_match=20)
    assert plan.source == "ngram" and plan.k >= 2
    for _ in range(10):  # the text stopped copying: every draft is rejected
        controller.observe(plan, plan.k, 0)
    assert controller.plan(8, ngram_available=8, ngram_match=20).source is None
    assert controller.ngram[bucket].alphas()[0] < 0.3
    # the other buckets were not affected
    assert controller.ngram[bucket - 1].alphas()[0] == pytest.approx(NGRAM_PRIOR[bucket - 1])
    controller.reset()
    assert controller.plan(8, ngram_available=8, ngram_match=20).source == "ngram"


def test_acceptance_counts_trials_up_to_the_first_rejection():
    acc = Acceptance(4, [0.5], prior_weight=1e-9, decay=1.0)
    acc.observe(4, 2)  # positions 1, 2 accepted, 3 rejected, 4 never tried
    acc.observe(4, 4)
    alphas = acc.alphas()
    assert alphas[:3] == pytest.approx([1.0, 1.0, 0.5])
    assert alphas[3] == pytest.approx(1.0)
    with pytest.raises(ValueError):
        acc.observe(2, 3)


def test_match_buckets():
    assert [match_bucket(n) for n in (1, 2, 3, 4, 5, 8, 9, 16, 17, 64)] == [0, 1, 2, 2, 3, 3, 4, 4, 5, 5]


def test_ngram_drafter_reports_how_far_the_match_reaches():
    d = NgramDrafter(n_min=1, n_max=2)
    context = [1, 2, 3, 4, 5, 9, 9, 1, 2, 3, 4]
    assert d.propose(context, 3).tokens == [5, 9, 9]
    assert d.match_length == 4  # 1 2 3 4 matches, beyond n_max
    assert d.propose([7, 8], 3).tokens == [] and d.match_length == 0


def target_only(target, prompt, n):
    return SpeculativeEngine(target).generate(prompt, GenerationSettings(max_tokens=n, draft_max=0)).run()


PROMPTS = ["the cat sat on the", "a b c a b c a b", "once upon a time there was"]


def test_controlled_drafter_output_equals_target_only(tiny_runtimes):
    target, draft_rt = tiny_runtimes
    # costs where both sources can pay, so the controller really switches between them
    controller = GoodputController([T1, T1 * 1.1, T1 * 1.2, T1 * 1.3, T1 * 1.4], t_draft=0.05 * T1, k_max=4)
    drafter = ControlledDrafter(
        controller, ModelDrafter(draft_rt, max_id=target.vocab.n_vocab), NgramDrafter(1, 8)
    )
    engine = SpeculativeEngine(target, drafter)
    for text in PROMPTS:
        prompt = target.tokenize(text, add_special=True, parse_special=False)
        base = target_only(target, prompt, 60)
        spec = engine.generate(prompt, GenerationSettings(max_tokens=60, draft_max=4)).run()
        assert spec.tokens == base.tokens
    used = drafter.summary()
    assert used["model"].steps > 0 and used["model"].drafted > 0
    assert sum(s.steps for s in used.values()) > 0


def test_controlled_drafter_with_linear_costs_never_drafts(tiny_runtimes):
    target, draft_rt = tiny_runtimes
    drafter = ControlledDrafter(
        GoodputController(LINEAR, t_draft=0.5 * T1, k_max=8),
        ModelDrafter(draft_rt, max_id=target.vocab.n_vocab),
        NgramDrafter(1, 8),
    )
    prompt = target.tokenize("a b c a b c a b", add_special=True, parse_special=False)
    gen = (
        SpeculativeEngine(target, drafter)
        .generate(prompt, GenerationSettings(max_tokens=40, draft_max=8))
        .run()
    )
    assert gen.tokens == target_only(target, prompt, 40).tokens
    # (the last step has no room to draft, so the controller is not asked)
    assert gen.stats.n_drafted == 0 and drafter.summary()["none"].steps == gen.stats.n_steps - 1


def test_confidence_stop_shortens_drafts_and_keeps_the_output(tiny_runtimes):
    target, draft_rt = tiny_runtimes
    prompt = target.tokenize("the cat sat on the", add_special=True, parse_special=False)
    base = target_only(target, prompt, 50)
    free = ModelDrafter(draft_rt, max_id=target.vocab.n_vocab)
    runs = {}
    for min_prob in (0.0, 0.5, 0.999):
        engine = SpeculativeEngine(target, free.variant(min_prob=min_prob))
        gen = engine.generate(prompt, GenerationSettings(max_tokens=50, draft_max=6)).run()
        assert gen.tokens == base.tokens
        runs[min_prob] = gen.stats.n_drafted
    assert runs[0.0] > runs[0.5] >= runs[0.999]
    with pytest.raises(ValueError):
        ModelDrafter(draft_rt, min_prob=1.0)


def test_model_drafter_confidence_matches_softmax(tiny_runtimes):
    _, draft_rt = tiny_runtimes
    drafter = ModelDrafter(draft_rt, min_prob=0.25)
    row = np.log(np.array([0.2, 0.5, 0.3], dtype=np.float32))
    assert drafter._unsure(row, 0) and not drafter._unsure(row, 1) and not drafter._unsure(row, 2)


@pytest.mark.parametrize("k", [1, 3, 6])
def test_overlapped_drafting_gives_identical_output(tiny_runtimes, k):
    target, draft_rt = tiny_runtimes
    drafter = ModelDrafter(draft_rt, max_id=target.vocab.n_vocab, overlap=True)
    engine = SpeculativeEngine(target, drafter)
    try:
        for text in PROMPTS:
            prompt = target.tokenize(text, add_special=True, parse_special=False)
            base = target_only(target, prompt, 60)
            spec = engine.generate(prompt, GenerationSettings(max_tokens=60, draft_max=k)).run()
            assert spec.tokens == base.tokens
    finally:
        drafter.close()


def test_overlapped_drafting_reuses_the_continuation_when_all_is_accepted(tiny_pair):
    """Self-drafting accepts everything, so every step after the first starts with the drafts
    made in the background during the previous verification, and they run on another thread."""
    target = LlamaCppRuntime(tiny_pair[0], TINY_SETTINGS)
    twin = LlamaCppRuntime(tiny_pair[0], TINY_SETTINGS)
    drafter = ModelDrafter(twin, overlap=True)
    threads: set[str] = set()
    original = drafter._draft

    def spy(*args, **kwargs):
        threads.add(threading.current_thread().name)
        return original(*args, **kwargs)

    drafter._draft = spy  # type: ignore[method-assign]
    try:
        prompt = target.tokenize("the cat sat", add_special=True, parse_special=False)
        base = target_only(target, prompt, 41)
        gen = SpeculativeEngine(target, drafter).generate(
            prompt, GenerationSettings(max_tokens=41, draft_max=4)
        )
        gen.run()
        assert gen.tokens == base.tokens
        assert gen.stats.accepted_per_step == [4] * 8
        # steps 2..8 took their 4 drafts from the continuation (minus the one the target produced)
        assert drafter.n_ahead_used >= 7 * 3
        assert any(name.startswith("edgespec-draft") for name in threads)
    finally:
        drafter.close()
        twin.close()
        target.close()


def test_sampled_drafts_do_not_run_ahead(tiny_runtimes):
    from edgespec.sampling import SamplingSettings

    target, draft_rt = tiny_runtimes
    drafter = ModelDrafter(draft_rt, max_id=target.vocab.n_vocab, overlap=True)
    prompt = target.tokenize("the cat sat on the", add_special=True, parse_special=False)
    settings = GenerationSettings(
        max_tokens=30, draft_max=4, seed=3, sampling=SamplingSettings(temperature=0.8)
    )
    a = SpeculativeEngine(target, drafter).generate(prompt, settings).run()
    b = (
        SpeculativeEngine(target, ModelDrafter(draft_rt, max_id=target.vocab.n_vocab))
        .generate(prompt, settings)
        .run()
    )
    assert a.tokens == b.tokens  # same seed, same draws: nothing ran in the background
    assert drafter.n_ahead_used == 0
    drafter.close()


def test_switching_costs_charge_the_step_after_a_batch(tiny_runtimes, monkeypatch):
    """With switching=True, T(n) is the n-token pass plus the excess of the single step after it."""
    import edgespec.costs as costs_module

    target, _ = tiny_runtimes
    context = target.tokenize("the cat sat on the mat " * 8, add_special=True, parse_special=False)
    calls: list[int] = []
    real_eval = target.eval

    def eval_spy(tokens, logits="last"):
        calls.append(len(tokens))
        return real_eval(tokens, logits)

    # A fake clock: a pass over n tokens takes n ms, and a single step right after a batch 0.5 ms more.
    now = [0.0]
    last = [1]

    def fake_eval(tokens, logits="last"):
        n = len(tokens)
        now[0] += n * 1e-3 + (0.5e-3 if n == 1 and last[0] > 1 and logits == "all" else 0.0)
        last[0] = n
        return eval_spy(tokens, logits)

    monkeypatch.setattr(costs_module.time, "perf_counter", lambda: now[0])
    monkeypatch.setattr(target, "eval", fake_eval)
    plain = costs_module.measure(target, None, context, k_max=4, repeats=3)
    switching = costs_module.measure(target, None, context, k_max=4, repeats=3, switching=True)
    assert plain.t_target[0] == pytest.approx(1e-3, abs=1e-6)
    assert switching.t_target[0] == pytest.approx(1e-3, abs=1e-6)  # a run of single steps
    for n in range(2, 6):
        assert switching.t_target[n - 1] == pytest.approx(n * 1e-3 + 0.5e-3, abs=1e-6)
    assert calls  # the real runtime still did the work
