"""Log-probabilities on tiny models: the target's own, read from the verification rows, so that
speculation cannot change them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from edgespec.constrain import Grammar
from edgespec.drafting import ModelDrafter, NgramDrafter
from edgespec.engine import GenerationSettings, SpeculativeEngine
from edgespec.errors import SettingsError
from edgespec.sampling import SamplingSettings

PROMPTS = ["the cat sat on the", "a b c a b c a b", "once upon a time there was"]


def ids(target, text):
    return target.tokenize(text, add_special=True, parse_special=False)


def reference(target, prompt, tokens):
    """Each generated token's log-softmax row, from one fresh pass over prompt + tokens."""
    target.truncate(0)
    rows = target.eval([*prompt, *tokens[:-1]], logits="all")[len(prompt) - 1 :, : target.vocab.n_vocab]
    target.truncate(0)
    x = rows.astype(np.float64)
    m = x.max(axis=1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))


def flat(logprobs):
    """Everything a list of TokenLogprob says, as plain values."""
    return [(e.id, e.bytes, e.logprob, [(a.id, a.bytes, a.logprob) for a in e.top]) for e in logprobs]


@pytest.mark.parametrize("drafter", ["model", "ngram"])
def test_speculation_gives_target_only_logprobs_bit_for_bit(tiny_runtimes, drafter):
    target, draft_rt = tiny_runtimes
    source = ModelDrafter(draft_rt, max_id=target.vocab.n_vocab) if drafter == "model" else NgramDrafter(1, 8)
    kept = 0
    for text in PROMPTS:
        prompt = ids(target, text)
        base = SpeculativeEngine(target).generate(prompt, GenerationSettings(60, 0, logprobs=5)).run()
        spec = SpeculativeEngine(target, source).generate(prompt, GenerationSettings(60, 4, logprobs=5)).run()
        kept += spec.stats.n_accepted
        assert spec.tokens == base.tokens
        assert flat(spec.logprobs) == flat(base.logprobs)  # floats compared exactly
    assert kept > 0  # drafts were kept: rows came from multi-token passes


def test_logprobs_are_the_raw_log_softmax_with_its_top_tokens(tiny_runtimes):
    target, draft_rt = tiny_runtimes
    prompt = ids(target, PROMPTS[0])
    engine = SpeculativeEngine(target, ModelDrafter(draft_rt, max_id=target.vocab.n_vocab))
    # Sampled with temperature and top-k: the reported values are still the model's own.
    sampling = SamplingSettings(temperature=0.7, top_k=20)
    gen = engine.generate(prompt, GenerationSettings(30, 4, seed=3, sampling=sampling, logprobs=3)).run()
    assert gen.stats.n_accepted > 0
    assert [e.id for e in gen.logprobs] == gen.tokens
    expected = reference(target, prompt, gen.tokens)
    for entry, row in zip(gen.logprobs, expected, strict=True):
        assert entry.logprob == pytest.approx(row[entry.id], abs=1e-4)
        assert entry.bytes == target.token_bytes(entry.id)
        best = np.argsort(-row, kind="stable")[:3]
        assert [a.id for a in entry.top] == list(best)
        assert [a.logprob for a in entry.top] == pytest.approx(list(row[best]), abs=1e-4)
        assert all(a.top == () for a in entry.top)
        assert entry.logprob <= entry.top[0].logprob + 1e-6
    # The probabilities of the whole row sum to 1.
    assert math.fsum(np.exp(expected[0])) == pytest.approx(1.0)


def test_logprobs_under_a_grammar_are_the_models_not_the_masks(tiny_runtimes):
    target, draft_rt = tiny_runtimes
    prompt = ids(target, PROMPTS[0])
    grammar = Grammar.regex(r"(the|a) (cat|dog) [a-z]{2,8}\.")
    settings = GenerationSettings(24, 4, grammar=grammar, logprobs=2)
    base = SpeculativeEngine(target).generate(prompt, settings).run()
    drafter = ModelDrafter(draft_rt, max_id=target.vocab.n_vocab)
    spec = SpeculativeEngine(target, drafter).generate(prompt, settings).run()
    assert spec.stats.n_forced > 0 and flat(spec.logprobs) == flat(base.logprobs)
    expected = reference(target, prompt, base.tokens)
    for entry, row in zip(base.logprobs, expected, strict=True):
        assert entry.logprob == pytest.approx(row[entry.id], abs=1e-4)
    # The random tiny model does not put all its mass on what the grammar allows.
    assert min(e.logprob for e in base.logprobs) < -1


def test_no_logprobs_unless_asked(tiny_runtimes):
    target, _ = tiny_runtimes
    gen = SpeculativeEngine(target).generate(ids(target, PROMPTS[0]), GenerationSettings(5, 0))
    assert all(token.logprob is None for token in gen) and gen.logprobs == []
    zero = SpeculativeEngine(target).generate(ids(target, PROMPTS[0]), GenerationSettings(5, 0, logprobs=0))
    zero.run()
    assert len(zero.logprobs) == 5 and all(e.top == () for e in zero.logprobs)


@pytest.mark.parametrize("n", [-1, 21])
def test_logprobs_out_of_range_is_a_one_line_error(n):
    with pytest.raises(SettingsError, match=r"^logprobs must be between 0 and 20 alternatives, got"):
        GenerationSettings(logprobs=n)
