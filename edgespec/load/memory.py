"""RAM for models: refuse, before loading, a model that cannot run in the memory this machine has.

`memory_need()` estimates from a GGUF file's size and metadata what a model needs in RAM;
`check_memory()` compares the needs of the models to load together with the available RAM and
refuses with one line giving both numbers. `EDGESPEC_SKIP_MEMORY_CHECK=1` loads anyway.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgespec.errors import ModelLoadError
from edgespec.fileio import size_text
from edgespec.placement.profiles import model_bytes

SKIP_MEMORY_CHECK_ENV = "EDGESPEC_SKIP_MEMORY_CHECK"
KV_BYTES = 2  # per cached value: the K and V caches are F16/BF16 with either kernel choice


@dataclass(frozen=True)
class MemoryNeed:
    """The RAM a model needs to run at speed, estimated from its file before it is loaded.

    llama.cpp maps the file into memory rather than reading it, but every generated token reads
    every weight, so weights that do not stay in RAM are read from disk again and again (a process
    that seems to hang). Compute buffers (up to a few hundred MiB for a 150k-token vocabulary) are
    left out: the estimate is a lower bound, so that no model that could run is refused.

    Attributes:
        path: the model file (or ONNX export folder).
        weights: bytes of weights kept in RAM: the file's size, less the share of layers
            offloaded to a usable GPU.
        kv_cache: bytes of the KV cache for `n_ctx` tokens in RAM (0 when the metadata does not
            say: an ONNX model, or an architecture without the usual keys).
        n_ctx: the context size it was estimated for.
    """

    path: Path
    weights: int
    kv_cache: int
    n_ctx: int

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache


def memory_need(path: Path, n_ctx: int, gpu_layers: int = 0, gpu_usable: bool = False) -> MemoryNeed | None:
    """Estimate what loading the GGUF `path` with a context of `n_ctx` tokens needs in RAM.

    KV cache = 2 bytes x layers x n_ctx x KV heads x (key length + value length), from the GGUF
    metadata. With `gpu_layers` on a usable GPU (-1: all), that share of the layers' weights and
    cache is left out.

    Returns:
        The estimate, or None when the file cannot be sized (missing, not GGUF, damaged header):
        loading it then fails with the reason.
    """
    from edgespec.formats.gguf import check_gguf

    if path.is_dir() or path.suffix == ".onnx":  # an ONNX drafter: its files, no GGUF metadata
        return MemoryNeed(path, model_bytes(path), 0, n_ctx) if path.exists() else None
    try:
        size = path.stat().st_size
        meta = check_gguf(path).metadata  # the header is walked once per unchanged file (cached)
    except (OSError, ModelLoadError):
        return None
    arch = meta.get("general.architecture")

    def positive(key: str) -> int | None:
        value = meta.get(f"{arch}.{key}")
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None

    n_layer = positive("block_count")
    n_head = positive("attention.head_count")
    n_embd = positive("embedding_length")
    n_head_kv = positive("attention.head_count_kv") or n_head
    k_len = positive("attention.key_length") or (n_embd // n_head if n_embd and n_head else None)
    v_len = positive("attention.value_length") or k_len
    kv = (
        KV_BYTES * n_layer * n_ctx * n_head_kv * (k_len + v_len)
        if n_layer and n_head_kv and k_len and v_len
        else 0
    )
    cpu_share = 1.0
    if gpu_usable and gpu_layers != 0 and n_layer:
        offloaded = n_layer if gpu_layers < 0 else min(gpu_layers, n_layer)
        cpu_share = (n_layer - offloaded) / n_layer
    return MemoryNeed(path, round(size * cpu_share), round(kv * cpu_share), n_ctx)


def memory_check_skipped() -> bool:
    """`EDGESPEC_SKIP_MEMORY_CHECK` is set to something other than "", "0", "false" or "no"."""
    return os.environ.get(SKIP_MEMORY_CHECK_ENV, "").strip().lower() not in ("", "0", "false", "no")


def check_memory(needs: Sequence[MemoryNeed | None], available: int | None = None) -> None:
    """Refuse, before loading, models whose weights and KV caches do not fit the available RAM.

    Args:
        needs: the models to load together (None entries, models that could not be sized, are
            left out).
        available: bytes of RAM available (default: psutil's `virtual_memory().available`, which
            counts memory the system can free at once, such as its file cache).

    Raises:
        ModelLoadError: one line with both numbers and what to do, unless
            `EDGESPEC_SKIP_MEMORY_CHECK=1` says to load anyway.
    """
    known = [n for n in needs if n is not None]
    if not known or memory_check_skipped():
        return
    if available is None:
        import psutil

        available = int(psutil.virtual_memory().available)
    total = sum(n.total for n in known)
    if total <= available:
        return
    if len(known) == 1:
        need = known[0]
        parts = f"{size_text(need.weights)} of weights"
        if need.kv_cache:
            parts += f" + {size_text(need.kv_cache)} of KV cache for {need.n_ctx} tokens"
        what = f"{need.path.name} needs about {size_text(total)} ({parts})"
    else:
        names = " and ".join(n.path.name for n in known)
        each = " + ".join(size_text(n.total) for n in known)
        what = (
            f"{names} need about {size_text(total)} together ({each}: weights and KV caches for "
            f"{known[0].n_ctx} tokens)"
        )
    raise ModelLoadError(
        f"not enough memory: {what}, and only {size_text(available)} of RAM is available; close other "
        "applications, or use a smaller model or quantization, a smaller context (--ctx) or GPU offload "
        f"(--gpu-layers); set {SKIP_MEMORY_CHECK_ENV}=1 to load anyway"
    )
