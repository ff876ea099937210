"""From what a user names (a GGUF path, "default", "ngram", "none") to a ready engine.

Before llama.cpp touches a model file, the models to load together are checked against the
available RAM (`memory.check_memory`); GPU placement that this machine cannot honour is moved to
the CPU with a warning; and after loading, one token is run through each llama.cpp model to
refuse weights damaged into NaN or infinite scores. Warnings go to `on_note` when one is given,
else to the "edgespec" logger (which Python prints to stderr when logging is not configured).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from edgespec.defaults import DRAFT_MAX, N_CTX
from edgespec.drafting import ModelDrafter
from edgespec.engine import GenerationSettings, SpeculativeEngine
from edgespec.errors import ModelLoadError, SettingsError
from edgespec.load import models
from edgespec.load.drafters import DraftSetup, make_drafter
from edgespec.load.memory import check_memory, memory_need
from edgespec.load.pair_check import check_compatible
from edgespec.runtimes.base import Runtime, RuntimeSettings

if TYPE_CHECKING:
    from edgespec.batching import Slots
    from edgespec.drafting import Drafter
    from edgespec.placement.hardware import Hardware
    from edgespec.placement.profiles import Profile
    from edgespec.runtimes.llama_cpp import LlamaCppRuntime

DEFAULT = "default"
logger = logging.getLogger("edgespec")
R = TypeVar("R", bound="Runtime")


def _warner(on_note: Callable[[str], None] | None) -> Callable[[str], None]:
    """Where a warning goes: `on_note`, else the "edgespec" logger: never dropped."""
    return on_note if on_note is not None else logger.warning


def no_gpu_warning(hw: Hardware, gpu_layers: int, draft_gpu_layers: int) -> str | None:
    """A one-line warning when layers are asked for on a GPU that this machine does not have
    (llama.cpp would run them on the CPU without a word); None when there is a usable GPU or no
    layers were asked for."""
    from edgespec.placement.profiles import no_gpu_reason

    if not (gpu_layers or draft_gpu_layers) or hw.best_gpu() is not None:
        return None
    asked = ", ".join(
        f"{name} {n}" for name, n in (("gpu_layers", gpu_layers), ("draft_gpu_layers", draft_gpu_layers)) if n
    )
    why = no_gpu_reason(hw)
    return (
        f"GPU offload asked for ({asked}), but there is no GPU llama.cpp can use ({why}): running on the CPU"
    )


def open_gguf(path: Path, settings: RuntimeSettings) -> LlamaCppRuntime:
    """Load a GGUF model with llama.cpp and check that its weights give numbers.

    Raises:
        ModelLoadError: the file is missing, not GGUF, truncated, of an architecture llama.cpp
            does not know, or its tensor data is damaged into NaN or infinite scores.
    """
    from edgespec.runtimes.llama_cpp import LlamaCppRuntime

    with owned(LlamaCppRuntime(path, settings)) as (runtime, stack):
        check_numeric(runtime)
        stack.pop_all()
    return runtime


@contextlib.contextmanager
def owned(runtime: R) -> Iterator[tuple[R, contextlib.ExitStack]]:
    """Close `runtime` if the block fails; `stack.pop_all()` at its end keeps it open for the
    caller (the one way a loader hands on what it opened)."""
    with contextlib.ExitStack() as stack:
        stack.callback(runtime.close)
        yield runtime, stack


def check_numeric(runtime: Runtime) -> None:
    """Run one token (BOS, else id 0) through a freshly loaded model and refuse NaN or +inf scores.

    GGUF has no checksums: damaged tensor data loads, and often turns every score into NaN, which
    greedy decoding reads as token 0 forever and sampling as "every token banned". Damage that
    leaves the scores finite cannot be told from a model's own output; the default models are
    protected by their sha256. The KV cache is emptied again afterwards.
    """
    vocab = runtime.vocab
    token = vocab.bos if vocab.bos is not None else 0
    row = runtime.eval([token], logits="last")
    damaged = bool(np.isnan(row).any() or np.isposinf(row).any() or not np.isfinite(row).any())
    runtime.truncate(0)
    if damaged:
        raise ModelLoadError(
            f"{runtime.path} is damaged: its weights give NaN or infinite scores (corrupt tensor data); "
            "download or convert it again"
        )


@dataclass(frozen=True)
class LoadedPair:
    """An engine plus the paths it was built from (for reports)."""

    engine: SpeculativeEngine
    target_path: Path
    draft: str  # a path, "ngram" or "none"
    #: with `EngineSpec.parallel` > 1: the sequences of the batched contexts, each an engine of its
    #: own (`engine` is then only the models' owner, and generates nothing)
    slots: Slots | None = None

    @property
    def draft_name(self) -> str:
        """What drafts, as reports name it: "none", "ngram", "profile NAME" or a file name."""
        return self.draft if self.draft_is_source else Path(self.draft).name

    @property
    def draft_is_source(self) -> bool:
        """True when `draft` names a source ("none", "ngram", "profile NAME"), not a model file."""
        return self.draft in ("none", "ngram") or self.draft.startswith("profile ")

    @property
    def draft_label(self) -> str:
        """How statistics lines name what drafts: "none", "ngram", "profile NAME" or "draft FILE".
        Decided on `draft` itself, so a draft model whose file is called "ngram" reads "draft ngram"."""
        if self.draft_is_source:
            return self.draft
        return f"draft {self.draft_name}"

    @property
    def draft_runtime(self) -> Runtime | None:
        """The draft model's runtime, or None for an n-gram drafter or none."""
        drafter = self.engine.drafter
        return drafter.runtime if drafter is not None else None

    def close(self) -> None:
        drafter = self.engine.drafter
        if drafter is not None:
            drafter.close()  # background drafting first, then the models
        if self.draft_runtime is not None:
            self.draft_runtime.close()
        self.engine.target.close()


