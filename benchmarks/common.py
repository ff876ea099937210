"""Helpers shared by the benchmark scripts: prompts, machine description, Markdown output."""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BENCH_QUESTIONS = ROOT.parent / "shared" / "bench" / "spec_bench_question.jsonl"


def spec_bench_prompts(per_category: int = 1, categories: int = 12) -> list[dict]:
    """First turns of Spec-Bench: the first `per_category` prompts of the first `categories` categories."""
    from edgespec.bench.datasets import first_per_category, read_prompts

    chosen = first_per_category(read_prompts(BENCH_QUESTIONS), per_category, categories)
    return [{"id": p.id, "category": p.category, "prompt": p.prompt} for p in chosen]


def machine() -> dict:
    from edgespec.bench.runner import machine_info

    return machine_info()


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def write_json(path: Path, data: dict) -> None:
    """Write atomically: a temporary file beside the target, renamed into place."""
    from edgespec.fileio import write_text_atomic

    write_text_atomic(path, json.dumps(data, indent=2))


def write_run(path: Path, args: Any, **data: Any) -> None:
    """Write a run's results (`write_json`) with the machine and the command line's arguments."""
    write_json(path, {"machine": machine(), "args": {k: str(v) for k, v in vars(args).items()}, **data})


def geomean(values: list[float]) -> float:
    """The geometric mean of the positive values (NaN when there are none)."""
    values = [v for v in values if v > 0]
    return statistics.geometric_mean(values) if values else float("nan")


def stop(proc: subprocess.Popen) -> None:
    """Stop a server as Ctrl-C does (it shuts down cleanly), killing it after a minute."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
