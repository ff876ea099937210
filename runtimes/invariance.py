"""The invariance probe: is a batched pass row-for-row identical to single-token decoding here?

The `exact` guarantee (speculative output token-identical to target-only decoding) holds only if
every row of a verification pass is computed bit for bit as single-token decoding computes it,
and if the keys and values such a pass writes are the ones single steps would have written.
Whether llama.cpp's kernels do that depends on the backend, the weights' types, the KV cache's
types, the batch size, the number of cells in the cache and the build, so it is measured on the
loaded model rather than assumed.

For each candidate KV configuration (flash attention on; K and V types), at a short context and
at one past 512 cells (where single-query attention changes path), the probe decodes a few tokens
one at a time, then evaluates the same tokens as one batch of m rows for m = 2 … MAX_ROWS and
compares every row, and the single step that follows the batch, bit for bit. A candidate's
`max_rows` is the largest m such that every size up to m matched; a candidate passes with
max_rows >= 2 (a verification pass of one row verifies nothing). Among passing candidates the one
with the fastest single-token step at the long context is chosen.

Results are cached per model file, llama.cpp build, placement and threads, so a model is probed
once; `probe_or_load` reads and writes that cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal, overload

import llama_cpp as _ll
import numpy as np

from edgespec.runtimes.native import NativeThread, for_layers

logger = logging.getLogger("edgespec")

#: cache types by name, as ggml numbers them
GGML_TYPES = {"f32": 0, "f16": 1, "q8_0": 8, "bf16": 30}
#: (type_k, type_v) tried, in this order. Equal types let llama.cpp take its split and tiled
#: attention paths (usually not row-invariant); mixed types keep attention on the per-row path.
CANDIDATES: tuple[tuple[str, str], ...] = (("f16", "f16"), ("f16", "bf16"), ("bf16", "f16"))
#: the largest batch tried
MAX_ROWS = 8
#: cells in the cache for the two contexts probed: short, and past llama.cpp's 512-cell threshold
CONTEXTS = (16, 520)
#: single steps timed per passing candidate
TIMED_STEPS = 6
#: version of the probe's method; a cached result from another version is probed again
PROBE_VERSION = 1


@dataclass(frozen=True)
class CandidateResult:
    """One KV configuration's outcome.

    Attributes:
        type_k, type_v: cache types.
        max_rows: largest batch size m with every size 1 … m row-identical to single steps, at
            every context probed (1 when no batch matched; 0 when the context could not be made).
        step_ms: median single-token step at the long context (None when it did not pass).
        reason: why it failed ("" when it passed).
    """

    type_k: str
    type_v: str
    max_rows: int
    step_ms: float | None
    reason: str = ""

    @property
    def passed(self) -> bool:
        return self.max_rows >= 2


@dataclass(frozen=True)
class ProbeResult:
    """Every candidate's outcome and the chosen one (None when none passed)."""

    candidates: tuple[CandidateResult, ...]
    chosen: CandidateResult | None
    backend: str

    @property
    def passed(self) -> bool:
        return self.chosen is not None

    def failure(self) -> str:
        """One line saying why no configuration is exact here."""
        parts = "; ".join(f"K {c.type_k}/V {c.type_v}: {c.reason}" for c in self.candidates)
        return f"no row-invariant kernel configuration on this backend ({self.backend}): {parts}"

    def summary(self) -> str:
        """One line: the chosen configuration (or the failure)."""
        if self.chosen is None:
            return self.failure()
        c = self.chosen
        return f"exact: K {c.type_k}, V {c.type_v}, verification pieces of at most {c.max_rows} rows"

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PROBE_VERSION,
            "backend": self.backend,
            "candidates": [asdict(c) for c in self.candidates],
            "chosen": None if self.chosen is None else asdict(self.chosen),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProbeResult:
        candidates = tuple(CandidateResult(**c) for c in data["candidates"])
        chosen = None if data.get("chosen") is None else CandidateResult(**data["chosen"])
        return cls(candidates=candidates, chosen=chosen, backend=str(data["backend"]))


