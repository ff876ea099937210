"""Placement profiles: where the drafter and the target run, with how many threads, and how much to draft.

A profile is a TOML file (schema in profiles/README.md). Built-in profiles ship in the data package
`edgespec.profiles` (the top-level folder profiles/); user profiles live in `user_profile_dir()`, and a
user profile with a built-in's name shadows it. Settings merge in one order: built-in defaults <
profile < command-line flags.

`detect_profile()` picks the built-in profile that suits a machine and a model pair, with its reasons.
`cpu_fallback()` moves a profile that needs a GPU onto the CPU of a machine without one.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import math
import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from edgespec.defaults import DRAFT_MAX, K_LIMIT
from edgespec.errors import ProfileError
from edgespec.fileio import user_config_dir
from edgespec.placement.hardware import Hardware
from edgespec.placement.tomldata import TomlReader, compact_arrays, loads, show_value

logger = logging.getLogger("edgespec")

SCHEMA = 1
ALL_LAYERS = -1  # gpu_layers = "all"
THREAD_WORDS = ("physical", "logical")
KERNELS = ("exact", "fast")
DRAFTERS = ("model", "ngram")
CONTROLLERS = ("goodput", "fixed")
HEADROOM = 1.2  # GPU memory needed = 1.2 × the model files: KV cache and compute buffers come on top
DEFAULT_N_LAYERS = 28  # Qwen2.5-Coder-1.5B, the default target
BUILTIN_PACKAGE = "edgespec.profiles"
# detect_profile's order, most GPU first; each step down needs less GPU memory.
DETECT_ORDER = ("gpu-all", "partial", "dovetail", "cpu-only")

_NAME = re.compile(r"[a-z0-9-]+")
_MIB = 1 << 20

_TOP_KEYS = ("schema", "name", "description", "requires", "target", "draft", "speculation", "costs")
_REQUIRES_KEYS = ("gpu", "min_gpu_free_mib", "min_physical_cores", "min_available_ram_mib")
_TARGET_KEYS = ("gpu_layers", "threads", "threads_batch", "kernels")
_DRAFT_KEYS = ("gpu_layers", "threads", "threads_batch")
_SPECULATION_KEYS = ("drafters", "controller", "k", "k_max", "min_draft_prob", "overlap")
_COSTS_KEYS = (
    "machine",
    "target",
    "draft",
    "measured",
    "t_verify_ms",
    "t_draft_ms",
    "acceptance_model",
    "acceptance_ngram",
    "choice",
    "method",
)

#: how `edgespec profile tune` measures costs. 2: since every llama_decode of a process runs on
#: one native thread (`edgespec.runtimes.native`). Before, a tune on a CPU with few cores could time
#: its passes beside an idle OpenMP team, whose throttled barriers slowed multi-row passes most: on a
#: 2-core VM (2026-12-08) such a tune had T(16) = 12.3·T(1), a new one 9.1·T(1), and the default
#: then never drafted. A saved tune from an earlier method is measured again on its next use.
COSTS_METHOD = 2


@dataclass(frozen=True)
class Requirements:
    """What a machine needs for a profile to fit (`[requires]`)."""

    gpu: bool = False
    min_gpu_free_mib: int = 0
    min_physical_cores: int = 1
    min_available_ram_mib: int = 0


@dataclass(frozen=True)
class ModelPlacement:
    """Where and how one model runs (`[target]` or `[draft]`).

    Attributes:
        gpu_layers: layers offloaded to the GPU; ALL_LAYERS (-1) for all of them.
        threads: CPU threads for one-token decoding: a count, "physical" or "logical" (cores).
        threads_batch: threads for batches (prompts, verification); None = the same as `threads`.
        kernels: "fast" (llama.cpp's own kernels; the output is the target's in distribution) or
            "exact" (verified row-invariant kernels; output token-identical to target-only); only
            the target's is meaningful (a drafter's rounding cannot change the output, so it
            always runs llama.cpp's fast kernels).
    """

    gpu_layers: int = 0
    threads: int | str = "physical"
    threads_batch: int | str | None = None
    kernels: str = "fast"

    def resolve_threads(self, hw: Hardware) -> tuple[int, int]:
        """(threads, threads_batch) as counts on this machine."""
        threads = _thread_count(self.threads, hw)
        batch = threads if self.threads_batch is None else _thread_count(self.threads_batch, hw)
        return threads, batch


def _thread_count(value: int | str, hw: Hardware) -> int:
    if value == "physical":
        return hw.physical_cores
    if value == "logical":
        return hw.logical_cores
    return int(value)


@dataclass(frozen=True)
class Speculation:
    """How much to draft (`[speculation]`)."""

    drafters: tuple[str, ...] = DRAFTERS
    controller: str = "goodput"
    k: int = DRAFT_MAX
    k_max: int = K_LIMIT
    min_draft_prob: float = 0.0
    overlap: bool = False


@dataclass(frozen=True)
class TunedCosts:
    """Costs measured by `edgespec profile tune` on one machine for one model pair (`[costs]`).

    Attributes:
        machine: Hardware.fingerprint() of the machine they were measured on.
        target, draft: "file name:size in bytes" of each model; draft "" when there is none.
        measured: when, as an ISO 8601 UTC timestamp.
        t_verify_ms: T(n), one target pass over n tokens, for n = 1, 2, ... (ms).
        t_draft_ms: one model-draft token (ms).
        acceptance_model, acceptance_ngram: per-position acceptance estimates in [0, 1].
        choice: why this drafter was measured and what tuning concluded, in words ("" if unsaid).
        method: how they were measured (`COSTS_METHOD` when tuning writes them; 1 when a file
            does not say).
    """

    machine: str
    target: str
    draft: str
    measured: str
    t_verify_ms: tuple[float, ...]
    t_draft_ms: float
    acceptance_model: tuple[float, ...] = ()
    acceptance_ngram: tuple[float, ...] = ()
    choice: str = ""
    method: int = COSTS_METHOD


@dataclass(frozen=True)
class Profile:
    """One placement profile. `source` and `builtin` say where it came from and do not take part in ==."""

    name: str
    description: str
    source: Path | None = field(default=None, compare=False)
    requires: Requirements = Requirements()
    target: ModelPlacement = ModelPlacement()
    draft: ModelPlacement = ModelPlacement()
    speculation: Speculation = Speculation()
    costs: TunedCosts | None = None
    builtin: bool = field(default=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        """The profile as TOML-ready data: every key written out, except those that mean "default"
        by their absence (threads_batch = threads, no [costs])."""
        data: dict[str, Any] = {"schema": SCHEMA, "name": self.name, "description": self.description}
        data["requires"] = dataclasses.asdict(self.requires)
        data["target"] = _placement_dict(self.target, with_kernels=True)
        data["draft"] = _placement_dict(self.draft, with_kernels=False)
        spec = dataclasses.asdict(self.speculation)
        spec["drafters"] = list(self.speculation.drafters)
        data["speculation"] = spec
        if self.costs is not None:
            costs = dataclasses.asdict(self.costs)
            for key in ("t_verify_ms", "acceptance_model", "acceptance_ngram"):
                costs[key] = list(costs[key])
            data["costs"] = costs
        return data

    @property
    def guarantee_text(self) -> str:
        """The output guarantee its target kernels give, in words."""
        if self.target.kernels == "exact":
            return (
                "exact (output token-identical to target-only; the kernels are verified on the loaded "
                "model by the invariance probe, and loading fails where none is row-invariant)"
            )
        return (
            "distribution (llama.cpp's kernels: output the target's in distribution; at temperature 0 a "
            "near-tie may break otherwise after a verification pass)"
        )

    def to_toml(self) -> str:
        """The profile as TOML that `parse_profile` reads back to an equal Profile."""
        import tomli_w

        return compact_arrays(tomli_w.dumps(self.to_dict()))

    def with_costs(self, costs: TunedCosts, name: str, description: str) -> Profile:
        """A copy carrying measured costs under a new name (for `edgespec profile tune`)."""
        if not _NAME.fullmatch(name):
            raise ProfileError(f"profile name must match [a-z0-9-]+, got {show_value(name)}")
        return dataclasses.replace(
            self, costs=costs, name=name, description=description, source=None, builtin=False
        )

    def check_fits(self, hw: Hardware) -> list[str]:
        """The requirements this machine does not meet, as sentences; empty when the profile fits."""
        req = self.requires
        unmet = []
        best = hw.best_gpu()
        if req.gpu and best is None:
            unmet.append(f"needs a GPU that llama.cpp can use: {no_gpu_reason(hw)}")
        if req.min_gpu_free_mib > 0:
            if best is None:
                if not req.gpu:
                    unmet.append(f"needs {req.min_gpu_free_mib:,} MiB free on a GPU: {no_gpu_reason(hw)}")
            elif best[1].free_mib is not None and best[1].free_mib < req.min_gpu_free_mib:
                unmet.append(
                    f"needs {req.min_gpu_free_mib:,} MiB free on a GPU; {best[1].name} has "
                    f"{best[1].free_mib:,} MiB"
                )
        if hw.physical_cores < req.min_physical_cores:
            unmet.append(
                f"needs {req.min_physical_cores} physical cores; this machine has {hw.physical_cores}"
            )
        if hw.available_ram_mib < req.min_available_ram_mib:
            unmet.append(
                f"needs {req.min_available_ram_mib:,} MiB of available RAM; {hw.available_ram_mib:,} MiB "
                "is available"
            )
        return unmet


def _placement_dict(placement: ModelPlacement, with_kernels: bool) -> dict[str, Any]:
    data: dict[str, Any] = {
        "gpu_layers": "all" if placement.gpu_layers == ALL_LAYERS else placement.gpu_layers,
        "threads": placement.threads,
    }
    if placement.threads_batch is not None:
        data["threads_batch"] = placement.threads_batch
    if with_kernels:
        data["kernels"] = placement.kernels
    return data


# --- parsing and validation -------------------------------------------------------------------------


def parse_profile(data: dict[str, Any], source: str) -> Profile:
    """Validate parsed TOML data and build a Profile.

    Args:
        data: the TOML document as a dict (tomllib.loads).
        source: how error messages name the file, e.g. "dovetail.toml".

    Raises:
        ProfileError: an unknown key (at any level), a missing required key, a wrong type or a value
            out of range; the one-line message names the file and the full key.
    """
    r = TomlReader(source)
    r.keys(data, _TOP_KEYS)
    schema = r.required(data, "schema")
    if schema != SCHEMA or isinstance(schema, bool):
        raise r.fail(f"schema must be {SCHEMA}, got {show_value(schema)}")
    name = r.string(r.required(data, "name"), "name")
    if not _NAME.fullmatch(name):
        raise r.fail(f"name must match [a-z0-9-]+, got {show_value(name)}")
    description = r.string(r.required(data, "description"), "description")
    if "\n" in description:
        raise r.fail("description must be one line")

    req = r.table(data, "requires", _REQUIRES_KEYS)
    defaults = Requirements()
    requires = Requirements(
        gpu=r.boolean(req.get("gpu", defaults.gpu), "requires.gpu"),
        min_gpu_free_mib=r.integer(req.get("min_gpu_free_mib", 0), "requires.min_gpu_free_mib", 0),
        min_physical_cores=r.integer(req.get("min_physical_cores", 1), "requires.min_physical_cores", 1),
        min_available_ram_mib=r.integer(
            req.get("min_available_ram_mib", 0), "requires.min_available_ram_mib", 0
        ),
    )
    target = _placement(r, r.table(data, "target", _TARGET_KEYS), "target")
    draft = _placement(r, r.table(data, "draft", _DRAFT_KEYS), "draft")
    speculation = _speculation(r, r.table(data, "speculation", _SPECULATION_KEYS))
    costs = None
    if "costs" in data:
        costs = _costs(r, r.table(data, "costs", _COSTS_KEYS))
    return Profile(
        name=name,
        description=description,
        requires=requires,
        target=target,
        draft=draft,
        speculation=speculation,
        costs=costs,
    )


def _layers(r: TomlReader, value: Any, key: str) -> int:
    if value == "all" and isinstance(value, str):
        return ALL_LAYERS
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise r.fail(f'{key} must be an integer >= 0 or "all", got {show_value(value)}')


def _threads(r: TomlReader, value: Any, key: str) -> int | str:
    if isinstance(value, str) and value in THREAD_WORDS:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise r.fail(f'{key} must be an integer >= 1, "physical" or "logical", got {show_value(value)}')


def _placement(r: TomlReader, table: dict[str, Any], prefix: str) -> ModelPlacement:
    threads = _threads(r, table.get("threads", "physical"), f"{prefix}.threads")
    batch = table.get("threads_batch")
    return ModelPlacement(
        gpu_layers=_layers(r, table.get("gpu_layers", 0), f"{prefix}.gpu_layers"),
        threads=threads,
        threads_batch=None if batch is None else _threads(r, batch, f"{prefix}.threads_batch"),
        kernels=r.choice(table.get("kernels", "fast"), f"{prefix}.kernels", KERNELS),
    )


def _speculation(r: TomlReader, table: dict[str, Any]) -> Speculation:
    defaults = Speculation()
    drafters = table.get("drafters", list(defaults.drafters))
    if not isinstance(drafters, list):
        raise r.fail(
            f"speculation.drafters must be a list of {', '.join(show_value(d) for d in DRAFTERS)}, "
            f"got {show_value(drafters)}"
        )
    for i, drafter in enumerate(drafters):
        r.choice(drafter, f"speculation.drafters[{i}]", DRAFTERS)
        if drafter in drafters[:i]:
            raise r.fail(f"speculation.drafters lists {show_value(drafter)} twice")
    k_max = r.integer(table.get("k_max", defaults.k_max), "speculation.k_max", 1, K_LIMIT)
    k = r.integer(table.get("k", defaults.k), "speculation.k", 1, K_LIMIT)
    if k > k_max:
        raise r.fail(f"speculation.k ({k}) must not exceed speculation.k_max ({k_max})")
    return Speculation(
        drafters=tuple(drafters),
        controller=r.choice(
            table.get("controller", defaults.controller), "speculation.controller", CONTROLLERS
        ),
        k=k,
        k_max=k_max,
        min_draft_prob=r.number(
            table.get("min_draft_prob", 0.0), "speculation.min_draft_prob", 0.0, 1.0, "a number in [0, 1)"
        ),
        overlap=r.boolean(table.get("overlap", defaults.overlap), "speculation.overlap"),
    )


def _costs(r: TomlReader, table: dict[str, Any]) -> TunedCosts:
    def need(key: str) -> Any:
        return r.required(table, key, "costs.")

    for key in ("machine", "target", "measured", "t_verify_ms", "t_draft_ms"):  # in the schema's order
        need(key)
    measured = need("measured")
    if isinstance(measured, datetime.datetime):  # an unquoted TOML date-time
        measured = measured.isoformat().replace("+00:00", "Z")
    return TunedCosts(
        machine=r.string(need("machine"), "costs.machine"),
        target=r.string(need("target"), "costs.target"),
        draft=r.string(table.get("draft", ""), "costs.draft"),
        measured=r.string(measured, "costs.measured"),
        t_verify_ms=r.numbers(
            need("t_verify_ms"),
            "costs.t_verify_ms",
            2,
            "a list of at least 2 positive numbers",
            positive=True,
        ),
        t_draft_ms=r.number(need("t_draft_ms"), "costs.t_draft_ms", 0.0),
        acceptance_model=r.numbers(
            table.get("acceptance_model", []), "costs.acceptance_model", 0, "a list of numbers in [0, 1]"
        ),
        acceptance_ngram=_ngram_priors(r, table.get("acceptance_ngram", [])),
        choice=r.string(table.get("choice", ""), "costs.choice"),
        method=r.integer(table.get("method", 1), "costs.method", 1),
    )


def _ngram_priors(r: TomlReader, value: Any) -> tuple[float, ...]:
    """costs.acceptance_ngram: empty, or one prior per n-gram match-length bucket."""
    from edgespec.control import MATCH_BUCKETS

    priors = r.numbers(value, "costs.acceptance_ngram", 0, "a list of numbers in [0, 1]")
    if priors and len(priors) != len(MATCH_BUCKETS):
        raise r.fail(
            f"costs.acceptance_ngram must have {len(MATCH_BUCKETS)} values, one per match-length bucket "
            f"(1, 2, 3-4, 5-8, 9-16, 17+ tokens), got {len(priors)}"
        )
    return priors


# --- finding profiles -------------------------------------------------------------------------------


#: the most a profile file may hold; the shipped ones are about 1 KB, tuned ones about 2 KB
MAX_PROFILE_BYTES = 256 * 1024


def _read_profile_text(path: Path) -> str:
    """A profile file's text, read only from a regular file of at most MAX_PROFILE_BYTES: a FIFO,
    a device such as /dev/zero or a huge file is refused at once instead of hanging or filling
    memory. The checks are made on the open descriptor, so the file cannot be swapped between them."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ProfileError(f"cannot read profile file {path}: not a regular file")
        if info.st_size > MAX_PROFILE_BYTES:
            raise ProfileError(
                f"cannot read profile file {path}: {info.st_size} bytes, more than a profile may hold "
                f"({MAX_PROFILE_BYTES})"
            )
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = handle.read(MAX_PROFILE_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_PROFILE_BYTES:  # it grew after fstat
        raise ProfileError(f"cannot read profile file {path}: more than {MAX_PROFILE_BYTES} bytes")
    return data.decode("utf-8")


def read_profile(path: str | os.PathLike[str]) -> Profile:
    """Read and validate one profile file; errors name the file as given."""
    path = Path(path).expanduser()
    try:
        text = _read_profile_text(path)
    except FileNotFoundError:
        raise ProfileError(f"no profile file {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ProfileError(f"cannot read profile file {path}: {exc}") from None
    label = str(path)
    return dataclasses.replace(parse_profile(loads(text, label), label), source=path)


def builtin_profiles() -> list[Profile]:
    """The profiles shipped with edgespec, sorted by name."""
    found = []
    for entry in resources.files(BUILTIN_PACKAGE).iterdir():
        if entry.name.endswith(".toml"):
            profile = parse_profile(loads(entry.read_text(encoding="utf-8"), entry.name), entry.name)
            found.append(dataclasses.replace(profile, source=Path(str(entry)), builtin=True))
    return sorted(found, key=lambda p: p.name)


def user_profile_dir() -> Path:
    """Where user profiles live: `user_config_dir()/profiles`."""
    return user_config_dir() / "profiles"


@dataclass(frozen=True)
class UserProfiles:
    """What the user profile folder holds: the profiles that read cleanly, and the files that did
    not (each with its one-line error), so that one stray file breaks only a run that asks for it."""

    profiles: list[Profile]
    broken: dict[Path, ProfileError]
    duplicated: dict[str, ProfileError]  # a profile name that two or more files define

    def warn(self) -> None:
        for path, error in self.broken.items():
            logger.warning("skipped profile file %s: %s", path, error)
        for error in self.duplicated.values():
            logger.warning("skipped user profile: %s", error)

    def error_for(self, name: str) -> ProfileError | None:
        """The error to raise when profile `name` is asked for and it may be a broken file: one
        whose file name (without .toml) is `name`, or a name two files define."""
        for path, error in self.broken.items():
            if path.stem == name:
                return error
        return self.duplicated.get(name)


def scan_user_profiles() -> UserProfiles:
    """Read every *.toml in user_profile_dir(). A file that cannot be read or parsed is set aside
    in `broken`, and a name that several files define in `duplicated`: neither is raised here."""
    folder = user_profile_dir()
    if not folder.is_dir():
        return UserProfiles([], {}, {})
    by_name: dict[str, list[Profile]] = {}
    broken: dict[Path, ProfileError] = {}
    for path in sorted(folder.glob("*.toml")):
        try:
            profile = read_profile(path)
        except ProfileError as exc:
            broken[path] = exc
            continue
        by_name.setdefault(profile.name, []).append(profile)
    found = [same[0] for same in by_name.values() if len(same) == 1]
    duplicated = {
        name: ProfileError(" and ".join(str(p.source) for p in same) + f" both define profile {name}")
        for name, same in by_name.items()
        if len(same) > 1
    }
    return UserProfiles(found, broken, duplicated)


def user_profiles() -> list[Profile]:
    """The *.toml profiles in user_profile_dir() that read cleanly, by file name; each file that
    does not is skipped with a warning on the "edgespec" logger."""
    scan = scan_user_profiles()
    scan.warn()
    return scan.profiles


def list_profiles() -> list[Profile]:
    """Built-in profiles, then user profiles; a user profile shadows a built-in of the same name
    (see `shadowed`), which is still listed. Broken user files are skipped with a warning."""
    return builtin_profiles() + user_profiles()


def shadowed(profiles: Sequence[Profile]) -> set[str]:
    """Names defined both by a built-in and by a user profile (the user's wins)."""
    builtin = {p.name for p in profiles if p.builtin}
    return {p.name for p in profiles if not p.builtin and p.name in builtin}


def load_profile(name_or_path: str) -> Profile:
    """A profile by file path (anything ending in .toml or holding a path separator) or by name:
    a user profile first, then a built-in.

    Raises:
        ProfileError: the file is missing or invalid, or no profile has that name (the message
            lists the known names).
    """
    looks_like_path = name_or_path.endswith(".toml") or any(
        sep and sep in name_or_path for sep in (os.sep, os.altsep)
    )
    if looks_like_path:
        return read_profile(name_or_path)
    scan = scan_user_profiles()
    asked_for = scan.error_for(name_or_path)
    if asked_for is not None:  # the profile asked for may be the broken file: say why it is not there
        raise asked_for
    scan.warn()
    profiles = builtin_profiles() + scan.profiles
    for profile in reversed(profiles):  # user profiles come last and win
        if profile.name == name_or_path:
            return profile
    known = ", ".join(sorted({p.name for p in profiles}))
    raise ProfileError(
        f"no profile named {name_or_path!r}; known: {known} (user profiles go in {user_profile_dir()})"
    )


# --- detection --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Detection:
    """The profile detect_profile chose, and why.

    Attributes:
        profile: a built-in profile's name.
        reasons: human sentences, in the order the decision was made.
        target_gpu_layers: for "partial", how many target layers fit on the GPU; None otherwise.
        fits: every profile considered → its unmet requirements (empty when it fits).
    """

    profile: str
    reasons: list[str]
    target_gpu_layers: int | None = None
    fits: dict[str, list[str]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def model_bytes(path: Path) -> int:
    """A model's size for placement: a GGUF file's size, or the files of an ONNX export folder."""
    if path.is_dir():
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return path.stat().st_size


def gguf_block_count(path: Path) -> int | None:
    """The block (layer) count in a GGUF's metadata; None when the file has none. A file that is
    not GGUF fails here with a one-line ModelLoadError."""
    from edgespec.formats.gguf import check_gguf

    meta = check_gguf(path).metadata  # the header is walked once per unchanged file (cached)
    count = meta.get(f"{meta.get('general.architecture')}.block_count")
    return int(count) if isinstance(count, int) else None


def no_gpu_reason(hw: Hardware) -> str:
    """Why no GPU llama.cpp can use, e.g. "llama.cpp was built with CPU only; nvidia-smi not found"."""
    if not hw.llama_backends:
        parts = ["llama.cpp has no backend registered"]
    elif not hw.gpu_offload:
        parts = [f"llama.cpp was built with {', '.join(hw.llama_backends)} only"]
    else:
        parts = ["llama.cpp supports GPU offload but found no GPU device"]
    smi = [g for g in hw.gpus if g.source == "nvidia-smi"]
    if hw.nvidia_smi == "not found":
        parts.append("nvidia-smi not found")
    elif hw.nvidia_smi == "failed":
        parts.append("nvidia-smi failed (see the notes)")
    elif smi:
        names = ", ".join(
            f"{g.name}" + (f" ({g.free_mib:,} MiB free)" if g.free_mib is not None else "") for g in smi
        )
        parts.append(
            f"nvidia-smi sees {names}, which this llama.cpp cannot use: reinstall llama-cpp-python "
            'built with CUDA (CMAKE_ARGS="-DGGML_CUDA=on")'
        )
    elif hw.nvidia_smi == "ran":
        parts.append("nvidia-smi lists no GPU")
    return "; ".join(parts)


def _mib(n_bytes: float) -> int:
    return math.ceil(n_bytes / _MIB)


def _by_memory(
    index: int, gpu: Any, target_bytes: int, draft_bytes: int, n_layers: int
) -> tuple[str, str, int | None]:
    """(profile, reason, target_gpu_layers) from the free memory of one GPU."""
    head = f"GPU {index} {gpu.name}"
    if gpu.free_mib is None:
        if draft_bytes > 0:
            return (
                "dovetail",
                f"{head} does not report its free memory: only the drafter goes on it (set the "
                "target's gpu_layers yourself if it has room): dovetail",
                None,
            )
        return (
            "cpu-only",
            f"{head} does not report its free memory and there is no draft model: cpu-only",
            None,
        )
    free = gpu.free_mib
    budget = free * _MIB / HEADROOM  # bytes the models may take, leaving 20% headroom
    both = target_bytes + draft_bytes
    per_layer = target_bytes / max(1, n_layers)
    room = budget - draft_bytes
    # Target layers that fit beside the drafter: all of them when both models fit (a partial profile
    # chosen because gpu-all does not fit this machine's [requires] then gets every layer).
    layers = min(n_layers, math.floor(room / per_layer)) if room > 0 and per_layer > 0 else 0
    if both <= budget:
        return (
            "gpu-all",
            f"{head} has {free:,} MiB free, enough for both models ({_mib(both * HEADROOM):,} MiB with 20% "
            "headroom): gpu-all",
            n_layers,
        )
    need_both = _mib(both * HEADROOM)
    short = f"{head} has {free:,} MiB free, not enough for both models ({need_both:,} MiB with 20% headroom)"
    if layers >= 1:
        drafter = "the drafter and " if draft_bytes else ""
        return (
            "partial",
            f"{short}, but enough for {drafter}{layers} of the target's {n_layers} layers "
            f"({_mib(per_layer):,} MiB each): partial",
            layers,
        )
    if draft_bytes > 0 and room >= 0:
        return (
            "dovetail",
            f"{short}, but enough for the drafter ({_mib(draft_bytes * HEADROOM):,} MiB with 20% headroom) "
            f"and not one target layer ({_mib(per_layer * HEADROOM):,} MiB): dovetail",
            None,
        )
    if draft_bytes > 0:
        return (
            "cpu-only",
            f"{head} has {free:,} MiB free, not enough for the drafter ({_mib(draft_bytes * HEADROOM):,} "
            "MiB with 20% headroom): cpu-only",
            None,
        )
    return (
        "cpu-only",
        f"{short} nor for one target layer, and there is no draft model to put on it: cpu-only",
        None,
    )


def detect_profile(
    hw: Hardware,
    target_bytes: int,
    draft_bytes: int,
    n_layers: int = DEFAULT_N_LAYERS,
    profiles: Sequence[Profile] | None = None,
) -> Detection:
    """Pick the built-in profile for this machine and model pair.

    No usable GPU → cpu-only. Otherwise, on the usable GPU with the most free memory: free ≥ 1.2 ×
    (target + draft) → gpu-all; free ≥ 1.2 × (draft + one target layer) → partial, with as many
    target layers as fit; free ≥ 1.2 × draft → dovetail; else cpu-only. A chosen profile whose
    [requires] the machine does not meet is passed over for the next one down, with the reason.

    Args:
        hw: the machine (detect_hardware(), or fabricated).
        target_bytes, draft_bytes: model file sizes; draft_bytes 0 when there is no draft model.
        n_layers: the target's layer count (blocks), to estimate one layer's size.
        profiles: the candidates (default: builtin_profiles()).
    """
    profiles = builtin_profiles() if profiles is None else list(profiles)
    by_name = {p.name: p for p in profiles}
    fits = {p.name: p.check_fits(hw) for p in profiles}
    reasons: list[str] = []
    layers: int | None = None
    best = hw.best_gpu()
    if best is None:
        choice = "cpu-only"
        reasons.append(f"no GPU device: {no_gpu_reason(hw)}")
    else:
        choice, reason, layers = _by_memory(best[0], best[1], target_bytes, draft_bytes, n_layers)
        reasons.append(reason)
    for name in DETECT_ORDER[DETECT_ORDER.index(choice) :]:
        if name not in by_name:
            reasons.append(f"no profile named {name}")
        elif fits[name]:
            reasons.append(f"{name} does not fit this machine: {'; '.join(fits[name])}")
        else:
            choice = name
            break
    else:
        choice = "cpu-only"
        reasons.append("no profile fits: falling back to cpu-only")
    return Detection(
        profile=choice,
        reasons=reasons,
        target_gpu_layers=layers if choice == "partial" else None,
        fits=fits,
    )


# --- running a profile where it does not fit -----------------------------------------------------


def uses_gpu(profile: Profile) -> bool:
    """Whether a profile puts layers on a GPU or requires one."""
    req = profile.requires
    return bool(
        req.gpu or req.min_gpu_free_mib > 0 or profile.target.gpu_layers != 0 or profile.draft.gpu_layers != 0
    )


def on_cpu(profile: Profile) -> Profile:
    """The profile with both models on the CPU (gpu_layers 0), no GPU requirement, and no measured
    costs (they were measured with the GPU placement)."""
    return dataclasses.replace(
        profile,
        requires=dataclasses.replace(profile.requires, gpu=False, min_gpu_free_mib=0),
        target=dataclasses.replace(profile.target, gpu_layers=0),
        draft=dataclasses.replace(profile.draft, gpu_layers=0),
        costs=None,
    )


def cpu_fallback(profile: Profile, hw: Hardware) -> tuple[Profile, str] | None:
    """What to run instead of a profile that needs a GPU on a machine with none llama.cpp can use.

    A built-in GPU profile (gpu-all, partial, dovetail) becomes the cpu-only profile: the same
    drafters on the CPU, without overlap (on the CPU the drafter and the target would compete for
    the same cores). A user profile keeps its settings with both models moved to the CPU.

    Returns:
        None when the profile can run as it is; else (the profile to run, a one-line warning
        that names the profile and why there is no GPU).
    """
    if hw.best_gpu() is not None or not uses_gpu(profile):
        return None
    if profile.builtin:
        fallback = load_profile("cpu-only")  # a user's cpu-only profile shadows the built-in
        fallback = on_cpu(fallback) if uses_gpu(fallback) else fallback
        instead = f"the {fallback.name} profile instead"
    else:
        fallback = on_cpu(profile)
        instead = "both models moved to the CPU (gpu_layers = 0)"
    return fallback, (
        f"profile {profile.name} needs a GPU, but there is none llama.cpp can use ({no_gpu_reason(hw)}): "
        f"running on the CPU with {instead}"
    )
