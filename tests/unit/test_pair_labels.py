"""How reports name what drafts (`LoadedPair.draft_name` and `draft_label`), without a model."""

from __future__ import annotations

from pathlib import Path

import pytest

from edgespec.engine import SpeculativeEngine
from edgespec.load.builder import LoadedPair

from ..fakes import FakeRuntime


def pair(draft: str) -> LoadedPair:
    return LoadedPair(SpeculativeEngine(FakeRuntime(lambda context: 2), None), Path("target.gguf"), draft)


@pytest.mark.parametrize(
    ("draft", "name", "label"),
    [
        ("none", "none", "none"),
        ("ngram", "ngram", "ngram"),
        ("profile laptop", "profile laptop", "profile laptop"),
        ("/models/drafter.gguf", "drafter.gguf", "draft drafter.gguf"),
        # a bare file name is still a model file, and one called "ngram" is not the n-gram source
        ("drafter.gguf", "drafter.gguf", "draft drafter.gguf"),
        ("/models/ngram", "ngram", "draft ngram"),
    ],
)
def test_reports_name_the_draft_source_or_the_draft_file(draft, name, label):
    loaded = pair(draft)
    assert (loaded.draft_name, loaded.draft_label) == (name, label)
