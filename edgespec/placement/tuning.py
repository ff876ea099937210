"""`edgespec profile tune` and `--profile auto`: measure what speculation costs and gains on this
machine, and write it into a profile (`drafters.make_drafter` builds the drafter it describes).

Tuning measures, with the models placed as the base profile says:
- T_verify(n), the target's cost for one pass over n tokens, n = 1 … k_max + 1, and the cost of one
  model-draft token (`costs.measure`, after a real context);
- the model drafter's per-position acceptance on a few short calibration prompts, unless the
  costs already show it cannot pay on this machine even when every draft token is accepted.
The result is the base profile plus a `[costs]` table, saved in the user profile directory under a
name derived from the machine, the model pair and the base profile, so that `--profile auto` finds
it again and a different machine or model pair gets its own.
"""

from __future__ import annotations

import datetime
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from edgespec.chat import prompt_tokens
from edgespec.control import MODEL_PRIOR, NGRAM_PRIOR, Acceptance, best_k
from edgespec.costs import Costs, measure
from edgespec.drafting import ModelDrafter
from edgespec.engine import GenerationSettings, SpeculativeEngine
from edgespec.errors import ProfileError
from edgespec.fileio import write_text_atomic

if TYPE_CHECKING:
    from edgespec.placement.hardware import Hardware
    from edgespec.placement.profiles import Profile
    from edgespec.runtimes.base import Runtime

#: Short prompts of different kinds for measuring the model drafter's acceptance (written for this).
CALIBRATION_PROMPTS = (
    "Write a Python function that checks whether a string is a palindrome, ignoring case and spaces.",
    "Explain in a few sentences why the sky is blue.",
    "Rewrite this with a list comprehension:\n\nsquares = []\nfor x in range(10):\n    squares.append(x * x)",
)

#: a draft source is kept only if its best draft promises this much over a plain step (as the
#: controller's margin)
KEEP_MARGIN = 1.05


@dataclass
class TuneResult:
    """What tuning measured, and what it concluded."""

    costs: Costs
    acceptance_model: tuple[float, ...] = ()
    drafters: tuple[str, ...] = ("ngram",)
    notes: list[str] = field(default_factory=list)


def model_id(path: Path | None) -> str:
    """ "file name:size in bytes" (how a tuned profile names the models it was measured with)."""
    if path is None:
        return ""
    return f"{path.name}:{path.stat().st_size}"


def tune(
    target: Runtime,
    draft: Runtime | None,
    *,
    drafters: Sequence[str] = ("model", "ngram"),
    k_max: int = 16,
    max_tokens: int = 48,
    repeats: int = 4,
    on_step: Callable[[str], None] | None = None,
) -> TuneResult:
    """Measure costs and acceptance with loaded models.

    Args:
        target: the target runtime, placed and threaded as it will run.
        draft: the draft model's runtime, or None when the profile drafts with n-grams only.
        drafters: the draft sources the base profile allows.
        k_max: the longest draft to cost.
        max_tokens: tokens generated per calibration prompt.
        repeats: samples per cost figure (the median is kept).
        on_step: called with a label after each unit of work (for a progress bar; `steps()` units).
    """
    tick = on_step or (lambda label: None)
    prompts = [prompt_tokens(target, text) for text in CALIBRATION_PROMPTS]
    # A real context to measure after: the first prompt and the target's own answer to it.
    first = SpeculativeEngine(target).generate(
        prompts[0], GenerationSettings(max_tokens=max_tokens, draft_max=0)
    )
    context = prompts[0] + first.run().tokens
    while len(context) < k_max + 1:
        context = context + context
    tick("context")
    costs = measure(
        target, draft if "model" in drafters else None, context, k_max=k_max, repeats=repeats, switching=True
    )
    tick("costs")
    result = TuneResult(costs=costs, drafters=tuple(d for d in drafters if d == "ngram"))
    plain_t = costs.t_target[0]
    plain = 1.0 / plain_t  # tokens per second without drafting
    if "model" in drafters and draft is not None:
        model_cost = [t + k * costs.t_draft for k, t in enumerate(costs.t_target)]
        k_sure, rate_sure = best_k([1.0] * k_max, model_cost)
        ratio = costs.t_draft / plain_t
        if k_sure == 0 or rate_sure < plain * KEEP_MARGIN:
            result.notes.append(
                f"model drafter dropped: a draft token costs {ratio:.2f} of a target step and a pass "
                f"over n tokens {costs.t_target[1] / plain_t:.2f}-{costs.t_target[-1] / plain_t:.2f} target "
                "steps, so it cannot pay even if every draft is accepted"
            )
        else:
            acceptance = Acceptance(k_max, (MODEL_PRIOR,), prior_weight=1.0, decay=1.0)
            drafter = ModelDrafter(draft, max_id=target.vocab.n_vocab)
            engine = SpeculativeEngine(target, drafter)
            k_used = min(8, k_max)
            for tokens in prompts:
                gen = engine.generate(tokens, GenerationSettings(max_tokens=max_tokens, draft_max=k_used))
                gen.run()
                for n in gen.stats.accepted_per_step:
                    acceptance.observe(k_used, n)
                tick("calibration")
            alphas = tuple(round(float(a), 3) for a in acceptance.alphas())
            result.acceptance_model = alphas
            k, rate = best_k(alphas, model_cost)
            if k and rate >= plain * KEEP_MARGIN:
                result.drafters = ("model", *result.drafters)
                result.notes.append(f"model drafter kept: predicted {rate / plain:.2f}x at k = {k}")
            else:
                result.notes.append(
                    f"model drafter dropped: at its measured acceptance ({alphas[0]:.0%} for the first "
                    f"token) no draft length beats plain decoding (a draft token = {ratio:.2f} target steps)"
                )
    return result