def _context(model: Any, n_ctx: int, threads: int, threads_batch: int, kv: tuple[str, str]) -> Any:
    params = _ll.llama_context_default_params()
    params.n_ctx = n_ctx
    params.n_batch = 512
    params.n_ubatch = 512
    params.n_seq_max = 1
    params.n_threads = threads
    params.n_threads_batch = threads_batch
    params.flash_attn_type = _ll.LLAMA_FLASH_ATTN_TYPE_ENABLED
    params.type_k = GGML_TYPES[kv[0]]
    params.type_v = GGML_TYPES[kv[1]]
    params.no_perf = True
    return _ll.llama_init_from_model(model, params)


class _Probe:
    """One candidate's context, with helpers to decode at given positions."""

    def __init__(self, ctx: Any, n_vocab: int, native: NativeThread) -> None:
        self.ctx = ctx
        self.mem = _ll.llama_get_memory(ctx)
        self.n_vocab = n_vocab
        self.batch = _ll.llama_batch_init(512, 0, 1)
        # decoded on the thread the runtime will decode on (`edgespec.runtimes.native`): no
        # OpenMP team is left behind in the caller's thread
        self.native = native

    def close(self) -> None:
        _ll.llama_batch_free(self.batch)
        _ll.llama_free(self.ctx)

    @overload
    def decode(self, tokens: Sequence[int], start: int, rows: Literal[True]) -> np.ndarray: ...
    @overload
    def decode(self, tokens: Sequence[int], start: int, rows: Literal[False]) -> None: ...
    def decode(self, tokens: Sequence[int], start: int, rows: bool) -> np.ndarray | None:
        """Evaluate tokens at positions start…; with `rows`, a copy of every row's logits."""
        b = self.batch
        for i, token in enumerate(tokens):
            b.token[i] = token
            b.pos[i] = start + i
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = 0
            b.logits[i] = rows
        b.n_tokens = len(tokens)
        status = self.native.call(_ll.llama_decode, self.ctx, b)
        if status != 0:
            raise RuntimeError(f"llama_decode failed with status {status}")
        if not rows:
            return None
        ptr = _ll.llama_get_logits_ith(self.ctx, 0)
        return np.ctypeslib.as_array(ptr, shape=(len(tokens), self.n_vocab)).copy()

    def forget_from(self, n: int) -> None:
        _ll.llama_memory_seq_rm(self.mem, 0, n, -1)


def _max_rows_at(probe: _Probe, tokens: Sequence[int], n_cells: int) -> int:
    """Largest m with every batch size 1 … m row-identical to single steps after n_cells tokens."""
    probe.forget_from(0)
    for start in range(0, n_cells, 512):
        probe.decode(tokens[start : min(start + 512, n_cells)], start, rows=False)
    run = tokens[n_cells : n_cells + MAX_ROWS + 1]
    reference = np.concatenate([probe.decode([t], n_cells + i, rows=True) for i, t in enumerate(run)])
    best = 1
    for m in range(2, MAX_ROWS + 1):
        probe.forget_from(n_cells)
        batch = probe.decode(run[:m], n_cells, rows=True)
        after = probe.decode(run[m : m + 1], n_cells + m, rows=True)
        if not (np.array_equal(batch, reference[:m]) and np.array_equal(after, reference[m : m + 1])):
            break
        best = m
    probe.forget_from(n_cells)
    return best


def _step_ms(probe: _Probe, tokens: Sequence[int], n_cells: int) -> float:
    samples = []
    for i in range(TIMED_STEPS + 1):
        probe.forget_from(n_cells)
        start = time.perf_counter()
        probe.decode(tokens[n_cells + i : n_cells + i + 1], n_cells, rows=True)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples[1:]) * 1000  # the first step builds the graph


def probe_tokens(n_vocab: int, count: int) -> list[int]:
    """Ordinary token ids to probe with (fixed, so that a probe is reproducible)."""
    rng = np.random.default_rng(20261206)
    return rng.integers(min(n_vocab - 1, 100), n_vocab, size=count).tolist() if n_vocab > 1 else [0] * count


