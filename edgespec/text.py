"""Turning generated token bytes into streamed text, with stop strings.

Tokens carry bytes, not characters: a multi-byte UTF-8 character may be split across tokens, so
bytes go through an incremental decoder. Text that could be the start of a stop string is held
back until it is clear whether the stop string follows.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class TextStream:
    """Incremental detokenizer with stop strings.

    Args:
        stop: strings that end generation; they and anything after them are not emitted.
    """

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self.stop = tuple(s for s in stop if s)
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._pending = ""
        self.stopped = False

    def feed(self, data: bytes) -> str:
        """Add one token's bytes; return the text that is now safe to emit.

        After a stop string is seen, `stopped` is True and further input is ignored.
        """
        if self.stopped:
            return ""
        self._pending += self._decoder.decode(data)
        if not self.stop:
            out, self._pending = self._pending, ""
            return out
        hits = [i for i in (self._pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            out = self._pending[: min(hits)]
            self._pending = ""
            return out
        hold = self._held_suffix()
        cut = len(self._pending) - hold
        out, self._pending = self._pending[:cut], self._pending[cut:]
        return out

    def _held_suffix(self) -> int:
        """Length of the longest suffix of pending text that is a proper prefix of a stop string."""
        text = self._pending
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def flush(self) -> str:
        """Generation ended without a stop string: emit whatever was held back."""
        if self.stopped:
            return ""
        out = self._pending + self._decoder.decode(b"", final=True)
        self._pending = ""
        return out