def predicted_gain(profile: Profile) -> float:
    """How much faster than plain decoding the profile's costs predict its model drafter runs at
    its best draft length (1.0 when tuning dropped it, or there are no costs)."""
    costs = profile.costs
    if costs is None or "model" not in profile.speculation.drafters or not costs.acceptance_model:
        return 1.0
    t_verify = costs.t_verify_ms
    alphas = list(costs.acceptance_model)
    alphas += [alphas[-1]] * (len(t_verify) - 1 - len(alphas))  # the last value repeats
    _, rate = best_k(alphas, [t + k * costs.t_draft_ms for k, t in enumerate(t_verify)])
    return max(rate * t_verify[0], 1.0)


def needs_costs(profile: Profile) -> bool:
    """Whether the profile's drafting needs measured costs it does not have (a goodput
    controller with something to choose from, and no [costs])."""
    spec = profile.speculation
    return profile.costs is None and spec.controller == "goodput" and bool(spec.drafters)


def steps(drafters: Sequence[str], has_draft: bool) -> int:
    """How many `on_step` calls `tune` makes at most (for a progress bar's length)."""
    return 2 + (len(CALIBRATION_PROMPTS) if has_draft and "model" in drafters else 0)


def tuned_name(base: Profile, hw: Hardware, target_path: Path, draft_path: Path | None) -> str:
    """The name of the tuned profile for this base profile (and its kernels), machine and model pair."""
    key = "|".join(
        (hw.fingerprint(), model_id(target_path), model_id(draft_path), base.name, base.target.kernels)
    )
    return f"tuned-{base.name}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def tuned_profile(
    base: Profile,
    result: TuneResult,
    hw: Hardware,
    target_path: Path,
    draft_path: Path | None,
    why_draft: str = "",
) -> Profile:
    """The base profile with the measured costs, named by `tuned_name`; `costs.choice` says which
    drafter was measured and why (`why_draft`), and what tuning concluded."""
    from edgespec.placement.profiles import TunedCosts

    costs = TunedCosts(
        machine=hw.fingerprint(),
        target=model_id(target_path),
        draft=model_id(draft_path),
        measured=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        t_verify_ms=tuple(round(t * 1000, 3) for t in result.costs.t_target),
        t_draft_ms=round(result.costs.t_draft * 1000, 3),
        acceptance_model=result.acceptance_model,
        acceptance_ngram=NGRAM_PRIOR,
        choice="; ".join((_drafter_text(draft_path, why_draft), *result.notes)),
    )
    speculation = replace(base.speculation, drafters=result.drafters, controller="goodput")
    tuned = base.with_costs(
        costs,
        tuned_name(base, hw, target_path, draft_path),
        f"{base.name} tuned on this machine for {target_path.name} + "
        f"{draft_path.name if draft_path else 'n-gram drafts'}",
    )
    return replace(tuned, speculation=speculation)


def _drafter_text(draft_path: Path | None, why: str) -> str:
    name = draft_path.name if draft_path is not None else "none"
    return f"drafter {name} ({why})" if why else f"drafter {name}"


def save(profile: Profile) -> Path:
    """Write a profile into the user profile directory (atomically); returns its path."""
    from edgespec.placement.profiles import user_profile_dir

    path = user_profile_dir() / f"{profile.name}.toml"
    write_text_atomic(path, profile.to_toml())
    return path


def find_tuned(base: Profile, hw: Hardware, target_path: Path, draft_path: Path | None) -> Profile | None:
    """The saved tuned profile for this base, machine and pair, if there is one that still matches."""
    from edgespec.placement.profiles import COSTS_METHOD, read_profile, user_profile_dir

    path = user_profile_dir() / f"{tuned_name(base, hw, target_path, draft_path)}.toml"
    if not path.exists():
        return None
    try:
        profile = read_profile(path)
    except ProfileError as exc:  # damaged or replaced: measure again, and overwrite it
        logging.getLogger("edgespec").warning("ignoring the saved tuned profile: %s", exc)
        return None
    costs = profile.costs
    if costs is None or costs.machine != hw.fingerprint() or costs.target != model_id(target_path):
        return None
    if costs.method < COSTS_METHOD:
        logging.getLogger("edgespec").info(
            "measuring %s again: its costs were measured by an earlier method (%d, now %d)",
            path.name,
            costs.method,
            COSTS_METHOD,
        )
        return None
    return profile
