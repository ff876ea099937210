"""What speculation can reach on this machine: measured costs and the speed-up they allow.

With a per-token drafting cost T_d, the target's cost T(n) for one pass over n tokens with logits
for every row, k drafts per step and a per-token acceptance rate α (each draft accepted with
probability α independently, as in Leviathan et al. 2023), one step yields on average
E = (1 - α^(k+1)) / (1 - α) tokens and costs k·T_d + T(k+1); target-only decoding yields one token
per T(1). The ceiling for α is the best E·T(1) / (k·T_d + T(k+1)) over k.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from edgespec.runtimes.base import Runtime


@dataclass(frozen=True)
class Costs:
    """Measured costs, in seconds.

    Attributes:
        t_target: t_target[n - 1] = T(n), one target pass over n tokens with every row's logits.
        t_draft: one draft token (a single-token draft pass); 0 for a free drafter (n-gram).
        context_tokens: how many tokens were in the cache when T(n) was measured.
    """

    t_target: tuple[float, ...]
    t_draft: float
    context_tokens: int

    @property
    def k_max(self) -> int:
        return len(self.t_target) - 1

    def batch_efficiency(self, n: int) -> float:
        """n·T(1)/T(n): how many single steps one n-token pass is worth (n = ideal)."""
        return n * self.t_target[0] / self.t_target[n - 1]

    def expected_speedup(self, alpha: float, k: int, t_draft: float | None = None) -> float:
        """Predicted speed-up over target-only for k drafts per step at acceptance rate alpha."""
        if k == 0:
            return 1.0
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"acceptance rate must be in [0, 1], got {alpha}")
        if k > self.k_max:
            raise ValueError(f"costs were measured up to k = {self.k_max}, got {k}")
        draft = self.t_draft if t_draft is None else t_draft
        tokens = k + 1.0 if alpha == 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)
        return tokens * self.t_target[0] / (k * draft + self.t_target[k])

    def ceiling(self, alpha: float, t_draft: float | None = None) -> tuple[int, float]:
        """(best k, its predicted speed-up) for acceptance rate alpha; k = 0 means do not speculate."""
        best = (0, 1.0)
        for k in range(1, self.k_max + 1):
            speedup = self.expected_speedup(alpha, k, t_draft)
            if speedup > best[1]:
                best = (k, speedup)
        return best

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


#: pass sizes measured directly; the sizes between them are interpolated (a pass's cost is close
#: to linear in its size between these points, and measuring every size up to 65 would take
#: minutes)
MEASURED_SIZES = (1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 17, 25, 33, 49, 65)


def measured_sizes(n_max: int) -> list[int]:
    """The pass sizes `measure` times for passes of up to n_max tokens."""
    return sorted({n for n in MEASURED_SIZES if n <= n_max} | {n_max})


def _median_time(run, repeats: int) -> float:
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def measure(
    target: Runtime,
    draft: Runtime | None,
    context: Sequence[int],
    k_max: int = 16,
    repeats: int = 3,
    switching: bool = False,
) -> Costs:
    """Measure T(1) … T(k_max + 1) on the target and one draft step, after `context`.

    Sizes in `measured_sizes(k_max + 1)` are timed; the others are interpolated linearly.

    Each pass evaluates tokens taken from the context itself (real tokens, not padding) at the
    positions right after it, then rolls the cache back, so every sample sees the same state.

    Args:
        target: target runtime (its kernel settings are part of what is measured).
        draft: draft runtime, or None for a free drafter (t_draft = 0).
        context: token ids to put in the caches first (at least k_max + 1 of them).
        k_max: largest number of drafts to cost.
        repeats: samples per figure; the median is kept.
        switching: charge T(n) for what an n-token pass costs inside decoding, where it sits
            between single-token steps: besides the pass itself, the single-token step right
            after it is slower than in a run of single steps (llama.cpp reuses a compute graph
            only while the batch shape stays the same). T(n) then is the pass plus that excess,
            each the median of `repeats` alternating samples; T(1) stays a plain step's cost.
    """
    if len(context) < k_max + 1:
        raise ValueError(f"need at least {k_max + 1} context tokens, got {len(context)}")
    target.truncate(0)
    target.eval(context, logits="none")
    base = target.n_past
    probe = list(context[: k_max + 1])

    def target_pass(n: int) -> None:
        target.truncate(base)
        target.eval(probe[:n], logits="all")

    target_pass(1)  # warm-up
    sizes = measured_sizes(k_max + 1)
    if not switching:
        timed = [_median_time(lambda n=n: target_pass(n), repeats) for n in sizes]
    else:
        steady = _median_time(lambda: target_pass(1), max(repeats, 9))
        passes: dict[int, list[float]] = {n: [] for n in sizes[1:]}
        after: dict[int, list[float]] = {n: [] for n in sizes[1:]}
        clock = time.perf_counter
        for _ in range(repeats):
            for n in sizes[1:]:
                start = clock()
                target_pass(n)
                middle = clock()
                target_pass(1)
                passes[n].append(middle - start)
                after[n].append(clock() - middle)
        timed = [steady] + [
            statistics.median(passes[n]) + max(statistics.median(after[n]) - steady, 0.0) for n in sizes[1:]
        ]
    t_target = tuple(float(t) for t in np.interp(np.arange(1, k_max + 2), sizes, timed))
    target.truncate(0)

    t_draft = 0.0
    if draft is not None:
        # A VocabTrim drafter reads its own (trimmed) ids, as `ModelDrafter` feeds it.
        vmap = draft.vocab_map
        mapped = vmap.input_map.tolist() if vmap is not None and not draft.inputs_in_target_ids else None
        draft_context, draft_probe = (
            (context, probe[:1]) if mapped is None else ([mapped[t] for t in context], [mapped[probe[0]]])
        )
        draft.truncate(0)
        draft.eval(draft_context, logits="none")
        draft_base = draft.n_past

        def draft_step() -> None:
            draft.truncate(draft_base)
            draft.eval(draft_probe, logits="last")

        draft_step()
        t_draft = _median_time(draft_step, max(repeats, 5))
        draft.truncate(0)
    return Costs(t_target=t_target, t_draft=t_draft, context_tokens=len(context))
