"""Helpers shared by several test modules, so that no test module imports another."""

from __future__ import annotations

from pathlib import Path

from hypothesis import strategies as st

from edgespec.placement.hardware import GpuDevice, Hardware

from .conftest import tiny_model_args


def assert_one_line_error(result, pattern: str) -> None:
    """A CLI failure as users see it: non-zero exit, no traceback, one `error: ...` line."""
    assert result.exit_code != 0
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert pattern in lines[0], lines[0]


def machine(*gpus: GpuDevice, offload: bool | None = None, **changes) -> Hardware:
    """A described machine: 8 cores, 32 GB, and the given GPUs."""
    values = dict(
        cpu_model="Test CPU",
        physical_cores=8,
        logical_cores=16,
        total_ram_mib=32_000,
        available_ram_mib=20_000,
        llama_backends=("CUDA", "CPU") if gpus else ("CPU",),
        gpu_offload=bool(gpus) if offload is None else offload,
        gpus=gpus,
        nvidia_smi="not run" if gpus else "not found",
    )
    values.update(changes)
    return Hardware(**values)


def cuda(free_mib: int | None, name: str = "NVIDIA Test GPU") -> GpuDevice:
    return GpuDevice("CUDA", name, 80_000, free_mib, "llama.cpp", device="CUDA0")


def bench_args(tiny_pair: tuple[Path, Path], dataset: Path, out: Path, *extra: str) -> list[str]:
    """`edgespec bench` on the tiny pair, 12 tokens a prompt."""
    return [
        "bench",
        "--dataset",
        str(dataset),
        *tiny_model_args(tiny_pair),
        "--max-tokens",
        "12",
        "--out",
        str(out),
        *extra,
    ]


def fast_model_args(tiny_pair: tuple[Path, Path], *, draft: str = "none") -> list[str]:
    """CLI options for the tiny target on one thread with fast kernels (no invariance probe): the
    quickest run, for tests about input handling rather than output."""
    return [
        "--target",
        str(tiny_pair[0]),
        "--draft",
        draft,
        "--threads",
        "1",
        "--ctx",
        "256",
        "--kernels",
        "fast",
    ]


#: any code point (controls, private use, unassigned, astral planes), with lone surrogates and
#: control characters drawn often
ANY_CHAR = st.one_of(
    st.characters(min_codepoint=0, max_codepoint=0x10FFFF, exclude_categories=()),
    st.integers(0xD800, 0xDFFF).map(chr),
    st.sampled_from("\x00\x07\x1b\r\t\x7f\u2028\u202e\ufeff"),
)
HOSTILE_TEXT = st.text(ANY_CHAR, max_size=40)


def has_utf8_form(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
