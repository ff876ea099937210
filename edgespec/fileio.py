"""Writing files so that nothing half-written is ever left where a reader looks, and a full disk is
reported as one line that says so."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from edgespec.errors import EdgespecError, ExportError

_MIB = 1 << 20
_DISK_FULL = {errno.ENOSPC: "the disk is full", errno.EDQUOT: "the disk quota is used up"}
WRITE_HINT = "free some space or write elsewhere"


class ExportWriteError(ExportError, OSError):
    """An export could not write its output: a full disk, a read-only folder, no permission.

    Also an OSError, so that code catching write failures by their Python type still does.
    """


@contextmanager
def atomic_path(path: Path, suffix: str = ".tmp") -> Iterator[Path]:
    """A temporary file beside `path` to write; renamed over `path` only if the block succeeds.

    On any failure (an exception, Ctrl-C, a full disk) the temporary file is removed and `path` is
    left as it was. The file gets the mode a newly created file would get under the process umask
    (mkstemp alone makes it private). `suffix` matters to writers that infer a format from it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=suffix)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        tmp.chmod(0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def free_bytes(path: Path) -> int | None:
    """Free space on the file system that holds `path` (or would: its nearest existing folder)."""
    folder = path
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def size_text(n_bytes: float) -> str:
    """A size for people: "850 MiB", "1.4 GiB", "96 KiB"."""
    if n_bytes >= 1 << 30:
        return f"{n_bytes / (1 << 30):.1f} GiB"
    if n_bytes >= _MIB:
        return f"{round(n_bytes / _MIB):,} MiB"
    return f"{max(0, round(n_bytes / 1024)):,} KiB"


def _free_text(path: Path) -> str:
    free = free_bytes(path.parent)
    return "free space unknown" if free is None else f"{size_text(free)} free in {path.parent}"


def describe_write_error(exc: OSError, path: Path, hint: str = WRITE_HINT) -> str:
    """One line for an OSError raised while `path` was being written.

    A full disk says so, with the free space left; an error about another file (a source being
    read) names that file instead.
    """
    full = _DISK_FULL.get(exc.errno) if exc.errno is not None else None
    if full is not None:
        return f"cannot write {path}: {full} ({_free_text(path)}); no partial file was left: {hint}"
    filename = getattr(exc, "filename", None)
    reason = exc.strerror or str(exc) or type(exc).__name__
    if filename and not Path(filename).name.startswith(f".{path.name}.") and Path(filename) != path:
        return f"cannot read or write {filename}: {reason}"
    if exc.errno is None:  # e.g. numpy's "N requested and M written": the kernel's reason is lost
        reason = f"a write stopped short ({reason})"
    return f"cannot write {path}: {reason}; {_free_text(path)}; no partial file was left"


@contextmanager
def write_errors(
    path: Path, error: Callable[[str], Exception] = ExportWriteError, hint: str = WRITE_HINT
) -> Iterator[None]:
    """Turn an OSError raised inside the block into `error(one line)` (see describe_write_error).

    Errors that are already user-facing (EdgespecError) pass through unchanged.
    """
    try:
        yield
    except EdgespecError:
        raise
    except OSError as exc:
        raise error(describe_write_error(exc, path, hint)) from exc


def check_free_space(
    path: Path, needed: int, error: Callable[[str], Exception] = ExportError, hint: str = WRITE_HINT
) -> None:
    """Refuse, before writing, a file of about `needed` bytes (plus 1% for the file system's own
    blocks) that the disk holding `path` has no room for."""
    needed += needed // 100
    free = free_bytes(path.parent)
    if free is None or free >= needed:
        return
    raise error(
        f"writing {path} needs about {size_text(needed)}, and only {size_text(free)} is free in "
        f"{path.parent}: {hint}"
    )


def close_quietly(handle: Any) -> None:
    """Close a writer after another error: a second error (the same full disk, on flushing) must
    not replace the first, which may be a Ctrl-C."""
    with contextlib.suppress(OSError, ValueError):
        handle.close()


#: overrides where edgespec keeps its user files (profiles, tuned costs, probe results, history)
CONFIG_ENV = "EDGESPEC_CONFIG_DIR"


def user_config_dir() -> Path:
    """edgespec's user folder: `$EDGESPEC_CONFIG_DIR`, else the platform's user config directory
    for edgespec (e.g. ~/.config/edgespec), which may not exist yet."""
    override = os.environ.get(CONFIG_ENV)
    if override:
        return Path(override).expanduser()
    import platformdirs

    return Path(platformdirs.user_config_dir("edgespec", appauthor=False))
