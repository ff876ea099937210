"""End to end on the default pair (Qwen2.5-Coder 1.5B target, 0.5B drafter, Q4_K_M).

Skipped only when the pair's packages are absent; CI installs them, so there it runs.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgespec.chat import prompt_tokens
from edgespec.cli.main import cli
from edgespec.drafting import ModelDrafter, NgramDrafter
from edgespec.engine import GenerationSettings, SpeculativeEngine
from edgespec.load.pair_check import check_compatible
from edgespec.runtimes.base import RuntimeSettings

from ..conftest import bench_prompts, real_pair_paths

pytestmark = pytest.mark.real

N_NEW = 96
PROMPTS = bench_prompts(per_category=1, categories=12)  # 12 prompts, 12 categories
# speculative output is compared with target-only token for token: the exact guarantee, asked for
SETTINGS = RuntimeSettings(n_ctx=2048, kernels="exact")


README = Path(__file__).resolve().parents[2] / "README.md"


def readme_python_block(heading: str) -> str:
    """The first ```python block after `heading` in the README."""
    text = README.read_text(encoding="utf-8")
    after = text[text.index(heading) :]
    return after.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.fixture(scope="module")
def config_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One user config folder for the README tests: the first tunes, the later reuse its profile."""
    return tmp_path_factory.mktemp("config")


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b)))


@pytest.fixture(scope="module")
def real_runtimes():
    from edgespec.runtimes.llama_cpp import LlamaCppRuntime

    target_path, draft_path = real_pair_paths()
    target = LlamaCppRuntime(target_path, SETTINGS)
    draft = LlamaCppRuntime(draft_path, SETTINGS)
    yield target, draft
    target.close()
    draft.close()


def test_prompt_set_is_broad_enough():
    assert len(PROMPTS) >= 12 and len({p.category for p in PROMPTS}) >= 4


def test_default_pair_is_compatible(real_runtimes):
    check_compatible(*real_runtimes)


@pytest.mark.parametrize("question", PROMPTS, ids=[f"{p.category}-{p.id}" for p in PROMPTS])
def test_speculative_equals_target_only(real_runtimes, question):
    target, draft = real_runtimes
    prompt = prompt_tokens(target, question.prompt)
    base = SpeculativeEngine(target).generate(prompt, GenerationSettings(max_tokens=N_NEW, draft_max=0)).run()
    assert base.tokens, "target-only produced nothing"
    configs = [("draft", ModelDrafter(draft, max_id=target.vocab.n_vocab), k) for k in (1, 4, 8)]
    configs.append(("ngram", NgramDrafter(), 4))
    for name, drafter, k in configs:
        spec = (
            SpeculativeEngine(target, drafter)
            .generate(prompt, GenerationSettings(max_tokens=N_NEW, draft_max=k))
            .run()
        )
        assert spec.tokens == base.tokens, (
            f"{name} k={k} diverged at token {first_difference(spec.tokens, base.tokens)}"
        )
        assert spec.finish_reason == base.finish_reason
        if name == "draft":
            assert spec.stats.n_accepted > 0


def test_constrained_speculation_equals_constrained_target_only(real_runtimes):
    """Under a JSON schema, on the real pair with the exact kernels: model drafts (q masked like
    p) and forced drafts give the constrained target-only answer, token for token, and the same
    log-probabilities, bit for bit."""
    import json

    import jsonschema

    from edgespec.constrain import Grammar

    target, draft = real_runtimes
    schema = {
        "type": "object",
        "properties": {
            "name": {"type": "string"},
            "languages": {"type": "array", "items": {"type": "string"}, "maxItems": 4},
            "years": {"type": "integer"},
        },
        "required": ["name", "languages", "years"],
        "additionalProperties": False,
    }
    prompt = prompt_tokens(
        target, "Extract as JSON: Grace Hopper worked with COBOL and FLOW-MATIC for about 40 years."
    )
    settings = GenerationSettings(max_tokens=80, draft_max=0, grammar=Grammar.json_schema(schema), logprobs=3)
    base = SpeculativeEngine(target).generate(prompt, settings).run()
    assert base.finish_reason == "stop"
    jsonschema.validate(json.loads(base.text), schema)
    for drafter, k in ((ModelDrafter(draft, max_id=target.vocab.n_vocab), 4), (None, 8)):
        spec = SpeculativeEngine(target, drafter).generate(prompt, replace(settings, draft_max=k)).run()
        assert spec.tokens == base.tokens, (
            f"k={k} diverged at token {first_difference(spec.tokens, base.tokens)}"
        )
        assert spec.stats.n_forced_accepted > 0
        assert spec.logprobs == base.logprobs and len(base.logprobs) == len(base.tokens)


def test_cli_answers_the_readme_prompt(real_runtimes, config_dir, monkeypatch):
    """The README's command: no --draft, so --profile auto, which tunes for this machine first."""
    monkeypatch.setenv("EDGESPEC_CONFIG_DIR", str(config_dir))
    result = CliRunner().invoke(
        cli,
        [
            "run",
            "--max-tokens",
            "80",
            "--ctx",
            "1024",
            "--stats",
            "Write a Python function that returns the n-th Fibonacci number.",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "def " in result.stdout and "fib" in result.stdout.lower()
    assert "on this machine" in result.stderr  # it tuned first: the config folder was empty
    assert "[profile tuned-" in result.stderr and "tokens per target pass" in result.stderr
    assert len(list((config_dir / "profiles").glob("tuned-*.toml"))) == 1


def test_readme_embedding_example_runs_as_written(config_dir):
    """The README's Python API example, pasted into a fresh interpreter."""
    code = readme_python_block("## Python API")
    env = {**os.environ, "EDGESPEC_CONFIG_DIR": str(config_dir)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "def " in proc.stdout and "tokens/s, finished by" in proc.stdout
    reused = re.search(r"reused (\d+) of (\d+) prompt tokens", proc.stdout)
    assert reused is not None, proc.stdout
    # The third call's prompt repeats the conversation so far: most of it came from the cache.
    assert int(reused[1]) > int(reused[2]) // 2


def test_readme_structured_output_example_runs_as_written(config_dir):
    """The README's structured output and tool call example, pasted into a fresh interpreter."""
    code = readme_python_block("### Structured output and tool calls")
    env = {**os.environ, "EDGESPEC_CONFIG_DIR": str(config_dir)}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    person = json.loads(lines[0])
    assert person["name"] == "Ada Lovelace" and person["born"] == 1815
    assert lines[1].startswith("get_weather {'city': 'Paris")
