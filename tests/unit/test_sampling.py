"""The sampling pipeline and the verification rules, on hand-computed cases and against a plain
full-sort reference implementation."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgespec.errors import SettingsError
from edgespec.sampling import Dist, LogitsProcessor, SamplingSettings, TokenSampler, residual
from edgespec.verify import verify_exact_match, verify_rejection


def dense(probs: list[float]) -> Dist:
    w = np.asarray(probs, dtype=np.float64)
    return Dist(w, float(w.sum()))


def reference(x: np.ndarray, s: SamplingSettings) -> np.ndarray:
    """The pipeline written the obvious way: full sort, float64 throughout."""
    z = x.astype(np.float64) / s.temperature
    keep = np.isfinite(z)
    order = np.argsort(-z, kind="stable")
    if s.top_k:
        keep &= z >= z[order[min(s.top_k, len(z)) - 1]]
    if s.top_p < 1:
        w = np.where(keep, np.exp(z - z.max()), 0.0)
        w /= w.sum()
        mass = np.cumsum(w[order])
        n = int(np.searchsorted(mass, s.top_p, side="left"))
        keep &= z >= z[order[min(n, len(z) - 1)]]
    if s.min_p:
        keep &= np.exp(z - z.max()) >= s.min_p
    w = np.where(keep, np.exp(z - z.max()), 0.0)
    return w / w.sum()


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=1.0),
        dict(temperature=0.7, top_k=40),
        dict(temperature=1.0, top_p=0.9),
        dict(temperature=1.3, min_p=0.05),
        dict(temperature=0.8, top_k=50, top_p=0.95, min_p=0.02),
        dict(temperature=1.0, top_k=3, top_p=0.5),
        dict(temperature=2.0, top_p=0.999),
    ],
)
def test_pipeline_matches_full_sort_reference(kwargs):
    s = SamplingSettings(**kwargs)
    rng = np.random.default_rng(0)
    for scale in (0.5, 3.0, 8.0):
        rows = (rng.standard_normal((3, 5000)) * scale).astype(np.float32)
        dists = LogitsProcessor(s, 5000).distributions(rows)
        for row, dist in zip(rows, dists, strict=True):
            # float32 exponentials on dense rows: relative error ~1e-7 (see sampling._weights)
            np.testing.assert_allclose(dist.as_dense(5000), reference(row, s), rtol=1e-6, atol=1e-12)


def test_truncation_keeps_ties_and_sparse_support():
    s = SamplingSettings(temperature=1.0, top_k=2)
    x = np.array([[1.0, 3.0, 2.0, 3.0, 2.0]], dtype=np.float32)
    (dist,) = LogitsProcessor(s, 5).distributions(x)
    assert list(dist.support()) == [1, 3]
    assert dist.prob(1) == pytest.approx(0.5) and dist.prob(0) == 0.0
    # the 2nd largest value is tied three ways with top_k=3: all three stay
    (dist,) = LogitsProcessor(SamplingSettings(temperature=1.0, top_k=3), 5).distributions(x)
    assert list(dist.support()) == [1, 2, 3, 4]


def test_penalties_and_bias_by_hand():
    s = SamplingSettings(
        temperature=1.0,
        repeat_penalty=2.0,
        frequency_penalty=0.5,
        presence_penalty=0.25,
        penalty_last_n=4,
        logit_bias={4: -math.inf, 0: 1.0},
    )
    proc = LogitsProcessor(s, 5)
    x = np.array([[1.0, 2.0, -1.0, 0.5, 9.0]], dtype=np.float32)
    # token 1 is not among the last 4 tokens (7 is outside the vocabulary and ignored)
    out = proc.adjusted(x, [[1, 2, 2, 3, 7]])[0]
    assert out[0] == pytest.approx(2.0)  # bias only
    assert out[1] == pytest.approx(2.0)  # too old for the window
    assert out[2] == pytest.approx(-1.0 * 2 - 2 * 0.5 - 0.25)  # negative: multiplied
    assert out[3] == pytest.approx(0.5 / 2 - 0.5 - 0.25)  # positive: divided
    assert out[4] == -math.inf  # banned
    assert x[0, 4] == 9.0  # the input is not modified
    assert proc.argmax(x, [[1, 2, 2, 3, 7]])[0] == 0
    (dist,) = proc.distributions(x, [[1, 2, 2, 3, 7]])
    assert dist.prob(4) == 0.0 and dist.prob(0) > dist.prob(3)


def test_settings_are_checked():
    for kwargs, message in [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(min_p=1.0), "min_p"),
        (dict(top_k=-2), "top_k"),
        (dict(repeat_penalty=0), "repeat_penalty"),
        (dict(logit_bias={"a": 1}), "token ids"),
        (dict(logit_bias={3: math.nan}), "within ±1e30, or -inf"),
        (dict(accept="maybe"), "accept"),
    ]:
        with pytest.raises(SettingsError, match=message):
            SamplingSettings(**kwargs)
    with pytest.raises(SettingsError, match="not in the vocabulary"):
        LogitsProcessor(SamplingSettings(logit_bias={10: 1.0}), 5)
    every = SamplingSettings(temperature=1.0, logit_bias={i: -math.inf for i in range(3)})
    with pytest.raises(SettingsError, match="bans every token"):
        LogitsProcessor(every, 3).distributions(np.zeros((1, 3), dtype=np.float32))
    assert SamplingSettings(logit_bias={2: -math.inf}).to_dict()["logit_bias"] == {"2": "-inf"}


def test_inverse_cdf_sampling():
    d = dense([0.0, 0.25, 0.0, 0.75])
    assert [d.sample(u) for u in (0.0, 0.2499, 0.25, 0.9999999)] == [1, 1, 3, 3]
    assert d.sample(np.nextafter(1.0, 0.0)) == 3
    sparse = Dist(np.array([1.0, 3.0]), 4.0, np.array([10, 20]))
    assert sparse.sample(0.1) == 10 and sparse.sample(0.5) == 20
    assert list(sparse.probs([20, 15, 10, 99])) == [0.75, 0.0, 0.25, 0.0]


def test_identical_distributions_always_accept():
    p = dense([0.1, 0.2, 0.3, 0.4])
    for u in np.linspace(0, 1, 50, endpoint=False):
        for x in range(4):
            assert verify_rejection([x], [p], [p, p], np.array([u, 0.5]), 4) == (1, 2)


def test_disjoint_supports_always_reject():
    q = dense([0.5, 0.5, 0.0, 0.0])
    p = dense([0.0, 0.0, 0.3, 0.7])
    for u in np.linspace(0, 1, 20, endpoint=False):
        n, token = verify_rejection([0], [q], [p, p], np.array([u, 0.2]), 4)
        assert n == 0 and token == 2  # from the residual, which is p here
        assert verify_rejection([1], [q], [p, p], np.array([u, 0.9]), 4) == (0, 3)


def test_residual_distribution_by_hand():
    p = dense([0.5, 0.3, 0.2])
    q = dense([0.2, 0.6, 0.2])
    r = residual(p, q, 3)
    np.testing.assert_allclose(r.as_dense(3), [1.0, 0.0, 0.0])  # max(0, p - q) = [0.3, 0, 0]
    # x = 1 is kept with probability p/q = 0.5
    assert verify_rejection([1], [q], [p, p], np.array([0.49, 0.7]), 3) == (1, 1)
    assert verify_rejection([1], [q], [p, p], np.array([0.51, 0.7]), 3) == (0, 0)
    # the output distribution of one step equals p exactly: integrate over both uniforms
    grid = (np.arange(400) + 0.5) / 400
    out = np.zeros(3)
    for x in range(3):
        for u in grid:
            n, token = verify_rejection([x], [q], [p, p], np.array([u, 0.5]), 3)
            out[x if n else token] += q.prob(x) / len(grid)
    np.testing.assert_allclose(out, p.as_dense(3), atol=2e-3)


def test_point_proposals_are_one_hot():
    p = dense([0.6, 0.3, 0.1])
    # kept with probability p(x) = 0.3; on rejection, sampled from p without x
    assert verify_rejection([1], None, [p, p], np.array([0.29, 0.0]), 3) == (1, 0)
    for v in np.linspace(0, 1, 30, endpoint=False):
        n, token = verify_rejection([1], None, [p, p], np.array([0.31, v]), 3)
        assert n == 0 and token in (0, 2)
    # a token outside p's support is never kept
    p_sparse = Dist(np.array([1.0, 1.0]), 2.0, np.array([0, 2]))
    assert verify_rejection([1], None, [p_sparse, p_sparse], np.array([0.0, 0.0]), 3) == (0, 0)


def test_equal_distributions_have_no_residual_and_no_nan():
    p = dense([0.25, 0.25, 0.5])
    assert residual(p, p, 3) is None
    # p below q by rounding only: the rejection branch must still give a valid token
    q = Dist(p.weights * (1 + 1e-15), float(p.weights.sum()))
    n, token = verify_rejection([2], [q], [p, p], np.array([np.nextafter(1.0, 0.0), 0.3]), 3)
    assert token in (0, 1, 2)


def test_exact_match_acceptance():
    p = dense([0.1, 0.6, 0.3])
    # uniforms pick the target's own samples: 0.5 -> token 1, 0.05 -> token 0
    assert verify_exact_match([1, 1], [p, p, p], np.array([0.5, 0.05, 0.9])) == (1, 0)
    assert verify_exact_match([1, 2], [p, p, p], np.array([0.5, 0.95, 0.2])) == (2, 1)


def test_token_sampler_records_q_and_is_seeded():
    s = SamplingSettings(temperature=1.0, top_k=5)
    rows = np.random.default_rng(3).standard_normal((4, 100)).astype(np.float32)
    picks = []
    for _ in range(2):
        sampler = TokenSampler(s, np.random.default_rng(11))
        picks.append([sampler.pick(row, ()) for row in rows])
        assert len(sampler.dists) == 4 and all(len(d.support()) == 5 for d in sampler.dists)
        assert all(d.prob(t) > 0 for d, t in zip(sampler.dists, picks[-1], strict=True))
    assert picks[0] == picks[1]
    greedy = TokenSampler(SamplingSettings(), np.random.default_rng(0))
    assert greedy.pick(rows[0], ()) == int(rows[0].argmax()) and greedy.dists == []
