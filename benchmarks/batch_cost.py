"""What does a batch of several sequences cost, and are its rows those of each sequence alone?

The groundwork of continuous batching (issue 20). One llama.cpp context of the default target holds
8 sequences (`RuntimeSettings.n_seq`, a KV stream each), each holding a different Spec-Bench prompt
(cut to --context tokens). A step of continuous batching evaluates, in one `llama_decode`
(`eval_many`), B sequences with r rows each: r = 1 is plain decoding, r > 1 a verification pass of
r - 1 drafts. For every (B, r):

- its time T(B, r), median of --reps runs, the shapes interleaved within each run, over T(1, 1) (one
  sequence, one row: the step plain decoding takes, llama.cpp's own `llama_decode` of one token);
  also T1 alone: the same one-token step in a context that holds one sequence only (today's
  engine), timed in the same runs, to see what holding 8 sequences costs a lone one;
- the aggregate efficiency B·r·T(1,1)/T(B,r): how many times more rows per second than one at a
  time. At 4 clients decoding plainly, 4·T(1,1)/T(4,1) is the most continuous batching can gain
  over serving them one after another (`--parallel 1`), before any drafting;
- whether each sequence's rows equal, bit for bit, the same tokens evaluated one at a time in a
  context of its own after the same prompt (the largest |difference| of a logit otherwise).

Kernels "fast" (llama.cpp's own) and "exact" (edgespec's row-invariant configuration) are run one
after the other; nothing else may run meanwhile.

    python benchmarks/batch_cost.py --threads 2 --out benchmarks/results/batch_cost.json
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median, spec_bench_prompts, write_json  # noqa: E402

SEQUENCES = (1, 2, 3, 4, 8)
ROWS = (1, 2, 3, 5)


def measure(kernels: str, texts: list[str], args: argparse.Namespace) -> tuple[dict, list[dict]]:
    """One kernel setting: (its baselines, one row per batch shape)."""
    from edgespec.chat import prompt_tokens
    from edgespec.load import models
    from edgespec.runtimes.base import RuntimeSettings
    from edgespec.runtimes.llama_cpp import LlamaCppRuntime

    path = models.resolve(models.TARGET)
    shapes = [(b, r) for b in SEQUENCES for r in ROWS]
    one_settings = RuntimeSettings(n_ctx=args.context + 64, n_threads=args.threads, kernels=kernels)  # type: ignore[arg-type]
    settings = replace(one_settings, n_seq=max(SEQUENCES))
    with LlamaCppRuntime(path, settings) as rt, LlamaCppRuntime(path, one_settings) as one:
        # Each sequence: its prompt, then the greedy continuation the measured rows evaluate.
        held: list[int] = []
        follow: list[list[int]] = []
        alone = []  # per sequence: its rows one token at a time, in a context of its own
        for seq, text in enumerate(texts):
            prompt = prompt_tokens(rt, text)[: args.context]
            one.truncate(0)
            for start in range(0, len(prompt), 256):
                rt.eval(prompt[start : start + 256], "last", seq=seq)
                last = one.eval(prompt[start : start + 256], "last")
            tokens = [int(last[0].argmax())]
            rows = []
            for _ in range(max(ROWS)):
                rows.append(one.eval(tokens[-1:], "all")[0].copy())
                tokens.append(int(rows[-1].argmax()))
            held.append(len(prompt))
            follow.append(tokens[: max(ROWS)])
            alone.append(np.stack(rows))

        def run(b: int, r: int) -> list[np.ndarray]:
            rows = rt.eval_many([(s, follow[s][:r]) for s in range(b)])
            for s in range(b):
                rt.truncate_seq(s, held[s])
            return rows

        def run_one() -> None:  # the lone context holds the last sequence's prompt
            one.eval(follow[-1][:1], "all")
            one.truncate(held[-1])

        one.truncate(held[-1])
        diffs = {}
        for b, r in shapes:
            rows = run(b, r)
            diffs[b, r] = max(float(np.abs(rows[s] - alone[s][:r]).max()) for s in range(b))
        times: dict[Any, list[float]] = {shape: [] for shape in [*shapes, "alone"]}
        order = random.Random(0)
        for _ in range(args.reps):
            for shape in order.sample([*shapes, "alone"], len(shapes) + 1):
                start = time.perf_counter()
                run(*shape) if shape != "alone" else run_one()
                times[shape].append(time.perf_counter() - start)
    t1 = median(times[1, 1])
    baseline = {
        "t1_ms": round(t1 * 1000, 2),
        "t1_alone_ms": round(median(times["alone"]) * 1000, 2),
        "context": [min(held), max(held)],
    }
    results = []
    for b, r in shapes:
        t = median(times[b, r])
        results.append(
            {
                "kernels": kernels,
                "sequences": b,
                "rows_each": r,
                "ms": round(t * 1000, 2),
                "relative": round(t / t1, 3),
                "efficiency": round(b * r * t1 / t, 3),
                "max_abs_diff": diffs[b, r],
            }
        )
    print(f"{kernels}: {baseline}", flush=True)
    return baseline, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--context", type=int, default=300, help="tokens each sequence holds first")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    texts = [p["prompt"] for p in spec_bench_prompts(1, 13)][: max(SEQUENCES)]
    results, baselines = [], {}
    for kernels in ("fast", "exact"):
        baselines[kernels], rows = measure(kernels, texts, args)
        results += rows
    print("| kernels | B | r | T ms | T/T(1,1) | efficiency B·r·T(1,1)/T | rows vs alone |")
    print("|---|---|---|---|---|---|---|")
    for row in results:
        same = "identical" if row["max_abs_diff"] == 0 else f"differ by {row['max_abs_diff']:.3g}"
        print(
            f"| {row['kernels']} | {row['sequences']} | {row['rows_each']} | {row['ms']:.1f} | "
            f"{row['relative']:.2f} | {row['efficiency']:.2f} | {same} |"
        )
    if args.out is not None:
        write_json(
            args.out,
            {
                "machine": machine(),
                "threads": args.threads,
                "context": args.context,
                "baselines": baselines,
                "results": results,
            },
        )


if __name__ == "__main__":
    main()
