"""Joining a default model from packaged parts: atomic, hash-checked, reused, rebuilt when corrupt."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

from edgespec.errors import ModelCacheError
from edgespec.load import models


@pytest.fixture()
def fake_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> models.DefaultModel:
    """A three-part model whose parts are importable packages, like the real part wheels."""
    site = tmp_path / "site"
    chunks = [b"GGUF" + bytes(range(256)) * 40, b"middle" * 3000, b"end"]
    packages = []
    for i, chunk in enumerate(chunks, start=1):
        package = site / f"fakepart{i}"
        (package / "data").mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "data" / f"part{i:02d}.bin").write_bytes(chunk)
        packages.append((f"fakepart{i}", f"data/part{i:02d}.bin"))
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "cache"))
    whole = b"".join(chunks)
    yield models.DefaultModel(
        name="fake",
        role="target",
        description="fake",
        packages=tuple(packages),
        size=len(whole),
        sha256=hashlib.sha256(whole).hexdigest(),
    )
    for i in range(1, 4):
        sys.modules.pop(f"fakepart{i}", None)


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path / "x"))
    assert models.cache_dir() == tmp_path / "x"
    monkeypatch.delenv(models.CACHE_ENV)
    assert "edgespec" in str(models.cache_dir())


def test_join_verify_and_reuse(fake_model):
    path = models.resolve(fake_model)
    assert path == models.cache_dir() / "fake.gguf"
    assert path.read_bytes().startswith(b"GGUF") and path.stat().st_size == fake_model.size
    assert models.is_verified(fake_model)
    mtime = path.stat().st_mtime_ns
    assert models.resolve(fake_model) == path and path.stat().st_mtime_ns == mtime  # reused as is
    assert not list(path.parent.glob(".*"))  # no temporary files left


def test_wrong_hash_is_refused_and_nothing_is_left(fake_model):
    bad = models.DefaultModel(**{**fake_model.__dict__, "sha256": "0" * 64})
    with pytest.raises(ModelCacheError, match="sha256"):
        models.resolve(bad)
    assert not any(models.cache_dir().iterdir())


def test_corrupt_cache_is_detected_and_rebuilt(fake_model):
    path = models.resolve(fake_model)
    data = bytearray(path.read_bytes())
    data[100] ^= 0xFF
    path.write_bytes(bytes(data))  # changes mtime: the stamp no longer vouches for it
    assert not models.is_verified(fake_model)
    models.resolve(fake_model)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == fake_model.sha256


def test_missing_part_package_names_it(fake_model):
    missing = models.DefaultModel(
        **{**fake_model.__dict__, "packages": (("nosuchpart9", "data/part09.bin"),)}
    )
    with pytest.raises(ModelCacheError, match=r"nosuchpart9 is not installed.*\[models\]"):
        models.resolve(missing)
    assert not models.parts_installed(missing)


def test_interrupted_join_leaves_no_partial_file(fake_model):
    def boom(_n: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        models.join_parts(fake_model, models.cached_path(fake_model), progress=boom)
    assert not any(models.cache_dir().iterdir())
