from __future__ import annotations

import pytest

from edgespec.errors import IncompatibleModelsError
from edgespec.load.pair_check import check_compatible
from edgespec.runtimes.llama_cpp import LlamaCppRuntime

from ..conftest import TINY_SETTINGS
from ..tinymodels import build_tiny_model, default_vocab, vocab_with_padding


def test_pair_sharing_a_vocabulary_is_compatible(tiny_runtimes):
    check_compatible(*tiny_runtimes)


def test_changed_token_is_named(tiny_runtimes, tiny_changed_vocab):
    target, _ = tiny_runtimes
    with (
        LlamaCppRuntime(tiny_changed_vocab, TINY_SETTINGS) as draft,
        pytest.raises(IncompatibleModelsError, match=r"token 300 differs .*zebra"),
    ):
        check_compatible(target, draft)


def test_padding_rows_are_allowed(tiny_runtimes, tmp_path):
    target, _ = tiny_runtimes
    padded = build_tiny_model(tmp_path / "padded.gguf", seed=4, vocab=vocab_with_padding(default_vocab(), 7))
    with LlamaCppRuntime(padded, TINY_SETTINGS) as draft:
        assert draft.vocab.n_vocab == target.vocab.n_vocab + 7
        check_compatible(target, draft)


def test_more_than_padding_is_refused(tiny_runtimes, tmp_path):
    target, _ = tiny_runtimes
    big = build_tiny_model(tmp_path / "big.gguf", seed=4, vocab=vocab_with_padding(default_vocab(), 200))
    with (
        LlamaCppRuntime(big, TINY_SETTINGS) as draft,
        pytest.raises(IncompatibleModelsError, match="vocabulary sizes differ"),
    ):
        check_compatible(target, draft)


def test_different_tokenizer_type_is_refused(tiny_runtimes, tmp_path):
    """A BPE-vocabulary model (the real Qwen drafter) cannot draft for the SPM tiny target."""
    from edgespec.load import models

    if not models.parts_installed(models.DRAFT):
        pytest.skip("needs the default drafter for a BPE vocabulary")
    target, _ = tiny_runtimes
    with (
        LlamaCppRuntime(models.resolve(models.DRAFT), TINY_SETTINGS) as draft,
        pytest.raises(IncompatibleModelsError, match="tokenizer types differ"),
    ):
        check_compatible(target, draft)
