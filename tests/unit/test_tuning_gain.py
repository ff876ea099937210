"""What tuned costs predict for a model drafter, the measure pairing compares candidates by."""

from __future__ import annotations

from dataclasses import replace

import pytest

from edgespec.placement.profiles import TunedCosts, load_profile
from edgespec.placement.tuning import predicted_gain


def tuned(t_verify, t_draft, acceptance, drafters=("model", "ngram")):
    base = load_profile("cpu-only")
    costs = TunedCosts(
        "m", "t.gguf:1", "d.gguf:1", "2026-12-07T00:00:00Z", tuple(t_verify), t_draft, acceptance
    )
    return replace(base, costs=costs, speculation=replace(base.speculation, drafters=drafters))


def test_gain_is_the_best_draft_lengths_speed_over_plain_decoding():
    # k = 1: (1 + 0.8) tokens in 11 + 1 ms against 1 token in 10 ms: 1.5x
    assert predicted_gain(tuned([10.0, 11.0], 1.0, (0.8,))) == pytest.approx(1.5)
    # k = 2 does better still: (1 + 0.8 + 0.64) in 12 + 2 ms: 1.743x; the last alpha repeats
    assert predicted_gain(tuned([10.0, 11.0, 12.0], 1.0, (0.8,))) == pytest.approx(24.4 / 14)


def test_no_gain_without_a_paying_model_drafter():
    assert predicted_gain(tuned([10.0, 20.0], 0.0, (0.5,))) == 1.0  # a draft never pays here
    assert predicted_gain(tuned([10.0, 11.0], 1.0, (0.8,), drafters=("ngram",))) == 1.0  # dropped
    assert predicted_gain(load_profile("cpu-only")) == 1.0  # no costs
