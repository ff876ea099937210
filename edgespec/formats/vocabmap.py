"""A drafter whose vocabulary is a subset of the target's (VocabTrim), and the map between them.

A trimmed drafter has N tokens: trimmed id i is target id `keep[i]` (kept ids in ascending target
order). Its LM head has only those N rows, so a drafted token is always a target token. Going the
other way, every target id has an input id in the drafter (`input_map`): kept ids map to
themselves, and a dropped id maps to the kept token whose text is its longest prefix (byte tokens
are always kept, so one exists). The drafter then reads a close stand-in for a token it cannot
embed; the target still verifies every token, so output is unchanged, and only acceptance can
suffer (measured in BENCHMARKS.md).

The map travels inside the drafter's GGUF as metadata (keys below), or for an ONNX export in a
`vocab_map.json` beside the model.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgespec.errors import IncompatibleModelsError, ModelLoadError
from edgespec.formats.gguf import check_gguf

PREFIX = "edgespec.vocab_trim."
KEY_KEEP = PREFIX + "keep"  # int32[N]: target id of each trimmed id
KEY_INPUT_MAP = PREFIX + "input_map"  # int32[target n_vocab]: trimmed id to feed for each target id
KEY_TARGET_N_VOCAB = PREFIX + "target_n_vocab"
KEY_SOURCE_SHA256 = PREFIX + "source_sha256"
KEY_TARGET_SHA256 = PREFIX + "target_sha256"
KEY_FREQUENCIES = PREFIX + "frequency_source"
SIDECAR_NAME = "vocab_map.json"


@dataclass(frozen=True)
class VocabMap:
    """Ids of a trimmed drafter in terms of its target's.

    Attributes:
        keep: int32 array (N,): the target id of each drafter id, strictly increasing.
        input_map: int32 array (target_n_vocab,): the drafter id fed for each target id.
        source_sha256, target_sha256: hashes of the untrimmed drafter and of the target the
            frequencies came from (provenance; fit is checked on token texts at load).
    """

    keep: np.ndarray
    input_map: np.ndarray
    source_sha256: str = ""
    target_sha256: str = ""
    frequency_source: str = ""

    def __post_init__(self) -> None:
        keep, input_map = self.keep, self.input_map
        if keep.ndim != 1 or input_map.ndim != 1 or len(keep) == 0:
            raise ModelLoadError("vocabulary map: keep and input_map must be non-empty 1-D arrays")
        if np.any(np.diff(keep) <= 0):
            raise ModelLoadError("vocabulary map: kept ids are not strictly increasing")
        if keep[0] < 0 or keep[-1] >= len(input_map):
            raise ModelLoadError(
                f"vocabulary map: kept id {int(keep[-1])} is outside the target vocabulary "
                f"of {len(input_map)}"
            )
        if input_map.min() < 0 or input_map.max() >= len(keep):
            raise ModelLoadError("vocabulary map: an input id is outside the trimmed vocabulary")
        if not np.array_equal(input_map[keep], np.arange(len(keep))):
            raise ModelLoadError("vocabulary map: a kept token does not map to itself")

    @property
    def n_keep(self) -> int:
        return len(self.keep)

    @property
    def target_n_vocab(self) -> int:
        return len(self.input_map)

    def to_draft(self, tokens: list[int] | np.ndarray) -> list[int]:
        """Target ids → drafter input ids (dropped ids become their stand-ins)."""
        return self.input_map[np.asarray(tokens, dtype=np.int64)].tolist()

    def to_target(self, token: int) -> int:
        return int(self.keep[token])

    def metadata(self) -> dict[str, object]:
        """GGUF metadata entries (arrays as int32)."""
        return {
            KEY_KEEP: self.keep.astype(np.int32),
            KEY_INPUT_MAP: self.input_map.astype(np.int32),
            KEY_TARGET_N_VOCAB: self.target_n_vocab,
            KEY_SOURCE_SHA256: self.source_sha256,
            KEY_TARGET_SHA256: self.target_sha256,
            KEY_FREQUENCIES: self.frequency_source,
        }

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> VocabMap | None:
        """The map stored in a GGUF file's metadata, or None for an untrimmed model.

        The header is read by `check_gguf` (bounded, and cached while the file is unchanged), so a
        file it refuses raises its one-line ModelLoadError here too.
        """
        header = check_gguf(path)
        fields = {**header.metadata, **header.arrays}
        if KEY_KEEP not in fields:
            return None
        for key in (KEY_INPUT_MAP,):
            if key not in fields:
                raise ModelLoadError(f"{path}: trimmed drafter lacks metadata {key}")
        return cls(
            # copies: the header's arrays are shared by every reader of the file
            keep=np.array(fields[KEY_KEEP], dtype=np.int32),
            input_map=np.array(fields[KEY_INPUT_MAP], dtype=np.int32),
            source_sha256=str(fields.get(KEY_SOURCE_SHA256, "")),
            target_sha256=str(fields.get(KEY_TARGET_SHA256, "")),
            frequency_source=str(fields.get(KEY_FREQUENCIES, "")),
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "keep": self.keep.tolist(),
                "input_map": self.input_map.tolist(),
                "source_sha256": self.source_sha256,
                "target_sha256": self.target_sha256,
                "frequency_source": self.frequency_source,
            }
        )

    @classmethod
    def from_json_file(cls, path: str | os.PathLike[str]) -> VocabMap:
        try:
            data = json.loads(Path(path).read_text())
            return cls(
                keep=np.asarray(data["keep"], dtype=np.int32),
                input_map=np.asarray(data["input_map"], dtype=np.int32),
                source_sha256=str(data.get("source_sha256", "")),
                target_sha256=str(data.get("target_sha256", "")),
                frequency_source=str(data.get("frequency_source", "")),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(f"cannot read the vocabulary map {path}: {exc}") from exc

    def check_target_size(self, target_n_vocab: int, names: str) -> None:
        """Raise unless this map was made for a vocabulary of `target_n_vocab` tokens."""
        if self.target_n_vocab != target_n_vocab:
            raise IncompatibleModelsError(
                f"{names}: the drafter was trimmed for a target with {self.target_n_vocab} tokens, "
                f"this target has {target_n_vocab}"
            )

    def check_fits(self, target_text, draft_text, names: str) -> None:
        """Raise unless every kept token has the same text in the drafter as in the target.

        Args:
            target_text, draft_text: callables id → raw token text, of the target and the drafter.
        """
        for i, token in enumerate(self.keep.tolist()):
            if target_text(token) != draft_text(i):
                raise IncompatibleModelsError(
                    f"{names}: trimmed token {i} should be target token {token} "
                    f"({target_text(token).decode('utf-8', 'replace')!r}) but is "
                    f"{draft_text(i).decode('utf-8', 'replace')!r}"
                )
