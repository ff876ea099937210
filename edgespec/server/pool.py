"""The models one `edgespec serve` answers for: the one it starts with and, with `--models`, the
local models a request may name in its `model` field.

One model is in memory at a time: a laptop has room for one, and a second would take the memory
and the cores the first one decodes with. A request for another model waits its turn in the
first-in first-out queue like any other; when its turn comes, the worker closes the loaded engine
and opens the named one (pairing a drafter for it as `--profile auto` does), then runs it. A
switch never lets a later request overtake an earlier one. With `--parallel`, requests for the
loaded model run beside each other, and one for another model waits until they end (the server's
`Scheduler`): a switch never closes a model under a running request. A model that fails to load answers its
request with a 500 naming why, and the model that was loaded before is opened again.

Without `--models` there is one model, and it answers every request whatever its `model` says:
clients often hard-code one ("gpt-4o"). With `--models`, a request's `model` is matched as the
command line matches names (a listed name, a unique prefix of one, `ollama:NAME[:TAG]`,
`hf:REPO[...]`) among the offered models only: a name that fits none is a 404, one that fits
several a 400 listing them, and a request without `model` gets the loaded one.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from edgespec.errors import EdgespecError
from edgespec.server.queue import APIError

if TYPE_CHECKING:
    from edgespec.api import Engine
    from edgespec.load.registry import LocalModel

__all__ = ["ModelPool"]

log = logging.getLogger("edgespec.server")


def _same_file(a: Path, b: Path) -> bool:
    with contextlib.suppress(OSError):
        return a.resolve() == b.resolve()
    return a == b


class ModelPool:
    """The models a server offers, and the one engine loaded among them.

    Args:
        engine: the engine loaded at start. The caller keeps it and closes it; a switch to another
            model closes it too (closing twice is harmless).
        offered: the local models requests may name; empty: `engine` answers every request.
        opener: opens the engine for a model's file; needed when `offered` is not empty.
    """

    def __init__(
        self,
        engine: Engine,
        offered: Sequence[LocalModel] = (),
        opener: Callable[[Path], Engine] | None = None,
    ) -> None:
        if offered and opener is None:
            raise ValueError("offering models needs an opener")
        self.created = int(time.time())
        self._offered = list(offered)
        self._opener = opener
        self._paths: dict[str, Path] = {m.name: m.path for m in self._offered}
        start = next((m.name for m in self._offered if _same_file(m.path, engine.target_path)), None)
        if start is None:  # the start model is always offered, under its file's name
            start = engine.model
            self._paths = {start: engine.target_path, **self._paths}
        self._engine: Engine | None = engine
        self._loaded: str | None = start
        self._loading: str | None = None  # during a switch: the model being opened
        self._start = engine
        self._leases = 0
        self._cond = threading.Condition()
        self.switches = 0

    # -- what it offers ----------------------------------------------------------------------------

    @property
    def parallel(self) -> int:
        """Requests the engine serves at once (`Engine.parallel`)."""
        return self._start.parallel

    @property
    def several(self) -> bool:
        """Whether requests choose among models (`--models`)."""
        return bool(self._offered)

    @property
    def loaded(self) -> str | None:
        """The id of the model in memory (None while a switch is under way)."""
        with self._cond:
            return self._loaded

    def ids(self) -> list[str]:
        """Every offered model's id, as /v1/models lists them: the start model first."""
        return list(self._paths)

    def listing(self) -> list[dict[str, Any]]:
        loaded = self.loaded
        return [
            {
                "id": name,
                "object": "model",
                "created": self.created,
                "owned_by": "edgespec",
                **({"edgespec": {"loaded": name == loaded}} if self.several else {}),
            }
            for name in self._paths
        ]

    def choose(self, requested: str | None) -> str:
        """The id of the model a request's `model` field names (see the module).

        Raises:
            APIError: 404 when it names no offered model, 400 when it names several.
        """
        if not self.several or requested is None:
            with self._cond:
                return self._loaded or self._loading or self.ids()[0]
        wanted = requested.strip().lower()
        for name in self._paths:
            if name.lower() == wanted:
                return name
        from edgespec.load import registry

        try:
            found = registry.resolve(requested, self._offered)
        except registry.AmbiguousModelName as exc:
            raise APIError(400, str(exc), param="model", code="model_ambiguous") from None
        except registry.ModelNotFound:
            found = None
        chosen = None if found is None else self._offered_name(found.path)
        if chosen is None:
            raise APIError(
                404,
                f"no model {requested!r} here: this server offers {len(self._paths)} models "
                "(GET /v1/models lists them)",
                param="model",
                code="model_not_found",
            )
        return chosen

    def _offered_name(self, path: Path) -> str | None:
        return next((name for name, p in self._paths.items() if _same_file(p, path)), None)

    # -- the engine ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def lease(self, name: str) -> Iterator[Engine | None]:
        """The engine of model `name` if it is loaded now, kept loaded until the block ends (a
        request reads its tokenizer and template with it); None when another model is loaded."""
        with self._cond:
            engine = self._engine if self._loaded == name else None
            if engine is not None:
                self._leases += 1
        try:
            yield engine
        finally:
            if engine is not None:
                with self._cond:
                    self._leases -= 1
                    self._cond.notify_all()

    def engine_for(self, name: str) -> Engine:
        """The engine of model `name`, loaded now if another one is (by the queue's worker only:
        a switch waits for the leases on the loaded engine to end, then replaces it)."""
        with self._cond:
            if self._loaded == name and self._engine is not None:
                return self._engine
            self._cond.wait_for(lambda: self._leases == 0)
            old, previous = self._engine, self._loaded
            self._engine, self._loaded = None, None  # new leases find nothing loaded
            self._loading = name
        assert self._opener is not None, "a switch needs offered models"
        if old is not None:
            old.close()
        log.info("switching from %s to %s", previous, name)
        try:
            engine = self._opener(self._paths[name])
        except BaseException as exc:
            self._restore(previous, name, exc)
            if isinstance(exc, EdgespecError):
                raise EdgespecError(f"cannot load model {name}: {exc}") from exc
            raise
        with self._cond:
            self._engine, self._loaded, self._loading = engine, name, None
            self.switches += 1
        return engine

    def _restore(self, previous: str | None, failed: str, why: BaseException) -> None:
        """After `failed` would not load, open the model loaded before it again (if that fails
        too, nothing is loaded, and the next request opens its own model)."""
        assert self._opener is not None
        log.warning("cannot load %s: %s; loading %s again", failed, why, previous)
        engine = None
        if previous is not None:
            try:
                engine = self._opener(self._paths[previous])
            except Exception as exc:
                log.error("cannot load %s again: %s", previous, exc)
        with self._cond:
            self._engine, self._loaded, self._loading = engine, previous if engine else None, None

    def close(self) -> None:
        """Close the loaded engine, unless it is the start engine (its caller closes that)."""
        with self._cond:
            engine, self._engine, self._loaded = self._engine, None, None
        if engine is not None and engine is not self._start:
            engine.close()
