"""Two small costs behind the goodput controller's design (BENCHMARKS.md, issue 6).

1. The switching cost: the default target's single-token step, timed in a run of single steps and
   right after a 3-token pass (llama.cpp rebuilds its compute graph when the batch shape
   changes, so the step after a verification pass is slower). Medians of 20 samples each, after a
   chat-formatted prompt.
2. The controller's own work per step: `ControlledDrafter.propose` with the n-gram drafter and the
   goodput controller on a 1,000-token context of random ids (no match, the common case), mean
   over 500 calls.

    python benchmarks/step_overheads.py
"""

from __future__ import annotations

import random
import statistics
import time

from edgespec.chat import prompt_tokens
from edgespec.control import ControlledDrafter, GoodputController
from edgespec.drafting import NgramDrafter
from edgespec.load.builder import load
from edgespec.runtimes.base import RuntimeSettings


def switching_cost(samples: int = 20) -> None:
    pair = load(None, "none", RuntimeSettings())
    target = pair.engine.target
    context = prompt_tokens(target, "Explain in detail how a hash map works, with an example in Python. " * 6)
    target.truncate(0)
    target.eval(context, logits="none")
    base = target.n_past
    probe = context[:4]

    def one(n: int) -> float:
        target.truncate(base)
        start = time.perf_counter()
        target.eval(probe[:n], logits="all")
        return time.perf_counter() - start

    for _ in range(3):
        one(1)
    steady1 = [one(1) for _ in range(samples)]
    steady3 = [one(3) for _ in range(samples)]
    after3, alternating3 = [], []
    for _ in range(samples):
        alternating3.append(one(3))
        after3.append(one(1))
    pair.close()
    ms = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
    print(f"context {len(context)} tokens")
    print(f"T(1) in a run of single steps: {ms(steady1):.2f} ms")
    print(f"T(1) right after a 3-token pass: {ms(after3):.2f} ms")
    print(f"T(3) in a run of 3-token passes: {ms(steady3):.2f} ms")
    print(f"T(3) alternating with single steps: {ms(alternating3):.2f} ms")


def controller_overhead(calls: int = 500) -> None:
    t1 = 0.033
    t_verify = [t1 * r for r in (1.0, 1.94, 2.57, 3.57, 4.37, 4.98, 5.97, 6.72, 7.57)]
    drafter = ControlledDrafter(GoodputController(t_verify, 0.0, 8), None, NgramDrafter(1, 8))
    rng = random.Random(0)
    context = [rng.randrange(50_000) for _ in range(1000)]
    drafter.begin(context)
    start = time.perf_counter()
    for _ in range(calls):
        context.append(rng.randrange(50_000))
        drafter.propose(context, 16)
    print(f"controller + n-gram lookup per step: {(time.perf_counter() - start) / calls * 1e6:.1f} µs")


if __name__ == "__main__":
    switching_cost()
    controller_overhead()
