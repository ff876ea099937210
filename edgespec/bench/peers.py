"""Other runtimes' speculative decoding, run on the same prompts and models for comparison.

Peers run with their own defaults (llama.cpp's fast kernels), so their output is compared with
edgespec's target-only output for information only: a difference there is not an edgespec failure.
A peer that cannot run here is reported as skipped, with the reason.
"""

from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SPECULATIVE_SIMPLE = "llama-speculative-simple"
#: llama.cpp's speculative modes run as peers: its three n-gram modes (their own defaults: e.g.
#: ngram-simple looks up 12-token n-grams and drafts up to 48) and its draft-model mode
SPEC_TYPES = ("ngram-simple", "ngram-map-k", "ngram-mod", "draft-simple")
_DECODED = re.compile(r"decoded\s+(\d+)\s+tokens in\s+([\d.]+)\s+seconds, speed:\s+([\d.]+)\s+t/s")
_ACCEPT = re.compile(r"accept\s*=\s*([\d.]+)%")


@dataclass(frozen=True)
class PeerPrompt:
    """One prompt as edgespec ran it: its formatted text and tokens, and target-only's answer."""

    id: str
    text: str
    tokens: list[int]
    reference: list[int]


def _skipped(name: str, reason: str, status: str = "skipped") -> dict[str, Any]:
    return {"name": name, "status": status, "notes": reason, "tokens_per_s_median": None, "runs": []}


def all_skipped(k: int, reason: str) -> list[dict[str, Any]]:
    """Every peer, listed as skipped for one reason."""
    return [
        _skipped(lookup_name(k), reason),
        *(_skipped(simple_name(k, spec_type), reason) for spec_type in SPEC_TYPES),
    ]


def guarded(name: str, run: Any) -> dict[str, Any]:
    """Run one peer; its own failure (another project's code) is reported as a result, not raised."""
    try:
        return run()
    except Exception as exc:  # any failure of a peer is reported in the table
        return _skipped(name, f"{type(exc).__name__}: {exc}".splitlines()[0], status="failed")


