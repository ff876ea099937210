"""Do batched verification rows equal single-token decoding, and what does a batch cost?

For the default target and a long Spec-Bench prompt (over 512 cached tokens, where llama.cpp's
single-query attention changes path), greedy-decode 24 tokens one at a time and keep each row of
logits; then, from the same cache state rebuilt one token at a time, evaluate n of those tokens in
one batch and compare every row with its single-token twin. Kernels "fast" are llama.cpp's
defaults; "exact" are edgespec's batch-invariant settings (see runtimes/llama_cpp.py). Also times
each batch (median of 5) relative to one single-token step, T(n)/T(1), for target and drafter.

    python benchmarks/batch_invariance.py [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import spec_bench_prompts  # noqa: E402

BATCH_SIZES = (1, 2, 3, 4, 5, 8, 9, 17)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()

    from edgespec.chat import prompt_tokens
    from edgespec.load import models
    from edgespec.runtimes.base import RuntimeSettings
    from edgespec.runtimes.llama_cpp import LlamaCppRuntime

    text = next(p["prompt"] for p in spec_bench_prompts(1, 13) if p["category"] == "summarization")
    diffs, costs = [], []
    for role, model in (("target", models.TARGET), ("draft", models.DRAFT)):
        for kernels in ("fast", "exact"):
            settings = RuntimeSettings(n_ctx=2048, n_threads=args.threads, kernels=kernels)
            rt = LlamaCppRuntime(models.resolve(model), settings)
            prompt = prompt_tokens(rt, text)
            logits = rt.eval(prompt)
            seq, single = [int(logits[0].argmax())], []
            start = time.perf_counter()
            for _ in range(max(BATCH_SIZES) + 4):
                row = rt.eval([seq[-1]], logits="all")[0].copy()
                single.append(row)
                seq.append(int(row.argmax()))
            step = (time.perf_counter() - start) / len(single)
            cells, times = [], []
            offset = 3
            for n in BATCH_SIZES:
                samples = []
                for _ in range(5):
                    rt.truncate(len(prompt))
                    for token in seq[:offset]:
                        rt.eval([token], logits="none")
                    t0 = time.perf_counter()
                    batch = rt.eval(seq[offset : offset + n], logits="all").copy()
                    samples.append(time.perf_counter() - t0)
                diff = max(float(np.abs(batch[j] - single[offset + j]).max()) for j in range(n))
                cells.append("0 (identical)" if diff == 0 else f"{diff:.3f}")
                times.append(statistics.median(samples))
            label = f"{role} | {kernels} | {len(prompt)}"
            diffs.append(f"| {label} | " + " | ".join(cells) + " |")
            costs.append(
                f"| {label} | {1 / step:.1f} | " + " | ".join(f"{t / times[0]:.2f}" for t in times) + " |"
            )
            print(diffs[-1], costs[-1], file=sys.stderr, flush=True)
            rt.close()
    sizes = " | ".join(f"n={n}" for n in BATCH_SIZES)
    print("max |batched - single-token| logit difference\n")
    print(f"| model | kernels | prompt tokens | {sizes} |\n|---|---|---|" + "---|" * len(BATCH_SIZES))
    print("\n".join(diffs))
    print("\ncost of an n-token pass with logits for every row, T(n)/T(1)\n")
    print(f"| model | kernels | prompt tokens | single-token tokens/s | {sizes} |")
    print("|---|---|---|---|" + "---|" * len(BATCH_SIZES))
    print("\n".join(costs))


if __name__ == "__main__":
    main()
