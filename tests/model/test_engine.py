"""The draft → verify loop on tiny models: identical output, accept patterns, stopping."""

from __future__ import annotations

from dataclasses import replace

import pytest

from edgespec.drafting import ModelDrafter, NgramDrafter
from edgespec.engine import GenerationSettings, SpeculativeEngine
from edgespec.errors import PromptError, SettingsError
from edgespec.runtimes.llama_cpp import LlamaCppRuntime

from ..conftest import TINY_SETTINGS

PROMPTS = ["the cat sat on the", "once upon a time there was", "a b c a b c a b", "hello world, the"]


def target_only(target, prompt, n):
    return SpeculativeEngine(target).generate(prompt, GenerationSettings(max_tokens=n, draft_max=0)).run()


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_model_drafter_output_equals_target_only(tiny_runtimes, k):
    target, draft_rt = tiny_runtimes
    engine = SpeculativeEngine(target, ModelDrafter(draft_rt, max_id=target.vocab.n_vocab))
    for text in PROMPTS:
        prompt = target.tokenize(text, add_special=True, parse_special=False)
        base = target_only(target, prompt, 60)
        spec = engine.generate(prompt, GenerationSettings(max_tokens=60, draft_max=k)).run()
        assert spec.tokens == base.tokens and spec.text == base.text
        assert spec.stats.n_steps < 59  # some drafts were accepted
        assert 0 < spec.stats.n_accepted < spec.stats.n_drafted  # and some rejected


def test_ngram_drafter_output_equals_target_only(tiny_runtimes):
    target, _ = tiny_runtimes
    engine = SpeculativeEngine(target, NgramDrafter())
    for text in PROMPTS:
        prompt = target.tokenize(text, add_special=True, parse_special=False)
        base = target_only(target, prompt, 80)
        spec = engine.generate(prompt, GenerationSettings(max_tokens=80, draft_max=5)).run()
        assert spec.tokens == base.tokens


def test_self_drafting_accepts_every_token(tiny_pair):
    """Target drafting for itself: every draft is accepted, so each pass yields k + 1 tokens."""
    target = LlamaCppRuntime(tiny_pair[0], TINY_SETTINGS)
    twin = LlamaCppRuntime(tiny_pair[0], TINY_SETTINGS)
    try:
        prompt = target.tokenize("the cat sat", add_special=True, parse_special=False)
        engine = SpeculativeEngine(target, ModelDrafter(twin))
        gen = engine.generate(prompt, GenerationSettings(max_tokens=41, draft_max=4)).run()
        assert gen.stats.accepted_per_step == [4] * 8
        assert gen.stats.tokens_per_step == 5.0
        assert gen.stats.acceptance_rate == 1.0
        flags = [
            t.from_draft for t in engine.generate(prompt, GenerationSettings(max_tokens=11, draft_max=4))
        ]
        assert flags == [False, True, True, True, True, False, True, True, True, True, False]
        assert gen.tokens == target_only(target, prompt, 41).tokens
    finally:
        target.close()
        twin.close()


def test_max_tokens_is_exact_whatever_k(tiny_runtimes):
    target, draft_rt = tiny_runtimes
    engine = SpeculativeEngine(target, ModelDrafter(draft_rt))
    prompt = target.tokenize("the cat", add_special=True, parse_special=False)
    for n in (1, 2, 7):
        gen = engine.generate(prompt, GenerationSettings(max_tokens=n, draft_max=8)).run()
        assert len(gen.tokens) == n and gen.finish_reason == "length"


