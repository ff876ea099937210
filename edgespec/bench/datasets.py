"""Prompt sets for benchmarks and tests: Spec-Bench-style JSONL files.

One JSON object per line with either `prompt` (a string) or `turns` (a list of user turns), an
optional `category` and an optional id (`question_id` or `id`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from edgespec.errors import EdgespecError


@dataclass(frozen=True)
class BenchPrompt:
    id: str
    category: str
    turns: tuple[str, ...]

    @property
    def prompt(self) -> str:
        """The first turn."""
        return self.turns[0]


def read_prompts(path: str | Path) -> list[BenchPrompt]:
    """Read a JSONL prompt file; a malformed line is an error naming the file and line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise EdgespecError(f"cannot read prompt file {path}: {exc.strerror}") from None
    prompts = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            turns = row["turns"] if "turns" in row else [row["prompt"]]
            if not turns or not all(isinstance(t, str) for t in turns):
                raise ValueError("turns must be a non-empty list of strings")
        except (ValueError, KeyError, TypeError) as exc:
            raise EdgespecError(f"{path}:{number}: not a prompt record ({exc})") from None
        ident = row.get("question_id", row.get("id", number))
        prompts.append(BenchPrompt(str(ident), str(row.get("category", "all")), tuple(turns)))
    return prompts


def first_per_category(
    prompts: list[BenchPrompt], per_category: int, categories: int | None = None
) -> list[BenchPrompt]:
    """The first `per_category` prompts of each category, categories in sorted order (the first
    `categories` of them when given)."""
    by_category: dict[str, list[BenchPrompt]] = {}
    for item in prompts:
        by_category.setdefault(item.category, []).append(item)
    names = sorted(by_category)[:categories]
    return [item for name in names for item in by_category[name][:per_category]]


SPEC_BENCH_ENV = "EDGESPEC_SPEC_BENCH"


def spec_bench_path() -> Path:
    """The Spec-Bench question file: `$EDGESPEC_SPEC_BENCH`, else `shared/bench/` beside the checkout."""
    override = os.environ.get(SPEC_BENCH_ENV)
    candidates = [Path(override)] if override else []
    candidates.append(Path(__file__).resolve().parents[2] / "shared" / "bench" / "spec_bench_question.jsonl")
    candidates.append(Path.cwd().parent / "shared" / "bench" / "spec_bench_question.jsonl")
    for path in candidates:
        if path.is_file():
            return path
    raise EdgespecError(
        f"Spec-Bench prompts not found (looked at {', '.join(map(str, candidates))}); "
        f"set {SPEC_BENCH_ENV} or pass --dataset FILE.jsonl"
    )


def last_per_category(prompts: list[BenchPrompt], per_category: int) -> list[BenchPrompt]:
    """The last `per_category` prompts of each category (disjoint from `first_per_category` while
    the two counts add up to at most a category's size): calibration data that a benchmark of the
    first prompts does not see."""
    by_category: dict[str, list[BenchPrompt]] = {}
    for item in prompts:
        by_category.setdefault(item.category, []).append(item)
    return [item for name in sorted(by_category) for item in by_category[name][-per_category:]]


def held_out(prompts: list[BenchPrompt], holdout: int) -> list[BenchPrompt]:
    """Every prompt except the first `holdout` of each category (the ones a benchmark with
    `--per-category holdout` or fewer runs), in file order."""
    seen: dict[str, int] = {}
    kept = []
    for item in prompts:
        seen[item.category] = seen.get(item.category, 0) + 1
        if seen[item.category] > holdout:
            kept.append(item)
    return kept
