"""VocabTrim on the real default drafter: the trimmed GGUF loads in llama.cpp and drafts for the real
target with output identical to target-only.

Skipped only when the pair's packages are absent; CI installs them, so there it runs.
"""

from __future__ import annotations

import pytest

from edgespec.bench.datasets import last_per_category, read_prompts
from edgespec.chat import prompt_tokens
from edgespec.engine import GenerationSettings
from edgespec.exporters import vocab_trim as vt
from edgespec.load.builder import load
from edgespec.runtimes.base import RuntimeSettings

from ..conftest import BENCH_QUESTIONS, bench_prompts, real_pair_paths

pytestmark = pytest.mark.real

# speculative output is compared with target-only token for token: the exact guarantee, asked for
SETTINGS = RuntimeSettings(n_ctx=2048, kernels="exact")
N_KEEP = 32768


@pytest.fixture(scope="module")
def trimmed_drafter(tmp_path_factory):
    target_path, draft_path = real_pair_paths()
    pair = load(target_path, "none", SETTINGS)
    try:
        # A small calibration (the benchmark uses 52 prompts x 128 tokens): 6 unseen prompts.
        calibration = [
            p for p in last_per_category(read_prompts(BENCH_QUESTIONS), 1) if len(p.prompt) < 2000
        ][:6]
        prompts = [prompt_tokens(pair.engine.target, p.prompt) for p in calibration]
        counts = vt.count_generated(pair.engine, prompts, 32)
        for tokens in prompts:
            counts += vt.count_prompt(tokens, len(counts))
    finally:
        pair.close()
    out = tmp_path_factory.mktemp("real-trim") / "drafter-32k.gguf"
    report = vt.trim_gguf(draft_path, out, counts, N_KEEP, frequency_source="test")
    # The Q8_0 head shrinks from 151936 to 32768 rows (145 MB → 31 MB), the Q5_0 embedding with it.
    assert report.n_source_vocab == 151936 and report.source_bytes - report.out_bytes > 150e6
    assert report.coverage == 1.0
    return target_path, out


def test_trimmed_real_drafter_output_is_identical_to_target_only(trimmed_drafter):
    target_path, trimmed = trimmed_drafter
    reference = load(target_path, "none", SETTINGS)
    pair = load(target_path, trimmed, SETTINGS)
    try:
        assert pair.draft_runtime.vocab.n_vocab == N_KEEP
        accepted = drafted = 0
        for question in bench_prompts(per_category=1, categories=4):
            prompt = prompt_tokens(reference.engine.target, question.prompt)
            base = reference.engine.generate(prompt, GenerationSettings(max_tokens=64, draft_max=0)).run()
            spec = pair.engine.generate(prompt, GenerationSettings(max_tokens=64, draft_max=4)).run()
            assert spec.tokens == base.tokens, question.id
            accepted += spec.stats.n_accepted
            drafted += spec.stats.n_drafted
        assert accepted / drafted > 0.3  # untrimmed drafts at ~0.5-0.7 on these prompts
    finally:
        reference.close()
        pair.close()