def probe(
    model: Any,
    *,
    gpu_layers: int,
    threads: int,
    threads_batch: int,
    candidates: Sequence[tuple[str, str]] = CANDIDATES,
) -> ProbeResult:
    """Probe a loaded llama.cpp model (a `llama_model` pointer) for row-invariant configurations.

    Args:
        model: the loaded model, placed (GPU layers) as it will run.
        gpu_layers: how many of its layers are on a GPU (for the report).
        threads, threads_batch: as the runtime will use them (they change how work is split).
        candidates: (type_k, type_v) pairs to try.
    """
    vocab = _ll.llama_model_get_vocab(model)
    n_vocab = int(_ll.llama_vocab_n_tokens(vocab))
    tokens = probe_tokens(n_vocab, max(CONTEXTS) + MAX_ROWS + TIMED_STEPS + 2)
    n_ctx = 1024
    native, own = for_layers(gpu_layers)
    try:
        results = _probe_candidates(model, native, tokens, n_vocab, n_ctx, threads, threads_batch, candidates)
    finally:
        if own:
            native.stop()
    passing = [c for c in results if c.passed]
    chosen = min(passing, key=lambda c: c.step_ms or 0.0) if passing else None
    return ProbeResult(tuple(results), chosen, backend_name(gpu_layers))


def _probe_candidates(
    model: Any,
    native: NativeThread,
    tokens: Sequence[int],
    n_vocab: int,
    n_ctx: int,
    threads: int,
    threads_batch: int,
    candidates: Sequence[tuple[str, str]],
) -> list[CandidateResult]:
    results = []
    for kv in candidates:
        ctx = _context(model, n_ctx, threads, threads_batch, kv)
        if not ctx:
            results.append(CandidateResult(kv[0], kv[1], 0, None, "llama.cpp could not create this context"))
            continue
        p = _Probe(ctx, n_vocab, native)
        try:
            rows = [_max_rows_at(p, tokens, n) for n in CONTEXTS]
            max_rows = min(rows)
            if max_rows >= 2:
                results.append(
                    CandidateResult(kv[0], kv[1], max_rows, round(_step_ms(p, tokens, CONTEXTS[-1]), 3))
                )
            else:
                where = " and ".join(f"{n}" for n, r in zip(CONTEXTS, rows, strict=True) if r < 2)
                results.append(
                    CandidateResult(
                        kv[0], kv[1], max_rows, None, f"a 2-row batch differs after {where} cells"
                    )
                )
        except RuntimeError as exc:
            results.append(CandidateResult(kv[0], kv[1], 0, None, str(exc)))
        finally:
            p.close()
    return results


def backend_name(gpu_layers: int) -> str:
    """Where the target's layers run, in words: "CPU", or the GPU backend llama.cpp was built with."""
    if gpu_layers == 0 or not _ll.llama_supports_gpu_offload():
        return "CPU"
    info = _ll.llama_print_system_info()
    text = info.decode("utf-8", "replace") if isinstance(info, bytes) else str(info)
    for name in ("CUDA", "Metal", "Vulkan", "SYCL", "HIP"):
        if name in text:
            return name
    return "GPU"


def cache_key(path: Path, gpu_layers: int, threads: int, threads_batch: int) -> str:
    """What a probe result depends on: the file, the llama.cpp build and CPU, placement, threads."""
    stat = path.stat()
    info = _ll.llama_print_system_info()
    parts = [
        f"v{PROBE_VERSION}",
        str(path.resolve()),
        str(stat.st_size),
        str(stat.st_mtime_ns),
        str(getattr(_ll, "__version__", "")),
        info.decode("utf-8", "replace") if isinstance(info, bytes) else str(info),
        str(gpu_layers),
        str(threads),
        str(threads_batch),
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:20]


def probe_or_load(
    model: Any,
    path: Path,
    *,
    gpu_layers: int,
    threads: int,
    threads_batch: int,
    cache_dir: Path | None,
) -> ProbeResult:
    """The cached probe result for this model and placement, or a fresh probe (then cached).

    A cache that cannot be written is reported as a warning on the "edgespec" logger: the probe
    is then repeated on the next load.
    """
    key = cache_key(path, gpu_layers, threads, threads_batch)
    file = cache_dir / f"{key}.json" if cache_dir is not None else None
    if file is not None and file.is_file():
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            data = json.loads(file.read_text(encoding="utf-8"))
            if data.get("version") == PROBE_VERSION:
                return ProbeResult.from_dict(data)
    result = probe(model, gpu_layers=gpu_layers, threads=threads, threads_batch=threads_batch)
    if file is not None:
        try:
            file.parent.mkdir(parents=True, exist_ok=True)
            tmp = file.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(result.to_dict(), indent=1), encoding="utf-8")
            os.replace(tmp, file)
        except OSError as exc:
            logger.warning(f"could not save the invariance probe's result in {file.parent}: {exc.strerror}")
    return result
