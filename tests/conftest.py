"""Shared fixtures: tiny models built by the tests, and the real default pair when installed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edgespec.bench.datasets import BenchPrompt, first_per_category, read_prompts
from edgespec.load import models
from edgespec.runtimes.base import RuntimeSettings

from .tinymodels import build_pair, build_tiny_model, default_vocab, vocab_with_changed_token

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
BENCH_QUESTIONS = SHARED / "bench" / "spec_bench_question.jsonl"

#: The tiny models' tests compare speculative output with target-only output token for token, which
#: only the exact guarantee promises: they ask for it explicitly (the default is llama.cpp's kernels).
TINY_SETTINGS = RuntimeSettings(n_ctx=256, n_threads=1, kernels="exact")


@pytest.fixture(scope="session", autouse=True)
def _own_config_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Tests write profiles and probe results into a folder of their own, never the user's; a test
    (or CI) that sets EDGESPEC_CONFIG_DIR itself keeps its own."""
    if "EDGESPEC_CONFIG_DIR" not in os.environ:
        os.environ["EDGESPEC_CONFIG_DIR"] = str(tmp_path_factory.mktemp("config"))


class ProgressRecorder:
    """A progress factory `(total, label) → bar` for exporters that records what it is told."""

    def __init__(self) -> None:
        self.calls: list[tuple[int, str]] = []
        self.updates: list[int] = []

    def __call__(self, total: int, label: str) -> ProgressRecorder:
        self.calls.append((total, label))
        return self

    def __enter__(self) -> ProgressRecorder:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def update(self, n: int) -> None:
        self.updates.append(n)


def tiny_model_args(tiny_pair: tuple[Path, Path], ctx: int = 256) -> list[str]:
    """CLI options that point a command at the tiny pair, on one thread, under the exact guarantee
    (the CLI tests compare speculative output with target-only output)."""
    return [
        "--target",
        str(tiny_pair[0]),
        "--draft",
        str(tiny_pair[1]),
        "--threads",
        "1",
        "--ctx",
        str(ctx),
        "--kernels",
        "exact",
    ]


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny")


@pytest.fixture(scope="session")
def tiny_pair(tiny_dir: Path) -> tuple[Path, Path]:
    """(target, draft): two different tiny llama models sharing one vocabulary."""
    return build_pair(tiny_dir)


@pytest.fixture(scope="session")
def tiny_changed_vocab(tiny_dir: Path) -> Path:
    """A draft whose token 300 has a different text from the pair's."""
    vocab = vocab_with_changed_token(default_vocab(), 300, "\u2581zebra")
    return build_tiny_model(tiny_dir / "changed.gguf", seed=3, vocab=vocab)


@pytest.fixture()
def tiny_runtimes(tiny_pair: tuple[Path, Path]):
    from edgespec.runtimes.llama_cpp import LlamaCppRuntime

    target = LlamaCppRuntime(tiny_pair[0], TINY_SETTINGS)
    draft = LlamaCppRuntime(tiny_pair[1], TINY_SETTINGS)
    yield target, draft
    target.close()
    draft.close()


@pytest.fixture()
def isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home folder of its own, with no model stores but those a test writes."""
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "OLLAMA_MODELS"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.delenv("EDGESPEC_MODEL_DIRS", raising=False)
    monkeypatch.setenv("EDGESPEC_CACHE_DIR", str(tmp_path / "edgespec-cache"))
    monkeypatch.setenv("EDGESPEC_CONFIG_DIR", str(tmp_path / "config"))
    return home


def real_pair_paths() -> tuple[Path, Path]:
    """The default pair, joined on first use; skips only when its packages are not installed."""
    if not (models.parts_installed(models.TARGET) and models.parts_installed(models.DRAFT)):
        pytest.skip('the default model pair is not installed (pip install -e ".[models]")')
    return models.resolve(models.TARGET), models.resolve(models.DRAFT)


def bench_prompts(per_category: int, categories: int) -> list[BenchPrompt]:
    """The first `per_category` prompts of the first `categories` Spec-Bench categories."""
    return first_per_category(read_prompts(BENCH_QUESTIONS), per_category, categories)
