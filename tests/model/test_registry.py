"""Models on disk (`edgespec.load.registry`): tiny GGUFs placed as the Hugging Face cache, LM Studio,
Ollama and the user's folders keep them, listed and picked by name."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from edgespec.formats import gguf as gguf_parser
from edgespec.load import builder, registry
from edgespec.load.registry import AmbiguousModelName, ModelNotFound

from ..hubserver import FakeHub
from ..stores import ollama_put, write_projector


@pytest.fixture()
def stores(isolated_home, tmp_path, monkeypatch, tiny_pair):
    """Tiny models in every layout; returns where each went."""
    home = isolated_home
    target, draft = tiny_pair
    placed: dict[str, Path] = {}
    # Hugging Face: downloaded by huggingface_hub itself, from a local Hub.
    repo = {"tiny-Q8_0.gguf": target.read_bytes(), "tiny-Q4_K_M.gguf": draft.read_bytes(), "README.md": b"hi"}
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    from huggingface_hub import hf_hub_download

    with FakeHub({"org/Tiny-GGUF": repo}) as hub:
        for name in ("tiny-Q8_0.gguf", "tiny-Q4_K_M.gguf", "README.md"):
            path = hf_hub_download("org/Tiny-GGUF", name, cache_dir=registry.hf_cache_dir(), endpoint=hub.url)
            placed[f"hf:{name}"] = Path(path)
    # LM Studio: <publisher>/<repo>/<file>.gguf, in its new home and in a configured folder.
    lms = home / ".lmstudio" / "models" / "lmstudio-community" / "Tiny-GGUF"
    lms.mkdir(parents=True)
    placed["lmstudio"] = Path(shutil.copy(target, lms / "Tiny-Q8_0.gguf"))
    write_projector(lms / "mmproj-Tiny-F16.gguf")
    elsewhere = tmp_path / "lms-downloads"
    (home / ".lmstudio" / "settings.json").write_text(json.dumps({"downloadsFolder": str(elsewhere)}))
    (elsewhere / "someone" / "Other-GGUF").mkdir(parents=True)
    placed["lmstudio-configured"] = Path(
        shutil.copy(draft, elsewhere / "someone" / "Other-GGUF" / "other.gguf")
    )
    # Ollama: manifests and blobs under OLLAMA_MODELS.
    store = tmp_path / "ollama"
    monkeypatch.setenv("OLLAMA_MODELS", str(store))
    placed["ollama"] = ollama_put(store, draft, "registry.ollama.ai", "library", "tiny", "latest")
    placed["ollama-hf"] = ollama_put(store, target, "hf.co", "org", "Tiny-GGUF", "Q8_0")
    placed["ollama-bad"] = ollama_put(
        store, b"not a model at all", "registry.ollama.ai", "library", "broken", "1b"
    )
    # The user's folders: a model, a split model, one with a shard missing, one too deep.
    mine = tmp_path / "mine"
    (mine / "a" / "b" / "c" / "d").mkdir(parents=True)
    placed["folder"] = Path(shutil.copy(target, mine / "a" / "solo.gguf"))
    for i in (1, 2):
        shutil.copy(target, mine / f"split-{i:05d}-of-00002.gguf")
    shutil.copy(target, mine / "gap-00001-of-00003.gguf")
    shutil.copy(target, mine / "a" / "b" / "c" / "d" / "too-deep.gguf")
    monkeypatch.setenv(registry.MODEL_DIRS_ENV, str(mine))
    return placed


EXPECTED = {
    "hf:org/Tiny-GGUF/tiny-Q4_K_M.gguf",
    "hf:org/Tiny-GGUF/tiny-Q8_0.gguf",
    "lmstudio:lmstudio-community/Tiny-GGUF/Tiny-Q8_0.gguf",
    "lmstudio:someone/Other-GGUF/other.gguf",
    "ollama:tiny:latest",
    "ollama:hf.co/org/Tiny-GGUF:Q8_0",
    "ollama:broken:1b",
    "folder:a/solo.gguf",
    "folder:split.gguf",
    "folder:gap.gguf",
}


def test_every_layout_is_listed_with_what_its_header_says(stores, tiny_pair):
    found = {m.name: m for m in registry.find_models()}
    assert set(found) == EXPECTED  # no projector, no README, nothing below three levels
    solo = found["folder:a/solo.gguf"]
    assert solo.error is None and solo.info is not None
    assert (solo.info.architecture, solo.info.quantization, solo.info.context_length) == (
        "llama",
        "Q8_0",
        512,
    )
    assert solo.info.chat_template and solo.size == tiny_pair[0].stat().st_size
    assert found["ollama:tiny:latest"].path == stores["ollama"]
    assert found["hf:org/Tiny-GGUF/tiny-Q8_0.gguf"].path == stores["hf:tiny-Q8_0.gguf"]
    split = found["folder:split.gguf"]
    assert [p.name for p in split.files] == ["split-00001-of-00002.gguf", "split-00002-of-00002.gguf"]
    assert split.info is not None and split.info.n_params == 2 * solo.info.n_params
    assert found["folder:gap.gguf"].error == "shard 2, 3 of 3 is missing"
    assert "not a GGUF model file" in (found["ollama:broken:1b"].error or "")
    assert found["ollama:broken:1b"].info is None
    data = solo.to_dict()
    assert data["name"] == "folder:a/solo.gguf" and data["parameters"] == solo.info.n_params


def test_a_second_listing_reads_only_changed_headers(stores, monkeypatch):
    registry.find_models()
    calls = []
    original = gguf_parser.check_gguf

    def counted(path):
        calls.append(Path(path).name)
        return original(path)

    monkeypatch.setattr(gguf_parser, "check_gguf", counted)
    gguf_parser.clear_header_cache()
    again = {m.name: m for m in registry.find_models()}
    assert set(again) == EXPECTED
    assert calls == [stores["ollama-bad"].name]  # a bad file is not kept: read again
    solo = stores["folder"]
    solo.write_bytes(solo.read_bytes())  # a new version of the file
    os.utime(solo, ns=(1, 1))
    calls.clear()
    registry.find_models()
    assert sorted(calls) == sorted([solo.name, stores["ollama-bad"].name])


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("ollama:tiny", "ollama:tiny:latest"),
        ("ollama:library/tiny:latest", "ollama:tiny:latest"),
        ("ollama:hf.co/org/Tiny-GGUF:Q8_0", "ollama:hf.co/org/Tiny-GGUF:Q8_0"),
        ("tiny:latest", "ollama:tiny:latest"),
        ("hf:org/Tiny-GGUF", "hf:org/Tiny-GGUF/tiny-Q4_K_M.gguf"),  # Q4_K_M when a repo has several
        ("hf:org/Tiny-GGUF:q8_0", "hf:org/Tiny-GGUF/tiny-Q8_0.gguf"),
        ("hf:org/Tiny-GGUF/tiny-Q8_0.gguf", "hf:org/Tiny-GGUF/tiny-Q8_0.gguf"),
        ("org/tiny-gguf/tiny-q8", "hf:org/Tiny-GGUF/tiny-Q8_0.gguf"),  # a unique prefix, any case
        ("lmstudio:someone", "lmstudio:someone/Other-GGUF/other.gguf"),
        ("a/solo", "folder:a/solo.gguf"),
        ("split", "folder:split.gguf"),
    ],
)
def test_names_pick_one_model(stores, name, expected):
    assert registry.resolve(name).name == expected


@pytest.mark.parametrize(
    ("name", "error", "message"),
    [
        ("lmstudio:", AmbiguousModelName, "'lmstudio:' names 2 models: lmstudio:lmstudio-community/"),
        ("hf:org/Tiny-GGUF/tiny", ModelNotFound, "is not in the Hugging Face cache; `edgespec pull"),
        ("hf:org/Tiny-GGUF:Q2_K", ModelNotFound, "is not in the Hugging Face cache"),
        ("ollama:qwen2.5-coder:7b", ModelNotFound, "Ollama has no model qwen2.5-coder:7b here"),
        ("ollama:a/b/c/d", ModelNotFound, "is not an Ollama model name"),
        ("nothing-like-it", ModelNotFound, "no model named 'nothing-like-it'"),
        ("ollama:broken:1b", ModelNotFound, "model ollama:broken:1b cannot be used: "),
        ("gap", ModelNotFound, "shard 2, 3 of 3 is missing"),
    ],
)
def test_bad_names_are_one_line_errors(stores, name, error, message):
    with pytest.raises(error) as info:
        registry.resolve(name)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_model_argument_is_a_path_first_then_a_name(stores, tmp_path):
    assert builder.resolve_model_path("ollama:tiny", "draft") == stores["ollama"]
    assert builder.resolve_model_path(str(stores["folder"]), "target") == stores["folder"]
    missing = tmp_path / "missing.gguf"
    assert builder.resolve_model_path(str(missing), "target") == missing  # its loader says "not found"
    with pytest.raises(ModelNotFound, match="no model named 'nowhere/at-all'"):
        builder.resolve_model_path("nowhere/at-all", "target")


def test_stores_by_their_own_rules(isolated_home, tmp_path, monkeypatch):
    """LM Studio's home pointer and older home, Ollama's default store, models.toml folders."""
    home = isolated_home
    pointed = tmp_path / "lms-home"
    (home / ".lmstudio-home-pointer").write_text(f"{pointed}\n")
    for lms_home in (pointed, home / ".cache" / "lm-studio"):
        (lms_home / "models").mkdir(parents=True)
    assert registry.lmstudio_dirs() == [
        (pointed / "models").resolve(),
        (home / ".cache/lm-studio/models").resolve(),
    ]
    (home / ".ollama" / "models").mkdir(parents=True)
    assert registry.ollama_dirs()[:1] == [(home / ".ollama" / "models").resolve()]
    config = tmp_path / "config"
    config.mkdir()
    (tmp_path / "listed").mkdir()
    (config / "models.toml").write_text(f'folders = ["{tmp_path / "listed"}", "{tmp_path / "absent"}"]\n')
    assert registry.user_dirs() == [(tmp_path / "listed").resolve()]
    (config / "models.toml").write_text("folders = 3\n")
    with pytest.raises(Exception, match="folders must be a list of paths"):
        registry.user_dirs()
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hubcache"))
    assert registry.hf_cache_dir() == tmp_path / "hubcache"


def test_the_python_api_takes_names(stores, tiny_pair):
    from edgespec import Engine

    with Engine("ollama:hf.co/org/Tiny-GGUF:Q8_0", "a/solo", n_ctx=256, threads=1) as engine:
        assert engine.target_path == stores["ollama-hf"] and engine.draft_name == "solo.gguf"
        by_name = engine.generate("the cat", raw=True, max_tokens=8, draft_max=0).text
    with Engine(tiny_pair[0], "none", n_ctx=256, threads=1) as engine:
        assert engine.generate("the cat", raw=True, max_tokens=8).text == by_name
