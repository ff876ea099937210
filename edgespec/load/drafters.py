"""Every drafter by name: one registry, so a new drafter is one class plus one entry here.

The loader, the API, the bench and tuning all make drafters through `make_drafter`; the names are
the ones users write: `--draft ngram`, bench configurations (`none`, `draft`, `ngram`, `auto`) and
profiles (whose `[speculation]` table picks `auto`'s sources).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from edgespec.control import MODEL_PRIOR, NGRAM_PRIOR, ControlledDrafter, GoodputController
from edgespec.drafting import Drafter, ModelDrafter, NgramDrafter
from edgespec.errors import ProfileError, SettingsError

if TYPE_CHECKING:
    from edgespec.placement.profiles import Profile


@dataclass(frozen=True)
class DraftSetup:
    """What a drafter may be made from.

    Attributes:
        model: the loaded draft model's drafter (None: no draft model was loaded).
        profile: the profile whose `[speculation]` table `auto` follows (with measured costs
            when its controller is the goodput one).
        n_min, n_max: n-gram lengths for `ngram`.
        overlap: draft the next block in the background while the target verifies (`draft`;
            None keeps the model drafter's, or the profile's for `auto`).
    """

    model: ModelDrafter | None = None
    profile: Profile | None = None
    n_min: int = 2
    n_max: int = 4
    overlap: bool | None = None


def _none(setup: DraftSetup) -> Drafter | None:
    return None


def _ngram(setup: DraftSetup) -> Drafter | None:
    return NgramDrafter(n_min=setup.n_min, n_max=setup.n_max)


def _model(setup: DraftSetup) -> Drafter | None:
    if setup.model is None:
        raise SettingsError("drafting with a model needs a draft model")
    return setup.model if setup.overlap is None else setup.model.variant(overlap=setup.overlap)


def _from_profile(setup: DraftSetup) -> Drafter | None:
    """The drafter a profile describes: its sources, under a fixed k or the goodput controller.

    Raises:
        ProfileError: the goodput controller has no measured costs, or the profile needs a draft
            model that was not loaded.
    """
    profile = setup.profile
    if profile is None:
        raise SettingsError("an auto drafter needs a profile")
    spec = profile.speculation
    if setup.overlap is not None:
        spec = replace(spec, overlap=setup.overlap)
    if "model" in spec.drafters and setup.model is None:
        raise ProfileError(f"profile {profile.name} drafts with a model, but no draft model was loaded")
    model = (
        setup.model.variant(min_prob=spec.min_draft_prob, overlap=spec.overlap)
        if setup.model is not None and "model" in spec.drafters
        else None
    )
    ngram = NgramDrafter(n_min=1, n_max=8) if "ngram" in spec.drafters else None
    if not spec.drafters:
        return None
    if spec.controller == "fixed":
        if model is not None and ngram is not None:
            raise ProfileError(
                f'profile {profile.name}: controller = "fixed" drafts from one source; list one drafter'
            )
        return model if model is not None else NgramDrafter()
    if profile.costs is None:
        raise ProfileError(
            f"profile {profile.name} has no measured costs for the goodput controller; "
            "run `edgespec profile tune` or use --profile auto"
        )
    costs = profile.costs  # validated by placement.parse_profile (acceptance_ngram: one per bucket)
    controller = GoodputController(
        [t / 1000 for t in costs.t_verify_ms],
        costs.t_draft_ms / 1000,
        spec.k_max,
        model_prior=costs.acceptance_model or (MODEL_PRIOR,),
        ngram_prior=costs.acceptance_ngram or NGRAM_PRIOR,
    )
    return ControlledDrafter(controller, model, ngram)


#: name → factory. `draft` drafts every step with the draft model; `auto` follows a profile.
DRAFTERS: dict[str, Callable[[DraftSetup], Drafter | None]] = {
    "none": _none,
    "ngram": _ngram,
    "draft": _model,
    "auto": _from_profile,
}


def make_drafter(name: str, setup: DraftSetup = DraftSetup()) -> Drafter | None:
    """The drafter registered as `name`, made from `setup` (None for `none`).

    Raises:
        SettingsError: no drafter has that name, or it needs something `setup` lacks.
    """
    factory = DRAFTERS.get(name)
    if factory is None:
        raise SettingsError(f"unknown drafter {name!r}; choose from {', '.join(DRAFTERS)}")
    return factory(setup)
