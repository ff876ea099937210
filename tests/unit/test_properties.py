"""Property tests (hypothesis) for the pure parts: verification, the sampling pipeline and the
request schema of `edgespec serve`.

Logits rows are drawn as a seeded Gaussian base (any width, up to past the 4096 tokens where
sampling switches to a two-level search) with a few entries replaced by extremes (±1e30, -inf,
large ties) and at least one finite entry per row. Settings cover the whole valid range of every
knob, bans (logit_bias -inf) and penalties included.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import replace
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, event, example, given, settings
from hypothesis import strategies as st

from edgespec.api import ROLES, Engine
from edgespec.engine import GenerationSettings
from edgespec.errors import PromptError, SettingsError
from edgespec.sampling import Dist, LazyDists, LogitsProcessor, SamplingSettings, residual
from edgespec.server import openai as openai_format
from edgespec.server.queue import APIError
from edgespec.verify import verify_exact_match, verify_greedy, verify_rejection

# No example database: nothing is written into the checkout, and every run starts afresh.
PROPERTY = settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)
SCHEMA = settings(max_examples=300, deadline=None, database=None)

EXTREMES = (1e30, -1e30, -np.inf, 0.0, 25.0, -25.0)


# ---------------------------------------------------------------------------------- strategies


@st.composite
def vocab_sizes(draw: st.DrawFn) -> int:
    """Mostly small vocabularies; sometimes one wide enough for the blocked inverse CDF."""
    return draw(st.integers(1, 40) | st.integers(4097, 4500))


@st.composite
def logits(draw: st.DrawFn, n_rows: int, n_vocab: int) -> np.ndarray:
    """float32 rows (n_rows, n_vocab), each with at least one finite value."""
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from((0.01, 1.0, 4.0, 40.0)))
    rows = (np.random.default_rng(seed).standard_normal((n_rows, n_vocab)) * scale).astype(np.float32)
    if draw(st.booleans()):
        rows = np.round(rows)  # many ties
    if n_rows:
        for _ in range(draw(st.integers(0, 10))):
            r, c = draw(st.integers(0, n_rows - 1)), draw(st.integers(0, n_vocab - 1))
            rows[r, c] = draw(st.sampled_from(EXTREMES))
        if draw(st.integers(0, 4)) == 0:  # a row that is -inf almost everywhere
            r = draw(st.integers(0, n_rows - 1))
            keep = draw(st.integers(0, n_vocab - 1))
            rows[r, np.arange(n_vocab) != keep] = -np.inf
    for row in rows:
        if not np.isfinite(row).any():
            row[draw(st.integers(0, n_vocab - 1))] = draw(st.sampled_from((0.0, 1e30, -1e30)))
    return rows


@st.composite
def sampling_settings(draw: st.DrawFn, n_vocab: int, greedy: bool | None = None) -> SamplingSettings:
    """Any valid settings; logit_bias bans or boosts a few ids, never every one."""
    if greedy is None:
        greedy = draw(st.booleans())
    temperature = (
        0.0 if greedy else draw(st.floats(1e-3, 100.0) | st.sampled_from((1.0, 0.7, 100.0, 1e-30, 1e-40)))
    )
    bias: dict[int, float] = {}
    for token in draw(st.lists(st.integers(0, n_vocab - 1), max_size=min(4, n_vocab - 1), unique=True)):
        bias[token] = draw(st.sampled_from((-math.inf, -1e30, 1e30, 5.0, -5.0, 0.0)) | st.floats(-50, 50))
    return SamplingSettings(
        temperature=temperature,
        top_k=draw(st.integers(0, n_vocab + 2)),
        top_p=draw(st.sampled_from((1.0, 0.5, 1e-6)) | st.floats(1e-6, 1.0)),
        min_p=draw(st.sampled_from((0.0, 0.5, 0.999)) | st.floats(0.0, 0.999)),
        repeat_penalty=draw(st.sampled_from((1.0, 0.5, 2.0)) | st.floats(0.05, 20.0)),
        frequency_penalty=draw(st.floats(-10, 10)),
        presence_penalty=draw(st.floats(-10, 10)),
        penalty_last_n=draw(st.integers(0, 16)),
        logit_bias=bias,
        accept=draw(st.sampled_from(("rejection", "exact"))),
    )


def recents_for(draw: st.DrawFn, n_rows: int, n_vocab: int) -> list[list[int]]:
    """Per row, the tokens before it (ids beyond the vocabulary are ignored by the penalties)."""
    base = draw(st.lists(st.integers(0, n_vocab + 2), max_size=20))
    return [base[: len(base) - n_rows + i + 1] if len(base) >= n_rows else base for i in range(n_rows)]


uniforms = st.floats(0.0, 1.0, exclude_max=True) | st.sampled_from((0.0, 1.0 - 2**-53, 0.5))


@st.composite
def pipeline_case(draw: st.DrawFn, n_rows: int = 2, greedy: bool | None = None) -> dict[str, Any]:
    n_vocab = draw(vocab_sizes())
    return {
        "n_vocab": n_vocab,
        "settings": draw(sampling_settings(n_vocab, greedy)),
        "rows": draw(logits(n_rows, n_vocab)),
        "recents": recents_for(draw, n_rows, n_vocab),
    }


# ------------------------------------------------------------------------------------- helpers


def assert_distribution(dist: Dist, n_vocab: int) -> np.ndarray:
    """Finite, non-negative, normalised, over valid ids; returns the dense probabilities."""
    w = np.asarray(dist.weights, dtype=np.float64)
    assert np.isfinite(w).all() and (w >= 0).all(), w
    assert math.isfinite(dist.total) and dist.total > 0
    assert math.isclose(float(w.sum()), dist.total, rel_tol=1e-9)
    if dist.ids is None:
        assert len(w) == n_vocab
    else:
        assert len(dist.ids) == len(w) and (np.diff(dist.ids) > 0).all()
        assert len(w) == 0 or (dist.ids[0] >= 0 and dist.ids[-1] < n_vocab)
    dense = dist.as_dense(n_vocab)
    assert np.isfinite(dense).all() and (dense >= 0).all()
    assert abs(dense.sum() - 1.0) < 1e-9
    assert len(dist.support()) > 0
    return dense


def adjusted_rows(processor: LogitsProcessor, rows: np.ndarray, recents: list[list[int]]) -> np.ndarray:
    """Rows after bias and penalties (float64)."""
    return processor.adjusted(rows, recents if processor.window else ()).astype(np.float64)


def bans_everything(processor: LogitsProcessor, rows: np.ndarray, recents: list[list[int]]) -> bool:
    """Whether bias and penalties leave some row with no finite logit (then sampling refuses)."""
    return not np.isfinite(adjusted_rows(processor, rows, recents)).any(axis=1).all()


def allowed_tokens(processor: LogitsProcessor, rows: np.ndarray, recents: list[list[int]]) -> list[set[int]]:
    """Per row, the tokens the pipeline may keep: not banned (finite after bias and penalties)
    and, with top-k, at or above the k-th largest value."""
    adjusted = adjusted_rows(processor, rows, recents)
    out = []
    k = processor.settings.top_k
    for row in adjusted:
        ok = np.isfinite(row)
        if 0 < k < len(row):
            ok &= row >= np.sort(row)[::-1][k - 1]
        out.append(set(np.flatnonzero(ok).tolist()))
    return out


# ------------------------------------------------------------------------------------ sampling


@PROPERTY
@given(pipeline_case(n_rows=3, greedy=False))
def test_every_distribution_is_normalised(case):
    """Whatever the logits (extremes, -inf rows, ties) and settings (bans, penalties, truncation),
    every distribution is finite, non-negative, sums to 1, keeps the top token, and gives 0 to
    banned tokens, to tokens below the top-k cut and to tokens under min_p of the top one."""
    n, s, rows, recents = case["n_vocab"], case["settings"], case["rows"], case["recents"]
    processor = LogitsProcessor(s, n)
    if bans_everything(processor, rows, recents):
        with pytest.raises(SettingsError, match="bans every token"):
            processor.distributions(rows, recents if processor.window else ())
        return
    dists = processor.distributions(rows, recents if processor.window else ())
    adjusted = adjusted_rows(processor, rows, recents)
    for dist, row, allowed in zip(dists, adjusted, allowed_tokens(processor, rows, recents), strict=True):
        dense = assert_distribution(dist, n)
        support = set(dist.support().tolist())
        assert support <= allowed
        assert int(row.argmax()) in support  # truncation never cuts the most likely token
        if s.min_p > 0:
            # the cut is compared with float32 logits: allow its rounding, in logit units / T
            m = float(row[np.isfinite(row)].max())
            slack = 2.0**-22 * max(abs(m), 1.0) / s.temperature
            assert dense[list(support)].min() >= s.min_p * dense.max() * math.exp(-min(slack, 700.0))


@PROPERTY
@given(pipeline_case(n_rows=1), st.integers(0, 2**32 - 1))
def test_choose_greedy_is_the_argmax_and_sampling_stays_in_the_support(case, seed):
    """choose(): the argmax of the bias- and penalty-adjusted row when greedy; otherwise a token
    with probability > 0 under the distribution it returns."""
    n, s, rows, recents = case["n_vocab"], case["settings"], case["rows"], case["recents"]
    processor = LogitsProcessor(s, n)
    assume(not bans_everything(processor, rows, recents))
    token, dist = processor.choose(rows[0], recents[0], np.random.default_rng(seed))
    assert 0 <= token < n
    adjusted = processor.adjusted(rows, recents if processor.window else ())[0]
    if s.greedy:
        assert dist is None and token == int(np.argmax(adjusted))
        assert np.isfinite(adjusted[token])
    else:
        assert dist is not None and dist.prob(token) > 0


@PROPERTY
@given(pipeline_case(n_rows=2, greedy=False), st.lists(uniforms, min_size=8, max_size=8))
def test_sampling_and_the_residual_only_pick_tokens_with_probability(case, us):
    """Dist.sample(u) returns a token of positive probability for every u in [0, 1) (both the
    flat and the blocked search); norm(max(0, p - q)) is a distribution inside p's support, or None
    only when p equals q."""
    n, s, rows = case["n_vocab"], case["settings"], case["rows"]
    processor = LogitsProcessor(replace(s, penalty_last_n=0), n)
    assume(not bans_everything(processor, rows, []))
    p, q = processor.distributions(rows)
    for u in us:
        assert p.prob(p.sample(u)) > 0 and q.prob(q.sample(u)) > 0
    rest = residual(p, q, n)
    p_dense, q_dense = p.as_dense(n), q.as_dense(n)
    diff = np.maximum(p_dense - q_dense, 0.0)
    if rest is None:
        assert diff.sum() < 1e-12
        return
    dense = assert_distribution(rest, n)
    assert set(rest.support().tolist()) <= set(p.support().tolist())
    if diff.sum() > 1e-6:  # below, rounding in p - q is no longer small next to the difference
        np.testing.assert_allclose(dense, diff / diff.sum(), atol=1e-9)
    for u in us:
        assert p.prob(rest.sample(u)) > 0


# -------------------------------------------------------------------------------- verification


@st.composite
def verification_case(draw: st.DrawFn) -> dict[str, Any]:
    k = draw(st.integers(0, 6))
    case = draw(pipeline_case(n_rows=k + 1, greedy=False))
    n = case["n_vocab"]
    case["k"] = k
    case["draft_rows"] = draw(logits(k, n))
    case["uniforms"] = np.array(draw(st.lists(uniforms, min_size=k + 1, max_size=k + 1)))
    case["draft_us"] = draw(st.lists(uniforms, min_size=k, max_size=k))
    # a point drafter (n-gram) may propose any id, a banned one included
    case["point_draft"] = draw(st.lists(st.integers(0, n - 1), min_size=k, max_size=k))
    case["with_q"] = draw(st.booleans())
    return case


def check_result(result: tuple[int, int], draft: list[int], p: list[Dist], n_vocab: int) -> None:
    """Bounds, and no emitted token (accepted or the target's own) of target probability 0."""
    n_accepted, token = result
    assert 0 <= n_accepted <= len(draft)
    assert isinstance(token, int) and 0 <= token < n_vocab
    for i in range(n_accepted):
        assert p[i].prob(draft[i]) > 0, (i, draft[i])
    assert p[n_accepted].prob(token) > 0, (n_accepted, token)


@PROPERTY
@given(verification_case())
def test_rejection_and_exact_match_never_emit_a_token_the_target_rules_out(case):
    """Speculative sampling (with q from the same pipeline, or point proposals) and exact-match
    acceptance: 0 <= accepted <= k, every accepted draft token and the next token have processed
    target probability > 0 (banned, top-k/top-p/min-p cut tokens have 0), and a rejected draft
    token is never the correction. A lazily computed p gives the same result as an eager one."""
    n, s, k = case["n_vocab"], case["settings"], case["k"]
    processor = LogitsProcessor(s, n)
    assume(not bans_everything(processor, case["rows"], case["recents"]))
    assume(not bans_everything(processor, case["draft_rows"], case["recents"][:k]))
    recents = case["recents"] if processor.window else [[] for _ in range(k + 1)]
    p = processor.distributions(case["rows"], recents if processor.window else ())
    if case["with_q"]:
        q = processor.distributions(case["draft_rows"], recents[:k] if processor.window else ())
        draft = [dist.sample(u) for dist, u in zip(q, case["draft_us"], strict=True)]
    else:
        q, draft = None, case["point_draft"]
    us = case["uniforms"]
    result = verify_rejection(draft, q, p, us, n)
    check_result(result, draft, p, n)
    n_accepted, token = result
    if n_accepted < k:
        q_j = q[n_accepted] if q is not None else Dist.one_hot(draft[n_accepted])
        if residual(p[n_accepted], q_j, n) is not None:
            assert token != draft[n_accepted]
    assert verify_rejection(draft, q, LazyDists(processor, case["rows"], recents), us, n) == result
    check_result(verify_exact_match(draft, p, us), draft, p, n)


@st.composite
def greedy_case(draw: st.DrawFn) -> dict[str, Any]:
    k = draw(st.integers(0, 6))
    case = draw(pipeline_case(n_rows=k + 1, greedy=True))
    case["k"] = k
    # per position: follow the target's argmax, or propose something else
    case["follow"] = draw(st.lists(st.booleans(), min_size=k, max_size=k))
    case["others"] = draw(st.lists(st.integers(0, case["n_vocab"] - 1), min_size=k, max_size=k))
    return case


@PROPERTY
@given(greedy_case())
def test_greedy_verification_follows_the_argmax_chain(case):
    """verify_greedy over the adjusted rows: each accepted token is its row's argmax, the next
    token is the argmax of the first row that disagrees (or of row k), and it is never banned."""
    n, s, k, rows = case["n_vocab"], case["settings"], case["k"], case["rows"]
    processor = LogitsProcessor(s, n)
    # with every token banned the argmax is a banned one (sampling refuses such rows instead)
    assume(not bans_everything(processor, rows, case["recents"]))
    adjusted = processor.adjusted(rows, case["recents"] if processor.window else ())
    argmax = adjusted.argmax(axis=1)
    draft = [int(argmax[i]) if follow else case["others"][i] for i, follow in enumerate(case["follow"])]
    n_accepted, token = verify_greedy(draft, adjusted)
    assert 0 <= n_accepted <= k
    assert all(draft[i] == argmax[i] for i in range(n_accepted))
    assert n_accepted == k or draft[n_accepted] != argmax[n_accepted]
    assert token == argmax[n_accepted] and np.isfinite(adjusted[n_accepted, token])
    assert list(processor.argmax(rows, case["recents"] if processor.window else ())) == list(argmax)


# ------------------------------------------------------------------------------ request schema

N_VOCAB = 1000
ENGINE = Engine.from_pair(
    SimpleNamespace(
        engine=SimpleNamespace(target=SimpleNamespace(vocab=SimpleNamespace(n_vocab=N_VOCAB))), slots=None
    ),
    draft_max=4,
)
FIELDS = sorted(openai_format._FIELDS[True] | openai_format._FIELDS[False])
BIG = (2**63, 2**64, -(2**64), 10**400, -(10**400))

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.sampled_from(BIG)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
numbers_ = (
    st.integers(-5, 300)
    | st.floats(-1e3, 1e3)
    | st.sampled_from((0, 1, -0.0, 0.5, 1e-300, 1e-40, 1e308, math.nan, math.inf, -math.inf))
    | st.sampled_from(BIG)
)


def mostly(good: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """Usually a value of the right type, sometimes anything."""
    return st.one_of(good, good, good, json_values)


text_parts = st.lists(
    st.fixed_dictionaries(
        {"type": st.sampled_from(("text", "image_url"))}, optional={"text": mostly(st.text())}
    ),
    max_size=3,
)
message = st.fixed_dictionaries(
    {},
    optional={
        "role": mostly(st.sampled_from((*ROLES, "developer", "tool", ""))),
        "content": mostly(st.text(max_size=20) | text_parts),
        "name": st.text(max_size=5),
    },
)
FIELD_VALUES: dict[str, st.SearchStrategy[Any]] = {
    "messages": mostly(st.lists(mostly(message), max_size=3)),
    "prompt": mostly(st.text(max_size=20) | st.lists(mostly(st.text(max_size=5)), max_size=2)),
    "model": mostly(st.text(max_size=8)),
    **{key: mostly(numbers_) for key in ("temperature", "top_p", "min_p", "repeat_penalty")},
    **{key: mostly(numbers_) for key in ("frequency_penalty", "presence_penalty")},
    **{key: mostly(numbers_) for key in ("seed", "n", "top_k", "penalty_last_n", "draft_max")},
    **{key: mostly(numbers_) for key in ("max_tokens", "max_completion_tokens")},
    "stop": mostly(st.text(max_size=6) | st.lists(mostly(st.text(max_size=4)), max_size=3)),
    "logit_bias": mostly(
        st.dictionaries(
            st.text("0123456789- _", max_size=5) | st.text(max_size=5), mostly(numbers_), max_size=3
        )
    ),
    "stream": mostly(st.booleans()),
    "stream_options": mostly(st.fixed_dictionaries({}, optional={"include_usage": mostly(st.booleans())})),
    "cache_prompt": mostly(st.booleans()),
    "logprobs": st.sampled_from((None, False, True, 0, 5)),
    "response_format": st.sampled_from(({"type": "text"}, {"type": "json_object"}, None)),
}


@st.composite
def plausible_bodies(draw: st.DrawFn, chat: bool) -> dict[str, Any]:
    """A few of the endpoint's fields, each usually with a value of the right type."""
    fields = sorted(set(FIELD_VALUES) & openai_format._FIELDS[chat])
    keys = draw(st.lists(st.sampled_from(fields), max_size=5, unique=True))
    return {key: draw(FIELD_VALUES[key]) for key in keys}


@st.composite
def requests(draw: st.DrawFn) -> tuple[dict[str, Any], bool]:
    """(body, chat): mostly a few of the endpoint's fields with usually well-typed values,
    sometimes any known fields with values of any type, or any JSON object; mostly with a valid
    conversation or prompt, so that the options are read and checked too."""
    chat = draw(st.booleans())
    kind = draw(st.integers(0, 4))
    if kind < 3:
        body = draw(plausible_bodies(chat))
    elif kind == 3:
        body = draw(st.dictionaries(st.sampled_from(FIELDS), json_values, max_size=6))
    else:
        body = draw(st.dictionaries(st.text(max_size=10), json_values, max_size=4))
    if draw(st.integers(0, 7)):
        body.update({"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"})
    return body, chat


def handle(body: dict[str, Any], chat: bool) -> str:
    """What the server does with a parsed JSON body before queueing it: read the fields, the
    conversation or the prompt, and check the options. Only 400-class errors may come out."""
    try:
        request = openai_format.params(body, chat)
        if chat:
            conversation = openai_format.messages(body)
        else:
            text = openai_format.prompt(body)
        options = {"max_tokens": 64, **request.options}
        generation = ENGINE.check_options(**options)
    except APIError as exc:
        assert exc.status == 400 and exc.message, exc
        assert exc.body()["error"]["message"]
        return "APIError"
    except (SettingsError, PromptError) as exc:
        assert openai_format.as_api_error(exc).status == 400
        return type(exc).__name__
    # it passed: every value has the type and range the engine expects
    assert isinstance(request.stream, bool) and isinstance(request.include_usage, bool)
    if chat:
        assert isinstance(conversation, list) and conversation
        for m in conversation:
            assert m["role"] in ROLES and isinstance(m["content"], str)
    else:
        assert isinstance(text, str)
    assert isinstance(generation, GenerationSettings)
    assert isinstance(generation.max_tokens, int) and generation.max_tokens >= 1
    assert isinstance(generation.draft_max, int) and 0 <= generation.draft_max <= 64
    assert all(isinstance(stop, str) for stop in generation.stop)
    assert generation.seed is None or (isinstance(generation.seed, int) and 0 <= generation.seed < 2**64)
    assert isinstance(generation.cache_prompt, bool)
    s = generation.sampling
    for name in ("temperature", "top_p", "min_p", "repeat_penalty", "frequency_penalty", "presence_penalty"):
        value = getattr(s, name)
        assert isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    assert 0 <= s.temperature <= 100 and 0 < s.top_p <= 1 and 0 <= s.min_p < 1 and s.repeat_penalty > 0
    assert isinstance(s.top_k, int) and s.top_k >= 0 and isinstance(s.penalty_last_n, int)
    for token, amount in s.logit_bias.items():
        assert isinstance(token, int) and 0 <= token < N_VOCAB
        assert isinstance(amount, float) and not math.isnan(amount) and amount != math.inf
    return "accepted"


@SCHEMA
@given(requests())
@example(({"prompt": "hi", "temperature": 10**400}, False))
@example(({"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"7": -(10**400)}}, True))
def test_any_request_body_gives_settings_or_a_400(request):
    """Random JSON bodies, and bodies of the known fields with values of any type: only a 400
    APIError, SettingsError or PromptError escapes, never TypeError/KeyError/ValueError/
    OverflowError; what passes is well-formed."""
    event(handle(*request))


HUGE = [{name: 10**400} for name in ("temperature", "top_p", "min_p", "repeat_penalty")]
HUGE += [{"frequency_penalty": -(10**400)}, {"presence_penalty": 10**400}, {"logit_bias": {"5": -(10**400)}}]


@pytest.mark.parametrize("chat", [True, False], ids=["chat", "completion"])
@pytest.mark.parametrize("field", HUGE, ids=[next(iter(f)) for f in HUGE])
def test_a_huge_integer_for_a_number_field_is_a_400(field, chat):
    """JSON integers have no size limit, and 10**400 does not fit a float: still a 400 (or, for
    a logit bias of -10**400, a ban), never an OverflowError."""
    body = {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
    outcome = handle({**body, **field}, chat)
    if "logit_bias" in field:
        assert outcome == "accepted"  # handle() checked that the bias became a ban (-inf)
    else:
        assert outcome in ("APIError", "SettingsError"), outcome


@pytest.mark.parametrize("temperature", [1e-30, 1e-40, 5e-324])
def test_a_tiny_temperature_gives_a_distribution(temperature):
    """Any temperature the settings accept (0 < T <= 100) gives a distribution: near 0 it is the
    argmax (ties shared), and sampling it works."""
    rows = np.array([[1.0, 3.0, 2.0, 3.0, -np.inf]], dtype=np.float32)
    for s in (
        SamplingSettings(temperature=temperature),
        SamplingSettings(temperature=temperature, top_p=0.9),
    ):
        (dist,) = LogitsProcessor(s, 5).distributions(rows)
        dense = assert_distribution(dist, 5)
        np.testing.assert_allclose(dense, [0, 0.5, 0, 0.5, 0])
        assert dist.sample(0.25) == 1 and dist.sample(0.75) == 3