@dataclass(frozen=True)
class EngineSpec:
    """Everything that decides which engine gets built: the one description the CLI (`run`,
    `chat`, `serve`, `bench`), the Python API and the server build from, through `build`.

    Attributes:
        target: target GGUF path, or None / "default" for the default target.
        draft: a draft model (GGUF path, ONNX export, "default"), "ngram" or "none"; None leaves
            it to the profile (the default draft model where the profile drafts with one).
        profile: a profile name, a .toml path or "auto"; None drafts every step with `draft`.
            `resolved()` makes it "auto" when nothing says how to draft.
        draft_max: most draft tokens per step (None: DRAFT_MAX, or the profile's).
        n_ctx: context size in tokens.
        threads, draft_threads: CPU threads for the target and the draft model.
        gpu_layers, draft_gpu_layers: layers on a GPU (None: the profile's, else 0).
        kernels: "fast" or "exact" (None: the profile's, else "fast").
        flash_attn: llama.cpp's flash attention without a profile ("auto", "on", "off"; off as
            llama-cpp-python's `Llama` and a profile run it).
        draft_provider: ONNX Runtime execution provider for an ONNX drafter.
        verbose: let llama.cpp's log lines through.
        retune: with a profile, measure this machine again even when a tuned profile exists
            (`edgespec profile tune`).
    """

    target: str | os.PathLike[str] | None = None
    draft: str | os.PathLike[str] | None = None
    profile: str | os.PathLike[str] | None = None
    draft_max: int | None = None
    n_ctx: int = N_CTX
    threads: int | None = None
    draft_threads: int | None = None
    gpu_layers: int | None = None
    draft_gpu_layers: int | None = None
    kernels: str | None = None
    flash_attn: str = "off"
    draft_provider: str | None = None
    verbose: bool = False
    retune: bool = False
    parallel: int = 1

    def resolved(self) -> EngineSpec:
        """With nothing saying how to draft (no draft, profile or draft_max), `--profile auto`:
        measure, and draft only where it pays."""
        if self.profile is None and self.draft is None and self.draft_max is None:
            return replace(self, profile="auto")
        return self


@dataclass(frozen=True)
class Built:
    """What `build` made: the loaded pair (owning its models), the profile it follows (None
    without one) and the draft length to ask for per step."""

    pair: LoadedPair
    profile: Profile | None
    draft_max: int


