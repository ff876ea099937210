"""Long-copy drafting: the n-gram drafter follows the stretch being copied and drafts up to 64
tokens, costs are measured up to the longest draft, and the controller drafts long copies only
where they are cheap and accepted."""

from __future__ import annotations

import numpy as np
import pytest

from edgespec.control import MATCH_BUCKETS, ControlledDrafter, GoodputController
from edgespec.costs import MEASURED_SIZES, measure, measured_sizes
from edgespec.drafting import MATCH_LENGTH_MAX, NgramDrafter
from edgespec.engine import GenerationSettings, SpeculativeEngine

T1 = 0.030
#: llama.cpp's own kernels on a 2-core CPU: a pass over n tokens costs about 1 + n / 4 steps
BATCHED = [T1 * (1 + (n - 1) / 4) for n in range(1, 66)]
#: verifying n tokens costs n steps: nothing can pay
LINEAR = [T1 * n for n in range(1, 66)]


def test_ngram_copies_from_the_occurrence_whose_match_reaches_furthest_back():
    # "a b c d X" then "q r c d Y" ; the context ends with "a b c d": the 2-gram "c d" occurs twice,
    # the later occurrence is followed by Y, but the earlier one matches 4 tokens back: copy X.
    early = [1, 2, 3, 4, 50, 51, 52]
    late = [8, 9, 3, 4, 60, 61, 62]
    context = early + late + [1, 2, 3, 4]
    drafter = NgramDrafter(n_min=1, n_max=2)
    drafter.begin(context)
    assert drafter.propose(context, 3).tokens == [50, 51, 52]
    assert drafter.match_length == 4


def test_ngram_ties_go_to_the_latest_occurrence():
    context = [7, 3, 4, 50, 7, 3, 4, 60, 7, 3, 4]
    drafter = NgramDrafter(n_min=1, n_max=3)
    drafter.begin(context)
    assert drafter.propose(context, 1).tokens == [60]


def test_ngram_drafts_up_to_64_tokens_of_a_long_copy():
    rng = np.random.default_rng(0)
    code = rng.integers(100, 5000, size=200).tolist()
    # the answer restates the code: after its first 20 tokens the drafter proposes the next 64
    context = code + [1, 2] + code[:20]
    drafter = NgramDrafter(n_min=1, n_max=8)
    drafter.begin(context)
    assert drafter.propose(context, 64).tokens == code[20:84]
    assert drafter.match_length == 20
    # the match length is measured up to MATCH_LENGTH_MAX
    longer = code + [1, 2] + code[:100]
    drafter.begin(longer)
    assert drafter.propose(longer, 64).tokens == code[100:164]
    assert drafter.match_length == MATCH_LENGTH_MAX


def test_measured_sizes_reach_the_longest_draft():
    assert measured_sizes(65) == list(MEASURED_SIZES)
    assert measured_sizes(17) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 17]
    assert measured_sizes(11) == [1, 2, 3, 4, 5, 6, 7, 8, 9, 11]


def test_measure_costs_every_draft_length_up_to_64(tiny_runtimes):
    target, _ = tiny_runtimes
    context = list(range(10, 110))
    costs = measure(target, None, context, k_max=64, repeats=1)
    assert len(costs.t_target) == 65 and costs.k_max == 64
    assert all(t > 0 for t in costs.t_target)
    assert target.n_past == 0


def _observe(controller: GoodputController, match: int, k: int, accepted: int, times: int) -> None:
    for _ in range(times):
        plan = controller.plan(k, ngram_available=k, ngram_match=match)
        if plan.source == "ngram":
            controller.observe(plan, plan.k, min(accepted, plan.k))


def test_controller_drafts_long_copies_when_batches_are_cheap_and_accepted():
    controller = GoodputController(BATCHED, t_draft=0.0, k_max=64)
    first = controller.plan(64, ngram_available=64, ngram_match=MATCH_LENGTH_MAX)
    assert first.source == "ngram" and first.k >= 8
    # every long copy accepted whole: the controller drafts longer
    _observe(controller, MATCH_LENGTH_MAX, 64, 64, 30)
    plan = controller.plan(64, ngram_available=64, ngram_match=MATCH_LENGTH_MAX)
    assert plan.source == "ngram" and plan.k > first.k and plan.k >= 16


def test_controller_drafts_64_when_verification_is_free_and_copies_are_accepted():
    controller = GoodputController([T1] * 65, t_draft=0.0, k_max=64)
    _observe(controller, MATCH_LENGTH_MAX, 64, 64, 30)
    plan = controller.plan(64, ngram_available=64, ngram_match=MATCH_LENGTH_MAX)
    assert (plan.source, plan.k) == ("ngram", 64)


def test_controller_stops_drafting_copies_that_fail():
    controller = GoodputController(BATCHED, t_draft=0.0, k_max=64)
    _observe(controller, 20, 64, 0, 40)
    plan = controller.plan(64, ngram_available=64, ngram_match=20)
    assert (plan.source, plan.k) == (None, 0)


def test_controller_never_drafts_when_verification_is_linear():
    controller = GoodputController(LINEAR, t_draft=0.0, k_max=64, ngram_prior=[1.0] * len(MATCH_BUCKETS))
    plan = controller.plan(64, ngram_available=64, ngram_match=MATCH_LENGTH_MAX)
    assert (plan.source, plan.k) == (None, 0)


def test_long_copies_through_the_engine_keep_the_output(tiny_runtimes):
    """A controlled drafter allowed 64-token copies gives target-only's output (exact kernels)."""
    target, _ = tiny_runtimes
    assert target.guarantee == "exact"
    prompt = [5, 6, 7, 8, 9, 10, 11, 12, 13, 14] * 6
    reference = (
        SpeculativeEngine(target).generate(prompt, GenerationSettings(max_tokens=80, draft_max=0)).run()
    )
    drafter = ControlledDrafter(GoodputController(BATCHED, 0.0, k_max=64), ngram=NgramDrafter(1, 8))
    gen = (
        SpeculativeEngine(target, drafter)
        .generate(prompt, GenerationSettings(max_tokens=80, draft_max=64))
        .run()
    )
    assert gen.tokens == reference.tokens
    assert gen.stats.guarantee == "exact"


@pytest.mark.parametrize("k", [16, 64])
def test_goodput_controller_takes_k_max_64(k):
    controller = GoodputController(BATCHED[:5], t_draft=0.0, k_max=k)
    assert len(controller.t_verify) == k + 1
    assert np.all(np.diff(controller.t_verify) >= 0)
