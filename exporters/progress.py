"""The exporters' progress convention: `progress(total, label)` → a bar with `update(n)`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol


class ProgressBar(Protocol):
    """What an exporter needs from a progress bar: a context manager with `update(n)`."""

    def __enter__(self) -> Any: ...

    def __exit__(self, *exc: object) -> Any: ...

    def update(self, n: int) -> Any: ...


ProgressFactory = Callable[[int, str], ProgressBar]
"""`progress(total, label)` → a progress bar counting to `total` (e.g. a click or tqdm bar)."""


class _NoBar:
    def update(self, n: int) -> None:
        pass


@contextlib.contextmanager
def progress_bar(progress: ProgressFactory | None, total: int, label: str) -> Iterator[Any]:
    """The bar `progress` makes for this step, or one that ignores updates when there is none."""
    if progress is None:
        yield _NoBar()
    else:
        with progress(total, label) as bar:
            yield bar