def build(
    spec: EngineSpec,
    *,
    progress: Callable | None = None,
    tune_progress: Callable[[int], Any] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> Built:
    """Load the models `spec` describes and make its drafter; on failure everything opened so far
    is closed again.

    Args:
        progress: progress factory for joining a default model on first use (`models.resolve`).
        tune_progress: `tune_progress(total)` → a progress bar while a profile is tuned.
        on_note: told, one line each, what was decided (automatic placement, tuning, warnings).

    Raises:
        EdgespecError: a model is missing or unusable, the pair is incompatible, or a setting is
            out of range.
    """
    if on_note is not None:  # several candidate drafters load the same profile: say things once
        on_note = _once(on_note)
    spec = checked_threads(spec.resolved(), _warner(on_note))
    if isinstance(spec.parallel, bool) or not isinstance(spec.parallel, int) or spec.parallel < 1:
        raise SettingsError(f"parallel must be a whole number of at least 1, got {spec.parallel!r}")
    if spec.draft_max is not None:
        GenerationSettings(draft_max=spec.draft_max)  # its range, before anything loads
    draft: str | os.PathLike[str] | None = DEFAULT if spec.draft is None else spec.draft
    if spec.profile is not None:
        overrides = ProfileOverrides(
            threads=spec.threads,
            gpu_layers=spec.gpu_layers,
            draft_gpu_layers=spec.draft_gpu_layers,
            draft_threads=spec.draft_threads,
            kernels=spec.kernels,
        )

        def with_profile(draft: Any, why: str, retune: bool) -> tuple[LoadedPair, Profile]:
            return load_with_profile(
                str(spec.profile),
                spec.target,
                draft,
                n_ctx=spec.n_ctx,
                overrides=overrides,
                verbose=spec.verbose,
                progress=progress,
                tune_progress=tune_progress,
                on_note=on_note,
                retune=retune,
                why_draft=why,
                n_seq=spec.parallel,
            )

        why_draft = "the default drafter" if spec.draft is None else "named with --draft"
        retune = spec.retune
        if spec.draft is None and spec.target not in (None, DEFAULT):
            # a target of the user's own: pair a drafter from the models on this machine
            draft, why_draft, tuned_now = _paired_drafter(spec, overrides, with_profile, progress, on_note)
            retune = retune and not tuned_now
        pair, profile = with_profile(draft, why_draft, retune)
        pair = with_slots(pair, "auto", profile)
        k = profile.speculation
        draft_max = spec.draft_max
        if draft_max is None:
            draft_max = k.k_max if k.controller == "goodput" else k.k
        return Built(pair, profile, draft_max)
    settings = RuntimeSettings(
        n_ctx=spec.n_ctx,
        n_threads=spec.threads,
        gpu_layers=spec.gpu_layers or 0,
        flash_attn=spec.flash_attn,  # type: ignore[arg-type]  # checked by the CLI and Engine
        kernels=spec.kernels or "fast",  # type: ignore[arg-type]
        verbose=spec.verbose,
        n_seq=spec.parallel,
    )
    pair = load(
        spec.target,
        draft,
        settings,
        draft_gpu_layers=spec.draft_gpu_layers or 0,
        progress=progress,
        draft_provider=spec.draft_provider,
        draft_threads=spec.draft_threads,
        on_note=on_note,
    )
    pair = with_slots(pair, pair.draft if pair.draft in ("none", "ngram") else "draft", None)
    return Built(pair, None, DRAFT_MAX if spec.draft_max is None else spec.draft_max)


def with_slots(pair: LoadedPair, drafter: str, profile: Profile | None) -> LoadedPair:
    """`pair` with its sequences lent as slots, when its target context holds several
    (`EngineSpec.parallel`): each slot drafts as the pair does (`make_drafter(drafter, …)`), its
    model drafter on its own sequence of the shared draft context."""
    from edgespec.batching import Batcher, Slots

    target_rt = pair.engine.target
    n_seq = getattr(target_rt, "n_seq", 1)
    if n_seq == 1:
        return pair
    draft_rt = pair.draft_runtime
    if draft_rt is not None and getattr(draft_rt, "n_seq", 1) != n_seq:
        pair.close()
        raise SettingsError("parallel sequences need a GGUF draft model: an ONNX drafter holds one sequence")
    n_vocab = target_rt.vocab.n_vocab

    def drafter_for(view: Any) -> Drafter | None:
        model = ModelDrafter(view, max_id=n_vocab) if view is not None else None
        return make_drafter(drafter, DraftSetup(model, profile))

    draft_batcher = Batcher(draft_rt) if draft_rt is not None else None  # type: ignore[arg-type]
    slots = Slots(Batcher(target_rt), drafter_for, draft_batcher)  # type: ignore[arg-type]
    return replace(pair, slots=slots)


def checked_threads(spec: EngineSpec, warn: Callable[[str], None]) -> EngineSpec:
    """`spec` with its thread counts checked: below 1 is a SettingsError; above this machine's
    logical cores is capped to them, with a warning. llama.cpp's threads spin while they wait for
    each other, so more threads than cores makes decoding many times slower (1,000 threads on 2
    cores: 0.21 tokens/s against 30), and no count above the cores is ever faster."""
    cores = os.cpu_count() or 1

    def checked(name: str, n: int | None) -> int | None:
        if n is None:
            return None
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise SettingsError(f"{name} must be a whole number of at least 1, got {n!r}")
        if n > cores:
            warn(f"{name} {n} is more than this machine's {cores} logical cores: using {cores}")
            return cores
        return n

    return replace(
        spec,
        threads=checked("threads", spec.threads),
        draft_threads=checked("draft_threads", spec.draft_threads),
    )


def _once(on_note: Callable[[str], None]) -> Callable[[str], None]:
    """`on_note`, passing each distinct line on only the first time."""
    seen: set[str] = set()

    def note(line: str) -> None:
        if line not in seen:
            seen.add(line)
            on_note(line)

    return note


def _paired_drafter(
    spec: EngineSpec,
    overrides: ProfileOverrides,
    with_profile: Callable[[Any, str, bool], tuple[LoadedPair, Profile]],
    progress: Callable | None,
    on_note: Callable[[str], None] | None,
) -> tuple[Path | None, str, bool]:
    """The draft model for a target the user named, from the models on this machine (see
    `pairing`): of those that fit, the one whose tuned costs predict the fastest decoding. A
    candidate without saved costs is loaded and tuned now (with `spec.retune`, every one is).
    Returns (the draft model or None, why, whether it was tuned in this call)."""
    from edgespec.load.pairing import drafters_to_try
    from edgespec.placement.tuning import predicted_gain

    note = on_note or (lambda line: None)
    target_path = resolve_model_path(spec.target, "target", progress)
    if not target_path.is_file():
        return None, "", False  # loading the target says it is missing
    tries, why_none = drafters_to_try(target_path, note)
    if len(tries) <= 1:
        return (tries[0][0], tries[0][2], False) if tries else (None, why_none, False)
    tuned: set[Path] = set()
    profiles = []
    for path, _, why in tries:
        saved = None if spec.retune else saved_tune(str(spec.profile), target_path, path, overrides)
        if saved is None:
            pair, saved = with_profile(path, why, spec.retune)
            pair.close()
            tuned.add(path)
        profiles.append(saved)
    gains = [predicted_gain(p) for p in profiles]
    best = max(range(len(tries)), key=lambda i: (gains[i], -i))  # ties: the smaller
    path, name, why = tries[best]
    measured = "predicted " + ", ".join(f"{n} {g:.2f}x" for (_, n, _), g in zip(tries, gains, strict=True))
    note(f"drafter for {target_path.name}: {name}, the fastest ({measured} over plain decoding)")
    _remember_choice(profiles[best], measured)
    return path, f"{why}; {measured}", path in tuned


def _remember_choice(profile: Profile, measured: str) -> None:
    """Add to a tuned profile's saved choice how it compared with the other candidates."""
    from edgespec.placement.tuning import save

    costs = profile.costs
    if costs is None or profile.source is None or measured in costs.choice:
        return
    with contextlib.suppress(OSError):  # a read-only config folder: the note said it anyway
        save(replace(profile, costs=replace(costs, choice=f"{costs.choice}; {measured}")))


AUTO_PARALLEL = 4
"""The most sequences `--parallel auto` serves at once (LM Studio's default, and llama-server's)."""


def auto_parallel(
    spec: EngineSpec,
    most: int = AUTO_PARALLEL,
    available: int | None = None,
    progress: Callable | None = None,
) -> tuple[int, str]:
    """How many requests `edgespec serve --parallel auto` generates at once, and why: `most`, or
    fewer where the available RAM does not hold the weights plus a KV cache of `spec.n_ctx` tokens
    per sequence (the target's, and a draft model's already on disk) with a fifth of it (at least
    1 GiB) left to the rest of the machine. 1 with an ONNX drafter, which holds one sequence.

    Args:
        available: bytes of RAM available (default: psutil's `virtual_memory().available`).
    """
    draft = None if spec.draft is None else str(spec.draft)
    if draft is not None and (draft.endswith(".onnx") or Path(draft).expanduser().is_dir()):
        return 1, "an ONNX drafter holds one sequence"
    target = resolve_model_path(spec.target, "target", progress)
    if draft in (None, DEFAULT):
        draft_path: Path | None = models.cached_path(models.DRAFT)
    elif draft in ("none", "ngram"):
        draft_path = None
    else:
        draft_path = resolve_model_path(draft, "draft", progress)
    paths = [p for p in (target, draft_path) if p is not None and p.is_file()]
    if available is None:
        import psutil

        available = int(psutil.virtual_memory().available)
    usable = available - max(available // 5, 1 << 30)
    for n in range(most, 1, -1):
        needs = [memory_need(path, spec.n_ctx * n) for path in paths]
        if sum(need.total for need in needs if need is not None) <= usable:
            return n, f"the KV caches of {n} sequences of {spec.n_ctx} tokens fit the available RAM"
    if most <= 1:
        return 1, "at most one request at a time was asked for"
    return 1, f"two KV caches of {spec.n_ctx} tokens do not fit the available RAM"


def resolve_model_path(
    spec: str | os.PathLike[str] | None, role: str, progress: Callable | None = None
) -> Path:
    """A user's model argument as a GGUF path: "default"/None means the default model of `role`; a
    path that exists is itself; anything else is a model's name (`registry.resolve`: a listed
    name or a unique prefix of one, `ollama:NAME[:TAG]`, `hf:REPO[/FILE|:QUANT]`).

    Raises:
        ModelNotFound: no model answers to the name, or several do. A missing file given as a path
            is returned as it is, for its loader to say "model file not found".
    """
    if spec is None or str(spec) == DEFAULT:
        return models.resolve(models.DEFAULT_MODELS[role], progress)
    path = Path(spec).expanduser()
    if path.exists() or not isinstance(spec, str):
        return path
    from edgespec.load import registry

    try:
        return registry.resolve(spec).path
    except registry.AmbiguousModelName:
        raise
    except registry.ModelNotFound:
        if registry.looks_like_path(spec):
            return path
        raise


def load(
    target: str | os.PathLike[str] | None = None,
    draft: str | os.PathLike[str] | None = DEFAULT,
    settings: RuntimeSettings | None = None,
    draft_gpu_layers: int = 0,
    progress: Callable | None = None,
    draft_provider: str | None = None,
    draft_threads: int | None = None,
    on_note: Callable[[str], None] | None = None,
) -> LoadedPair:
    """Load a target and a drafter, checking that they are compatible and fit the available RAM.

    Args:
        target: GGUF path, or None / "default" for the default target.
        draft: GGUF path, ONNX export folder, "default" (the default drafter), "ngram" (prompt
            lookup) or "none".
        settings: runtime settings for the target.
        draft_gpu_layers: layers of a draft model to offload to a GPU. Otherwise the draft model
            runs with the target's settings, but always on llama.cpp's fast kernels: its rounding
            cannot change the output, only which tokens are proposed.
        progress: progress factory for joining a default model on first use (see models.resolve).
        draft_provider: ONNX Runtime execution provider for an ONNX drafter.
        draft_threads: CPU threads for the draft model (None: the target's).
        on_note: told warnings (GPU layers asked for without a usable GPU), one line each; None:
            the "edgespec" logger.

    Raises:
        ModelLoadError: a model is missing or unusable, or the pair does not fit the available
            RAM (see `memory.check_memory`; `EDGESPEC_SKIP_MEMORY_CHECK=1` loads anyway).
        IncompatibleModelsError: the draft model cannot draft for the target.
    """
    settings = settings or RuntimeSettings()
    target_path = resolve_model_path(target, "target", progress)
    draft_spec = DEFAULT if draft is None else str(draft)
    has_model = draft_spec not in ("none", "ngram")
    # The draft is resolved (on first use, joined) before the target loads, so that the memory
    # check sees both; not when the target is missing, which is the error to report.
    draft_path = (
        resolve_model_path(draft_spec, "draft", progress) if has_model and target_path.is_file() else None
    )
    draft_layers = draft_gpu_layers if has_model else 0
    gpu = False
    if settings.gpu_layers or draft_layers:
        from edgespec.placement.hardware import detect_hardware

        hw = detect_hardware()
        gpu = hw.best_gpu() is not None
        warning = no_gpu_warning(hw, settings.gpu_layers, draft_layers)
        if warning:
            _warner(on_note)(warning)
    cells = settings.n_ctx * settings.n_seq
    draft_need = memory_need(draft_path, cells, draft_layers, gpu) if draft_path is not None else None
    check_memory([memory_need(target_path, cells, settings.gpu_layers, gpu), draft_need])
    with owned(open_gguf(target_path, settings)) as (target_rt, stack):
        model = None
        label = draft_spec
        if has_model:
            draft_settings = settings
            if draft_threads is not None:
                draft_settings = replace(settings, n_threads=draft_threads, n_threads_batch=draft_threads)
            draft_rt = load_draft_model(
                draft_path or draft_spec,
                target_rt,
                draft_settings,
                draft_gpu_layers,
                progress,
                provider=draft_provider,
            )
            model = ModelDrafter(draft_rt, max_id=target_rt.vocab.n_vocab)
            label = str(draft_rt.path)
        drafter = make_drafter("draft" if has_model else draft_spec, DraftSetup(model))
        stack.pop_all()
    return LoadedPair(SpeculativeEngine(target_rt, drafter), target_path, label)


def load_draft_model(
    spec: str | os.PathLike[str],
    target: Runtime,
    settings: RuntimeSettings,
    gpu_layers: int = 0,
    progress: Callable | None = None,
    provider: str | None = None,
) -> Runtime:
    """Load a draft model and check that it can draft for `target`.

    Args:
        spec: "default", a GGUF path, or an ONNX export (`edgespec export onnx` folder or its
            model.onnx), which runs on ONNX Runtime.
        settings: the target's settings; the drafter always uses fast kernels: its rounding cannot
            change the output, only which tokens are proposed.
        gpu_layers: llama.cpp layers to offload (GGUF drafters).
        provider: ONNX Runtime execution provider (ONNX drafters; None picks the best available).
    """
    draft_path = resolve_model_path(spec, "draft", progress)
    draft_settings = replace(settings, gpu_layers=gpu_layers, kernels="fast")
    draft_rt: Runtime
    if is_onnx_model(draft_path):
        from edgespec.runtimes.onnx import OnnxRuntime

        draft_rt = OnnxRuntime(draft_path, draft_settings, provider=provider)
    else:
        if provider is not None:
            raise SettingsError(
                "--draft-provider applies to ONNX drafters (an `edgespec export onnx` folder)"
            )
        draft_rt = open_gguf(draft_path, draft_settings)
    with owned(draft_rt) as (_, stack):
        check_compatible(target, draft_rt)
        stack.pop_all()
    return draft_rt


def is_onnx_model(path: Path) -> bool:
    """An ONNX export: a folder with model.onnx, or an .onnx file."""
    return path.suffix == ".onnx" or (path.is_dir() and (path / "model.onnx").is_file())


@dataclass(frozen=True)
class ProfileOverrides:
    """Command-line settings that win over a profile's (None: take the profile's)."""

    threads: int | None = None
    gpu_layers: int | None = None
    draft_gpu_layers: int | None = None
    draft_threads: int | None = None
    kernels: str | None = None


def resolve_profile(
    spec: str, hw: Any, target_path: Path, draft_path: Path | None
) -> tuple[Profile, list[str]]:
    """The profile `spec` names ("auto": the one detect_profile picks for this machine and pair),
    with the reasons for an automatic choice."""
    from edgespec.placement.profiles import (
        DEFAULT_N_LAYERS,
        detect_profile,
        gguf_block_count,
        load_profile,
        model_bytes,
    )

    if spec != "auto":
        return load_profile(spec), []
    size = model_bytes(draft_path) if draft_path is not None else 0
    # The layer count only matters when a GPU could take some of the target's layers (partial).
    layers = (gguf_block_count(target_path) if hw.best_gpu() is not None else None) or DEFAULT_N_LAYERS
    detection = detect_profile(hw, model_bytes(target_path), size, n_layers=layers)
    profile = load_profile(detection.profile)
    if detection.target_gpu_layers is not None:
        profile = replace(profile, target=replace(profile.target, gpu_layers=detection.target_gpu_layers))
    return profile, detection.reasons


def load_with_profile(
    spec: str,
    target: str | os.PathLike[str] | None = None,
    draft: str | os.PathLike[str] | None = DEFAULT,
    *,
    n_ctx: int = N_CTX,
    overrides: ProfileOverrides = ProfileOverrides(),
    verbose: bool = False,
    progress: Callable | None = None,
    tune_progress: Callable[[int], Any] | None = None,
    on_note: Callable[[str], None] | None = None,
    retune: bool = False,
    why_draft: str = "",
    n_seq: int = 1,
) -> tuple[LoadedPair, Profile]:
    """Load a pair placed and drafted as a profile says.

    A profile with the goodput controller needs measured costs: a tuned profile has them; for any
    other the tuned profile saved for this machine, pair and base profile is used, and when there
    is none the pair is tuned now (`tune_progress(total)` gives a progress bar) and saved.

    Args:
        spec: a profile name, a .toml path, or "auto" (the detected placement, tuned).
        target, draft: as for `load`; draft names the draft model ("ngram"/"none" are the
            profile's choice to make, and are refused here); None: no draft model, so the
            profile drafts without one (n-grams) or not at all.
        overrides: command-line settings that win over the profile's.
        on_note: told what was decided (the automatic choice, tuning, a GPU profile moved to the
            CPU) in one line each; None: warnings go to the "edgespec" logger, the rest nowhere.
        retune: measure again even when a tuned profile exists (`edgespec profile tune`); a
            profile that already has costs is re-tuned from its placement.
        why_draft: why this draft model (saved with a new tune, in `costs.choice`).
        n_seq: sequences each context holds (`RuntimeSettings.n_seq`).

    Returns:
        (the loaded pair, the profile it follows, with costs). On a machine without a GPU that
        llama.cpp can use, a profile that needs one is replaced by `placement.cpu_fallback`'s
        CPU profile, with a warning.

    Raises:
        ModelLoadError: as for `load` (a missing or unusable model, not enough RAM).
    """
    from edgespec.placement.hardware import detect_hardware
    from edgespec.placement.tuning import find_tuned, needs_costs

    note = on_note or (lambda line: None)
    warn = _warner(on_note)
    if str(draft) in ("none", "ngram"):
        raise SettingsError(
            f"--draft {draft} cannot be combined with a profile: the profile's [speculation] drafters "
            'choose the draft sources (use a profile with drafters = [] or ["ngram"])'
        )
    target_path = resolve_model_path(target, "target", progress)
    if not target_path.is_file():  # before a default drafter is joined on first use
        raise ModelLoadError(f"model file not found: {target_path}")
    hw = detect_hardware()
    probe_draft = resolve_model_path(draft, "draft", progress) if draft is not None else None
    profile = placed_profile(spec, hw, target_path, probe_draft, overrides, note, warn)
    o = overrides
    target_settings, draft_settings, draft_layers = placed_settings(profile, o, hw, n_ctx, verbose)
    target_settings = replace(target_settings, n_seq=n_seq)
    draft_settings = replace(draft_settings, n_seq=n_seq)
    if not retune and needs_costs(profile):
        # A saved tune may have dropped the model drafter: then the draft model is not loaded.
        wanted = probe_draft if "model" in profile.speculation.drafters else None
        profile = find_tuned(profile, hw, target_path, wanted) or profile
    wants_model = "model" in profile.speculation.drafters
    unusable = no_gpu_warning(hw, o.gpu_layers or 0, (o.draft_gpu_layers or 0) if wants_model else 0)
    if unusable:  # layers asked for on the command line
        warn(unusable)
    gpu = hw.best_gpu() is not None
    cells = n_ctx * n_seq
    draft_need = memory_need(probe_draft, cells, draft_layers, gpu) if wants_model and probe_draft else None
    check_memory([memory_need(target_path, cells, target_settings.gpu_layers, gpu), draft_need])
    with owned(open_gguf(target_path, target_settings)) as (target_rt, stack):
        draft_rt: Runtime | None = None
        if wants_model and probe_draft is not None:
            draft_rt = load_draft_model(probe_draft, target_rt, draft_settings, draft_layers, progress)
            stack.callback(draft_rt.close)
        profile = ensure_tuned(
            profile,
            hw,
            target_rt,
            draft_rt,
            tune_progress=tune_progress,
            on_note=note,
            retune=retune,
            why_draft=why_draft,
        )
        if "model" not in profile.speculation.drafters and draft_rt is not None:
            draft_rt.close()  # tuning dropped the model drafter
            draft_rt = None
        model = ModelDrafter(draft_rt, max_id=target_rt.vocab.n_vocab) if draft_rt is not None else None
        drafter = make_drafter("auto", DraftSetup(model, profile))
        stack.pop_all()
    label = f"profile {profile.name}"
    return LoadedPair(SpeculativeEngine(target_rt, drafter), target_path, label), profile


def placed_profile(
    spec: str,
    hw: Any,
    target_path: Path,
    draft_path: Path | None,
    overrides: ProfileOverrides,
    note: Callable[[str], None],
    warn: Callable[[str], None],
) -> Profile:
    """The profile `spec` names, as it applies to this machine and pair before tuning: without the
    model drafter when there is no draft model, on the CPU where a GPU it needs is missing
    (`warn`ed), on the kernels the command line asks for (`note` hears an automatic choice)."""
    from edgespec.placement.profiles import cpu_fallback

    profile, reasons = resolve_profile(spec, hw, target_path, draft_path)
    if draft_path is None:  # nothing here can draft for this target: the other sources only
        others = tuple(d for d in profile.speculation.drafters if d != "model")
        profile = replace(profile, speculation=replace(profile.speculation, drafters=others))
    if reasons:
        note(f"profile {profile.name}: " + "; ".join(reasons))
    fallback = cpu_fallback(profile, hw)
    if fallback is not None:
        profile, warning = fallback
        warn(warning)
    if overrides.kernels and overrides.kernels != profile.target.kernels:
        # Costs measured under the other kernels do not hold: tune (or find the tune) for these.
        profile = replace(profile, target=replace(profile.target, kernels=overrides.kernels), costs=None)
    return profile


def saved_tune(spec: str, target_path: Path, draft_path: Path, overrides: ProfileOverrides) -> Profile | None:
    """The tuned profile `load_with_profile` would find for this pair without measuring (None when
    it would have to tune first); nothing is loaded."""
    from edgespec.placement.hardware import detect_hardware
    from edgespec.placement.tuning import find_tuned, needs_costs

    hw = detect_hardware()
    profile = placed_profile(spec, hw, target_path, draft_path, overrides, lambda _: None, lambda _: None)
    if not needs_costs(profile):
        return profile
    return find_tuned(
        profile, hw, target_path, draft_path if "model" in profile.speculation.drafters else None
    )


def placed_settings(
    profile: Profile, o: ProfileOverrides, hw: Any, n_ctx: int, verbose: bool
) -> tuple[RuntimeSettings, RuntimeSettings, int]:
    """The target's and the draft model's runtime settings, and the draft model's GPU layers, as
    the profile places them on this machine, command-line overrides winning."""
    threads, threads_batch = profile.target.resolve_threads(hw)
    target_settings = RuntimeSettings(
        n_ctx=n_ctx,
        n_threads=o.threads or threads,
        n_threads_batch=o.threads or threads_batch,
        gpu_layers=profile.target.gpu_layers if o.gpu_layers is None else o.gpu_layers,
        kernels=profile.target.kernels,  # type: ignore[arg-type]
        verbose=verbose,
    )
    d_threads, d_threads_batch = profile.draft.resolve_threads(hw)
    draft_settings = replace(
        target_settings,
        n_threads=o.draft_threads or d_threads,
        n_threads_batch=o.draft_threads or d_threads_batch,
    )
    draft_layers = profile.draft.gpu_layers if o.draft_gpu_layers is None else o.draft_gpu_layers
    return target_settings, draft_settings, draft_layers


def ensure_tuned(
    profile: Profile,
    hw: Any,
    target: Runtime,
    draft: Runtime | None,
    *,
    tune_progress: Callable[[int], Any] | None = None,
    on_note: Callable[[str], None] | None = None,
    retune: bool = False,
    why_draft: str = "",
) -> Profile:
    """The profile with measured costs where its controller needs them: its own, else the tuned
    profile saved for this machine, pair and base profile, else measured now and saved (with
    `why_draft`, why this draft model, in its `costs.choice`).

    Args:
        target, draft: the loaded models, placed as the profile says (draft None: n-grams only).
        tune_progress: `tune_progress(total)` → a progress bar for the measurement.
        on_note: told in one line when tuning ran and where the result went.
        retune: measure again even when costs exist.
    """
    from edgespec.placement.profiles import user_profile_dir
    from edgespec.placement.tuning import find_tuned, needs_costs, save, steps, tune, tuned_profile

    spec = profile.speculation
    if retune and profile.costs is not None:
        profile = replace(profile, costs=None)
    if not retune and not needs_costs(profile):
        return profile
    draft_path = draft.path if draft is not None else None
    found = None if retune else find_tuned(profile, hw, target.path, draft_path)
    if found is not None:
        return found
    bar = tune_progress(steps(spec.drafters, draft is not None)) if tune_progress else None
    with bar if bar is not None else contextlib.nullcontext() as b:
        result = tune(
            target,
            draft,
            drafters=spec.drafters,
            k_max=spec.k_max,
            on_step=(lambda label: b.update(1)) if b is not None else None,
        )
    tuned = tuned_profile(profile, result, hw, target.path, draft_path, why_draft)
    why = "; ".join(result.notes) or "all drafters kept"
    try:
        path = save(tuned)
    except OSError as exc:
        # A read-only config folder (a container, a locked-down home) must not make the default
        # unusable: the measured profile serves this run from memory, and the user is told once.
        _warner(on_note)(
            f"tuned {profile.name} on this machine ({why}) but could not save it: "
            f"cannot write {exc.filename or user_profile_dir()} ({exc.strerror or exc}); "
            "using it for this run only "
            "(set EDGESPEC_CONFIG_DIR to a writable folder to keep it)"
        )
        return tuned
    if on_note is not None:
        on_note(f"tuned {profile.name} on this machine ({why}); saved {path}")
    return replace(tuned, source=path)