def test_stop_string_ends_generation_and_is_cut(tiny_runtimes):
    target, draft_rt = tiny_runtimes
    engine = SpeculativeEngine(target, ModelDrafter(draft_rt))
    prompt = target.tokenize("the cat sat on the", add_special=True, parse_special=False)
    full = target_only(target, prompt, 40)
    words = full.text.split()
    stop = words[len(words) // 2]
    gen = engine.generate(prompt, GenerationSettings(max_tokens=40, draft_max=4, stop=(stop,))).run()
    assert gen.finish_reason == "stop"
    assert gen.text == full.text[: full.text.index(stop)]
    assert stop not in gen.text


def test_end_of_generation_token_stops_without_text(tiny_runtimes):
    """Declare the target's 6th greedy token to be end-of-generation: output stops just before it."""
    target, draft_rt = tiny_runtimes
    prompt = target.tokenize("hello world, the", add_special=True, parse_special=False)
    full = target_only(target, prompt, 20)
    eog_token = full.tokens[5]
    cut = full.tokens.index(eog_token)
    target.vocab = replace(target.vocab, eog=target.vocab.eog | {eog_token})
    gen = (
        SpeculativeEngine(target, ModelDrafter(draft_rt))
        .generate(prompt, GenerationSettings(max_tokens=20))
        .run()
    )
    assert gen.finish_reason == "stop"
    assert gen.tokens == full.tokens[:cut]


def test_full_context_finishes_with_length(tiny_pair):
    settings = replace(TINY_SETTINGS, n_ctx=32)
    with LlamaCppRuntime(tiny_pair[0], settings) as target, LlamaCppRuntime(tiny_pair[1], settings) as draft:
        prompt = target.tokenize("the cat sat on the mat", add_special=True, parse_special=False)
        gen = (
            SpeculativeEngine(target, ModelDrafter(draft))
            .generate(prompt, GenerationSettings(max_tokens=100, draft_max=8))
            .run()
        )
        assert gen.finish_reason == "length"
        assert len(prompt) + len(gen.tokens) == 32
        assert gen.tokens == target_only(target, prompt, 100).tokens


def test_bad_prompts_and_settings(tiny_runtimes):
    target, _ = tiny_runtimes
    engine = SpeculativeEngine(target)
    with pytest.raises(PromptError, match="empty"):
        engine.generate([])
    with pytest.raises(PromptError, match="context holds 256"):
        engine.generate([5] * 256)
    with pytest.raises(SettingsError, match="max_tokens"):
        GenerationSettings(max_tokens=0)
    with pytest.raises(SettingsError, match="draft_max"):
        GenerationSettings(draft_max=-1)


def test_streamed_text_matches_final_text(tiny_runtimes):
    target, draft_rt = tiny_runtimes
    prompt = target.tokenize("once upon a time", add_special=True, parse_special=False)
    gen = SpeculativeEngine(target, ModelDrafter(draft_rt)).generate(
        prompt, GenerationSettings(max_tokens=30)
    )
    streamed = "".join(t.text for t in gen)
    assert streamed == gen.text and len(gen.tokens) == 30
    assert gen.stats.n_generated == 30 and gen.stats.t_total >= gen.stats.t_prompt > 0


def test_greedy_with_penalties_and_bias_still_equals_target_only(tiny_runtimes):
    """Penalties and logit bias move the argmax; speculative output must move with it exactly."""
    from edgespec.sampling import SamplingSettings

    target, draft_rt = tiny_runtimes
    prompt = target.tokenize(PROMPTS[2], add_special=True, parse_special=False)
    plain = target_only(target, prompt, 40).tokens
    sampling = SamplingSettings(repeat_penalty=1.5, frequency_penalty=0.4, logit_bias={plain[0]: -100.0})
    base = SpeculativeEngine(target).generate(prompt, GenerationSettings(40, 0, sampling=sampling)).run()
    assert base.tokens[0] != plain[0] and base.tokens != plain  # the settings did change the output
    for drafter in (ModelDrafter(draft_rt, max_id=target.vocab.n_vocab), NgramDrafter()):
        spec = SpeculativeEngine(target, drafter)
        spec = spec.generate(prompt, GenerationSettings(40, 4, sampling=sampling))
        assert spec.run().tokens == base.tokens


@pytest.mark.parametrize("accept", ["rejection", "exact"])
def test_same_seed_same_sampled_output(tiny_runtimes, accept):
    from edgespec.sampling import SamplingSettings

    target, draft_rt = tiny_runtimes
    engine = SpeculativeEngine(target, ModelDrafter(draft_rt, max_id=target.vocab.n_vocab))
    prompt = target.tokenize(PROMPTS[0], add_special=True, parse_special=False)
    sampling = SamplingSettings(temperature=0.9, top_p=0.95, accept=accept)

    def sample(seed):
        return engine.generate(prompt, GenerationSettings(30, 4, seed=seed, sampling=sampling)).run()

    first = sample(7)
    assert first.seed == 7 and sample(7).tokens == first.tokens
    assert len({tuple(sample(seed).tokens) for seed in range(5)}) > 1
    assert first.stats.n_accepted > 0
    fresh = engine.generate(prompt, GenerationSettings(5, 4, sampling=sampling))
    assert isinstance(fresh.seed, int)  # drawn, and recorded for reproduction