def llama_cpp_python_lookup(
    target_path: Path,
    prompts: Sequence[PeerPrompt],
    *,
    max_tokens: int,
    k: int,
    threads: int,
    eog: frozenset[int],
) -> dict[str, Any]:
    """llama-cpp-python's own prompt-lookup speculation: `Llama(draft_model=LlamaPromptLookupDecoding)`.

    Greedy (`temp=0, top_k=1`, no repetition penalty); tokens/s is measured like edgespec's:
    tokens after the first over the time after the first. A prompt on which llama-cpp-python
    raises (0.3.36 does on prompts longer than its 512-token batch) is recorded as a failed run
    with the error, and the other prompts are still measured.
    """
    name = lookup_name(k)
    try:
        import llama_cpp
        from llama_cpp.llama_speculative import LlamaPromptLookupDecoding
    except ImportError as exc:  # pragma: no cover - llama-cpp-python is a dependency
        return _skipped(name, f"llama-cpp-python not importable: {exc}")
    # A multiple of 256: llama.cpp rounds the context up to one, and llama-cpp-python bounds its loop
    # by that rounded size while its logits table has only the rows asked for.
    n_ctx = -(-(max(len(p.tokens) for p in prompts) + max_tokens + 16) // 256) * 256
    from edgespec.runtimes.native import cpu_thread

    # On the thread edgespec's contexts compute on, as the yardstick (`edgespec.bench.yardstick`):
    # one OpenMP team in the process.
    native = cpu_thread()
    # draft_model forces logits_all=True: an n_ctx x n_vocab table, so keep n_ctx to what is needed.
    llm = native.call(
        lambda: llama_cpp.Llama(
            model_path=str(target_path),
            n_ctx=n_ctx,
            n_threads=threads,
            n_threads_batch=threads,
            draft_model=LlamaPromptLookupDecoding(num_pred_tokens=k),
            verbose=False,
        )
    )
    runs: list[dict[str, Any]] = []

    def run_all() -> None:
        for prompt in prompts:
            llm.reset()
            out: list[int] = []
            first = end = time.perf_counter()
            try:
                for token in llm.generate(prompt.tokens, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0):
                    end = time.perf_counter()
                    if not out:
                        first = end
                    if token in eog:
                        break
                    out.append(token)
                    if len(out) >= max_tokens:
                        break
            except Exception as exc:  # a bug inside the peer on this prompt: record it, go on
                error = f"{type(exc).__name__}: {exc}".splitlines()[0]
                runs.append({"prompt_id": prompt.id, "tokens_per_second": None, "error": error})
                continue
            tps = (len(out) - 1) / (end - first) if len(out) > 1 and end > first else 0.0
            runs.append(
                {
                    "prompt_id": prompt.id,
                    "tokens": len(out),
                    "tokens_per_second": tps,
                    "identical_to_target_only": out == prompt.reference,
                }
            )

    try:
        native.call(run_all)
    finally:
        native.call(llm.close)
    return lookup_summary(name, runs)


def lookup_name(k: int) -> str:
    return f"llama-cpp-python prompt lookup (num_pred_tokens={k})"


def simple_name(k: int, spec_type: str = "draft-simple") -> str:
    if spec_type == "draft-simple":
        return f"llama.cpp {SPECULATIVE_SIMPLE} --spec-type draft-simple (--spec-draft-n-max {k})"
    return f"llama.cpp {SPECULATIVE_SIMPLE} --spec-type {spec_type}"


def lookup_summary(name: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The prompt-lookup peer's entry from its per-prompt runs (also used to merge bench runs)."""
    done = [r for r in runs if r.get("error") is None]
    failed = [r for r in runs if r.get("error") is not None]
    same = sum(r["identical_to_target_only"] for r in done)
    notes = [f"output equal to edgespec target-only on {same}/{len(done)} prompts"] if done else []
    if failed:
        notes.append(
            f"failed inside llama-cpp-python on {len(failed)}/{len(runs)} prompts "
            f"({', '.join(r['prompt_id'] for r in failed)}): {failed[0]['error']}"
        )
    return {
        "name": name,
        "status": "ran" if done else "failed",
        "runs": runs,
        "tokens_per_s_median": statistics.median(r["tokens_per_second"] for r in done) if done else None,
        "notes": "; ".join(notes),
    }


def find_speculative_simple(bin_dir: str | None) -> Path | None:
    """llama.cpp's `llama-speculative-simple`: in `bin_dir` when given, else on PATH."""
    if bin_dir:
        candidate = Path(bin_dir) / SPECULATIVE_SIMPLE
        return candidate if candidate.is_file() and os.access(candidate, os.X_OK) else None
    found = shutil.which(SPECULATIVE_SIMPLE)
    return Path(found) if found else None


def parse_speculative_simple(output: str) -> dict[str, float | None]:
    """Figures from llama-speculative-simple's closing report (its log goes to stderr)."""
    decoded = _DECODED.findall(output)
    if not decoded:
        raise ValueError("no 'decoded N tokens in S seconds, speed: X t/s' line in its output")
    n, seconds, speed = decoded[-1]
    accept = _ACCEPT.search(output)
    return {
        "tokens": int(n),
        "seconds": float(seconds),
        "tokens_per_second": float(speed),
        "acceptance": float(accept.group(1)) / 100 if accept else None,
    }


def llama_speculative_simple(
    binary: Path | None,
    target_path: Path,
    draft_path: Path | None,
    prompts: Sequence[PeerPrompt],
    *,
    max_tokens: int,
    k: int,
    threads: int,
    n_ctx: int,
    bin_dir: str | None,
    timeout: float = 600.0,
    gpu_layers: int = 0,
    draft_gpu_layers: int = 0,
    spec_type: str = "draft-simple",
) -> dict[str, Any]:
    """llama.cpp's own speculation, as a subprocess, greedy, on the same formatted prompts.

    spec_type: one of SPEC_TYPES; the n-gram modes run with llama.cpp's own defaults for them
        (k applies to draft-simple) and need no draft model.
    gpu_layers, draft_gpu_layers: offload as edgespec's own models are (-1 = all), so that a
        draft-on-GPU comparison runs llama.cpp's draft-on-GPU configuration (`-ngl 0 -ngld 999`).
    """
    name = simple_name(k, spec_type)
    uses_draft = spec_type == "draft-simple"
    if binary is None:
        where = f"in {bin_dir}" if bin_dir else "on PATH"
        return _skipped(
            name, f"binary not found {where} (build llama.cpp's examples, or pass --llama-cpp-bin DIR)"
        )
    if uses_draft and draft_path is None:
        return _skipped(name, "needs a draft model")
    runs: list[dict[str, Any]] = []
    speeds: list[float] = []
    with tempfile.TemporaryDirectory(prefix="edgespec-peer-") as tmp:
        for prompt in prompts:
            prompt_file = Path(tmp) / "prompt.txt"
            prompt_file.write_text(prompt.text, encoding="utf-8")
            model_args = ["-md", str(draft_path), "--spec-draft-n-max", str(k)] if uses_draft else []
            command = [
                str(binary),
                "-m",
                str(target_path),
                *model_args,
                "-f",
                str(prompt_file),
                "-n",
                str(max_tokens),
                "--spec-type",
                spec_type,
                "--temp",
                "0",
                "--top-k",
                "1",
                "-t",
                str(threads),
                "-c",
                str(n_ctx),
                "-ngl",
                str(999 if gpu_layers < 0 else gpu_layers),
                *(["-ngld", str(999 if draft_gpu_layers < 0 else draft_gpu_layers)] if uses_draft else []),
            ]
            try:
                proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
            except subprocess.TimeoutExpired:
                return _skipped(name, f"timed out after {timeout:.0f} s on prompt {prompt.id}")
            if proc.returncode != 0:
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                return _skipped(name, f"exited with {proc.returncode} on prompt {prompt.id}: {last}")
            try:
                figures = parse_speculative_simple(proc.stderr + proc.stdout)
            except ValueError as exc:
                return _skipped(name, f"could not read its report: {exc}")
            runs.append({"prompt_id": prompt.id, **figures})
            speeds.append(float(figures["tokens_per_second"] or 0.0))
    return {
        "name": name,
        "status": "ran",
        "runs": runs,
        "tokens_per_s_median": statistics.median(speeds),
        "notes": "its own tokens/s (decode phase); output not compared",
    }
