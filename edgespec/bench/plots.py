"""PNG plots of a bench result (matplotlib, the `plot` extra): speed-up per category, τ against k."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from edgespec.fileio import atomic_path

if TYPE_CHECKING:
    from edgespec.bench.runner import BenchResult


def _save(figure, path: Path) -> Path:  # type: ignore[no-untyped-def]
    with atomic_path(path, suffix=".png") as tmp:  # matplotlib picks the format from the suffix
        figure.savefig(tmp, dpi=120, bbox_inches="tight")
    return path


def write_plots(result: BenchResult, directory: Path) -> list[Path]:
    """Write speedup_by_category.png and tau_vs_k.png into `directory`; return their paths.

    Raises:
        ModuleNotFoundError: matplotlib is not installed (pip install "edgespec[plot]").
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from edgespec.bench.runner import summarize

    directory.mkdir(parents=True, exist_ok=True)
    categories = sorted({r["category"] for r in result.records})
    labels = [c.label for c in result.configs if c.drafter != "none"]
    written = []

    figure, axes = plt.subplots(figsize=(max(6, len(categories) * 0.9), 4))
    width = 0.8 / max(1, len(labels))
    for i, label in enumerate(labels):
        values = []
        for category in categories:
            row = next((s for s in summarize(result, category) if s["config"] == label), None)
            values.append(row["speedup_geomean"] if row else 0.0)
        axes.bar([c + i * width for c in range(len(categories))], values, width, label=label)
    axes.axhline(1.0, color="black", linewidth=0.8)
    axes.set_xticks([c + width * (len(labels) - 1) / 2 for c in range(len(categories))])
    axes.set_xticklabels(categories, rotation=30, ha="right")
    axes.set_ylabel("speed-up over target-only (geometric mean)")
    axes.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: bars reach up to the legend
    written.append(_save(figure, directory / "speedup_by_category.png"))
    plt.close(figure)

    figure, axes = plt.subplots(figsize=(5, 4))
    for kind in ("draft", "ngram"):
        points = sorted(
            (c.k, s["tau"])
            for c in result.configs
            if c.drafter == kind
            for s in summarize(result)
            if s["config"] == c.label
        )
        if points:
            axes.plot([k for k, _ in points], [t for _, t in points], marker="o", label=f"{kind} drafter")
    axes.set_xlabel("k (draft tokens per step)")
    axes.set_ylabel("τ (tokens per target pass)")
    axes.legend()
    written.append(_save(figure, directory / "tau_vs_k.png"))
    plt.close(figure)
    return written
