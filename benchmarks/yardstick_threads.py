"""Does running the yardstick in edgespec's process change what either decodes?

The yardstick (`edgespec.bench.yardstick.LlamaCppPlain`) runs llama-cpp-python in the benchmark's
process, interleaved with edgespec, prompt by prompt. llama.cpp's CPU backend computes each graph
in an OpenMP parallel region, and libgomp keeps a team for every thread that has computed; with
more threads than CPUs in all the teams it stops spinning at barriers. edgespec computes on its
shared CPU thread (`edgespec.runtimes.native`), llama-cpp-python on whichever thread calls it.

Each mode is a process of its own; the modes run in turn, alternating, `--reps` times. In each, the
default target (2 threads, llama.cpp's kernels, greedy, the whole prompt evaluated every time)
answers the same chat-formatted prompts, `--max-tokens` each; the figure is decode tokens/s
(tokens after the first over the time after the first), as the yardstick measures it:
- `edgespec`: edgespec target-only alone in its process;
- `llama.cpp`: llama-cpp-python alone in its process;
- `both, caller's thread`: both in one process, llama-cpp-python called from the benchmark's
  thread (the yardstick before this script);
- `both, shared thread`: both in one process, llama-cpp-python on edgespec's CPU thread (the
  yardstick now).

    python benchmarks/yardstick_threads.py --out benchmarks/results/yardstick_threads.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import median, write_run  # noqa: E402

PROMPTS = [
    "Write a long poem about the sea.",
    "Explain in detail what a hash map is.",
    "Describe the history of Paris in detail.",
    "Explain how a CPU cache works, at length.",
]
MODES = ("edgespec", "llama.cpp", "both, caller's thread", "both, shared thread")


class _Direct:
    """Stands in for the shared CPU thread: calls on the caller's thread."""

    def call(self, fn: Any, *args: Any) -> Any:
        return fn(*args)


def child(mode: str, tokens_file: Path, max_tokens: int, threads: int) -> dict[str, list[float]]:
    from edgespec import Engine
    from edgespec.bench.yardstick import LlamaCppPlain
    from edgespec.load import models

    prompts: list[list[int]] = json.loads(tokens_file.read_text())
    engine = Engine(n_ctx=2048, threads=threads, draft="none") if mode != "llama.cpp" else None
    plain = None
    if mode != "edgespec":
        import edgespec.runtimes.native as native

        shared = native.cpu_thread
        if mode == "both, caller's thread":
            native.cpu_thread = _Direct  # type: ignore[assignment]
        try:
            plain = LlamaCppPlain(models.resolve(models.TARGET), 2048, threads)
        finally:
            native.cpu_thread = shared
    rates: dict[str, list[float]] = {"edgespec": [], "llama.cpp": []}
    for tokens in prompts:
        if plain is not None:
            rates["llama.cpp"].append(plain.complete(tokens, max_tokens).tokens_per_second)
        if engine is not None:
            result = engine.generate(tokens, max_tokens=max_tokens, cache_prompt=False)
            rates["edgespec"].append(result.stats.tokens_per_second)
    return {k: v for k, v in rates.items() if v}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=96)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--tokens", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.tokens, args.max_tokens, args.threads)))
        return

    from edgespec import Engine

    with Engine(n_ctx=2048, threads=args.threads, draft="none") as engine:
        tokens = [engine.tokenize(p) for p in PROMPTS]
    results: dict[str, dict[str, list[float]]] = {m: {} for m in MODES}
    with tempfile.TemporaryDirectory() as tmp:
        tokens_file = Path(tmp) / "tokens.json"
        tokens_file.write_text(json.dumps(tokens))
        for rep in range(args.reps):
            for mode in MODES:
                command = [sys.executable, __file__, "--child", mode, "--tokens", str(tokens_file)]
                command += ["--max-tokens", str(args.max_tokens), "--threads", str(args.threads)]
                proc = subprocess.run(command, capture_output=True, text=True, check=True)
                rates = json.loads(proc.stdout.strip().splitlines()[-1])
                for who, values in rates.items():
                    results[mode].setdefault(who, []).extend(values)
                shown = "  ".join(f"{who} {median(v):.2f}" for who, v in rates.items())
                print(f"rep {rep + 1} {mode}: {shown}", file=sys.stderr, flush=True)

    print("| mode | decoder | tokens/s (median) | per prompt |")
    print("|---|---|---|---|")
    for mode, rates in results.items():
        for who, values in rates.items():
            each = ", ".join(f"{v:.1f}" for v in values)
            print(f"| {mode} | {who} | {median(values):.2f} | {each} |")
    if args.out:
        write_run(args.out, args, prompts=PROMPTS, results=results)


if __name__ == "__main__":
    main()
