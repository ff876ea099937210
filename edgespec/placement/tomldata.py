"""TOML data files: parse with a one-line error naming the file, check values key by key, write
arrays compactly. Used by the placement profiles (edgespec.placement.profiles)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from typing import Any

from edgespec.errors import ProfileError


def loads(text: str, label: str) -> dict[str, Any]:
    """Parse TOML text; a syntax error becomes a ProfileError naming `label` (the file)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib  # type: ignore[no-redef]

    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProfileError(f"{label}: not valid TOML ({exc})") from None


# tomli_w writes every array one item a line; a `key = [` line, scalar items, then `]`.
_ARRAY = re.compile(r"^(?P<head>[^\n]+ = )\[\n(?P<items>(?:    [^\[\]\n]+,\n)+)\]$", re.MULTILINE)
_ARRAY_WIDTH = 100


def compact_arrays(text: str) -> str:
    """Put an array of scalars on one line when it fits, else pack its items into lines that do."""

    def pack(match: re.Match[str]) -> str:
        head = match["head"]
        items = [line.strip().removesuffix(",") for line in match["items"].splitlines()]
        one_line = f"{head}[{', '.join(items)}]"
        if len(one_line) <= _ARRAY_WIDTH:
            return one_line
        lines, line = [], ""
        for item in items:
            if line and len(line) + len(item) + 2 > _ARRAY_WIDTH:
                lines.append(line)
                line = ""
            line = f"{line} {item}," if line else f"    {item},"
        lines.append(line)
        return head + "[\n" + "\n".join(lines) + "\n]"

    return _ARRAY.sub(pack, text)


def show_value(value: Any) -> str:
    """A value as a user wrote it in TOML: "x", 3, true, [1, 2]."""
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return str(value)


class TomlReader:
    """Checks values of one parsed TOML file; every failure is a ProfileError naming the file and key.

    Args (constructor):
        label: how messages name the file, e.g. "dovetail.toml".
    """

    def __init__(self, label: str) -> None:
        self.label = label

    def fail(self, message: str) -> ProfileError:
        return ProfileError(f"{self.label}: {message}")

    def keys(self, data: dict[str, Any], known: Sequence[str], prefix: str = "") -> None:
        for key in data:
            if key not in known:
                raise self.fail(f"unknown key {prefix}{key} (known: {', '.join(known)})")

    def table(self, data: dict[str, Any], key: str, known: Sequence[str]) -> dict[str, Any]:
        value = data.get(key, {})
        if not isinstance(value, dict):
            raise self.fail(f"{key} must be a table ([{key}]), got {show_value(value)}")
        self.keys(value, known, f"{key}.")
        return value

    def required(self, data: dict[str, Any], key: str, prefix: str = "") -> Any:
        if key not in data:
            raise self.fail(f"missing required key {prefix}{key}")
        return data[key]

    def integer(self, value: Any, key: str, lo: int, hi: int | None = None) -> int:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo
        if hi is not None:
            ok = ok and value <= hi
        if not ok:
            bounds = f"from {lo} to {hi}" if hi is not None else f">= {lo}"
            raise self.fail(f"{key} must be an integer {bounds}, got {show_value(value)}")
        return value

    def boolean(self, value: Any, key: str) -> bool:
        if not isinstance(value, bool):
            raise self.fail(f"{key} must be true or false, got {show_value(value)}")
        return value

    def string(self, value: Any, key: str) -> str:
        if not isinstance(value, str):
            raise self.fail(f"{key} must be a string, got {show_value(value)}")
        return value

    def choice(self, value: Any, key: str, choices: Sequence[str]) -> str:
        if value not in choices or not isinstance(value, str):
            raise self.fail(
                f"{key} must be one of {', '.join(show_value(c) for c in choices)}, got {show_value(value)}"
            )
        return value

    def number(self, value: Any, key: str, lo: float, hi: float | None = None, what: str = "") -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        ok = ok and value >= lo and (hi is None or value < hi)
        if not ok:
            raise self.fail(f"{key} must be {what or f'a number >= {lo}'}, got {show_value(value)}")
        return float(value)

    def numbers(
        self, value: Any, key: str, min_len: int, what: str, positive: bool = False
    ) -> tuple[float, ...]:
        def good(x: Any) -> bool:
            if not isinstance(x, (int, float)) or isinstance(x, bool) or not math.isfinite(x):
                return False
            return x > 0 if positive else 0 <= x <= 1

        if not isinstance(value, list) or len(value) < min_len or not all(good(x) for x in value):
            raise self.fail(f"{key} must be {what}, got {show_value(value)}")
        return tuple(float(x) for x in value)
