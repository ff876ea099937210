"""`edgespec profile …`: list, show and detect placement profiles (see profiles/README.md)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Any

import click

from edgespec.defaults import N_CTX
from edgespec.errors import ModelLoadError

# Sizes assumed in the reasons when a default model's size is unknown (the pinned sizes make it rare).
ASSUMED_BYTES = {"target": 1_200_000_000, "draft": 500_000_000}
NO_MODEL = ("ngram", "none")


@dataclass(frozen=True)
class ModelSize:
    """How big a model is, for `profile detect`, and how that was found out."""

    role: str
    spec: str
    path: str | None
    bytes: int
    how: str  # "file", "pinned", "assumed", "folder", "no model"
    n_layers: int | None = None

    def describe(self) -> str:
        if self.how == "no model":
            return f"{self.role}: none ({self.spec})"
        size = f"{self.bytes / 1e9:.2f} GB"
        detail = {
            "file": f"{size}, {self.path}",
            "folder": f"{size} in {self.path}",
            "pinned": f"{size}, the default model's pinned size (not joined yet: {self.path})",
            "assumed": f"size unknown, assuming {size}",
        }[self.how]
        layers = f", {self.n_layers} layers" if self.n_layers else ""
        return f"{self.role}: {detail}{layers}"


def model_size(spec: str, role: str) -> ModelSize:
    """The size of the model a user names, without joining a default model on first use."""
    from edgespec.load import models
    from edgespec.placement.profiles import gguf_block_count, model_bytes

    if role == "draft" and spec in NO_MODEL:
        return ModelSize(role, spec, None, 0, "no model")
    if spec == "default":
        model = models.DEFAULT_MODELS[role]
        path = models.cached_path(model)
        if path.is_file():
            return ModelSize(role, spec, str(path), path.stat().st_size, "file", gguf_block_count(path))
        if getattr(model, "size", None):
            return ModelSize(role, spec, str(path), model.size, "pinned")
        return ModelSize(role, spec, None, ASSUMED_BYTES[role], "assumed")
    from edgespec.load.builder import resolve_model_path

    path = resolve_model_path(spec, role)
    if path.is_dir():  # an ONNX export folder
        return ModelSize(role, spec, str(path), model_bytes(path), "folder")
    if not path.is_file():
        raise ModelLoadError(f"no {role} model file {path}")
    return ModelSize(role, spec, str(path), model_bytes(path), "file", gguf_block_count(path))


@click.group()
def profile() -> None:
    """Hardware profiles: where the drafter and the target run, and how much to draft.

    Profiles are TOML files (see profiles/README.md): built-in ones, and your own in the folder
    `edgespec profile list` names ($EDGESPEC_CONFIG_DIR/profiles when that is set). Settings merge
    in one order: built-in defaults < profile < command-line flags.

    \b
    Examples:
      edgespec profile detect
      edgespec profile list
      edgespec profile show dovetail > ~/.config/edgespec/profiles/mine.toml
    """


@profile.command("list")
def list_cmd() -> None:
    """List the profiles: where each comes from and whether it fits this machine."""
    from edgespec.placement.hardware import detect_hardware
    from edgespec.placement.profiles import list_profiles, shadowed, user_profile_dir

    profiles = list_profiles()
    hw = detect_hardware()
    hidden = shadowed(profiles)
    rows = []
    unfit = []
    for p in profiles:
        if p.builtin:
            origin = "built-in (shadowed by a user file)" if p.name in hidden else "built-in"
        else:
            origin = f"user file {p.source}" + (" (shadows the built-in)" if p.name in hidden else "")
        problems = p.check_fits(hw)
        if problems:
            unfit.append(f"  {p.name}: {'; '.join(problems)}")
        rows.append((p.name, origin, "no" if problems else "yes", p.description))
    header = ("NAME", "FROM", "FITS", "DESCRIPTION")
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(3)]
    for row in [header, *rows]:
        cells = [cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)]
        click.echo("  ".join([*cells, row[3]]))
    if unfit:
        click.echo("\ndoes not fit this machine:")
        for line in unfit:
            click.echo(line)
    click.echo(f"\nuser profiles: {user_profile_dir()}  (set EDGESPEC_CONFIG_DIR to move it)")


@profile.command()
@click.argument("name_or_path")
def show(name_or_path: str) -> None:
    """Print a profile (by name, or a .toml path) as TOML, every key with its effective value."""
    from edgespec.placement.profiles import load_profile

    p = load_profile(name_or_path)
    origin = "built-in" if p.builtin else "file"
    click.echo(f"# source: {origin} {p.source}" if p.source else "# source: (none)")
    click.echo(f"# guarantee: {p.guarantee_text}")
    if p.costs is not None and p.costs.choice:
        click.echo(f"# drafting: {p.costs.choice}")
    click.echo(p.to_toml(), nl=False)


def _hardware_lines(hw: Any) -> list[str]:
    gpus = [
        f"GPU {i}: {g.name} ({g.backend}, "
        + (f"{g.free_mib:,} of {g.total_mib:,} MiB free" if g.free_mib is not None else "memory unknown")
        + (", integrated" if g.integrated else "")
        + f", seen by {g.source})"
        for i, g in enumerate(hw.gpus)
    ]
    battery = {None: "no battery", True: "on battery", False: "on mains power"}[hw.on_battery]
    lines = [
        f"machine: {hw.fingerprint()}",
        f"  CPU: {hw.cpu_model}, {hw.physical_cores} physical / {hw.logical_cores} logical cores",
        f"  RAM: {hw.total_ram_mib:,} MiB, {hw.available_ram_mib:,} MiB available",
        f"  llama.cpp backends: {', '.join(hw.llama_backends) or 'none'}; "
        f"GPU offload: {'yes' if hw.gpu_offload else 'no'}",
        *(f"  {line}" for line in gpus or ["GPUs: none"]),
        f"  ONNX Runtime providers: {', '.join(hw.onnx_providers) or 'none (onnxruntime not installed)'}",
        f"  power: {battery}",
    ]
    lines += [f"  note: {note}" for note in hw.notes]
    return lines


@profile.command()
@click.option(
    "--target",
    envvar="EDGESPEC_TARGET",
    default="default",
    show_default=True,
    help="Target GGUF path, or 'default'; only its size is read.",
)
@click.option(
    "--draft",
    envvar="EDGESPEC_DRAFT",
    default="default",
    show_default=True,
    help="Draft GGUF path, 'default', 'ngram' or 'none'; only its size is read.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (hardware, models, profile).")
def detect(target: str, draft: str, as_json: bool) -> None:
    """Detect this machine's hardware and choose the built-in profile that suits it, with the reasons.

    Nothing is loaded: the choice comes from the model files' sizes and the GPU's free memory
    (both models must fit with 20% headroom for gpu-all; the drafter alone for dovetail).

    \b
    Examples:
      edgespec profile detect
      edgespec profile detect --target big.gguf --draft small.gguf --json
    """
    from edgespec.placement.hardware import detect_hardware
    from edgespec.placement.profiles import DEFAULT_N_LAYERS, detect_profile

    sizes = {"target": model_size(target, "target"), "draft": model_size(draft, "draft")}
    hw = detect_hardware()
    n_layers = sizes["target"].n_layers or DEFAULT_N_LAYERS
    found = detect_profile(hw, sizes["target"].bytes, sizes["draft"].bytes, n_layers=n_layers)
    reasons = list(found.reasons)
    for size in sizes.values():
        if size.how == "assumed":
            reasons.append(f"the {size.role} model's size is unknown: assumed {size.bytes / 1e9:.1f} GB")
    if found.profile == "partial" and not sizes["target"].n_layers:
        reasons.append(f"the target's layer count is unknown: assumed {DEFAULT_N_LAYERS}")
    if as_json:
        record = {
            "hardware": hw.to_dict(),
            "models": {role: asdict(size) for role, size in sizes.items()},
            "profile": found.profile,
            "reasons": reasons,
            "target_gpu_layers": found.target_gpu_layers,
            "fits": found.fits,
        }
        click.echo(json.dumps(record, indent=2, ensure_ascii=False))
        return
    for line in _hardware_lines(hw):
        click.echo(line)
    click.echo("models:")
    for size in sizes.values():
        click.echo(f"  {size.describe()}")
    click.echo(f"profile: {found.profile}")
    for reason in reasons:
        click.echo(f"  - {reason}")
    if found.target_gpu_layers is not None:
        click.echo(
            f"  target layers that fit on the GPU: {found.target_gpu_layers} "
            f"(use --gpu-layers {found.target_gpu_layers}, or set target.gpu_layers in a copy of the profile)"
        )
    others = {name: unmet for name, unmet in found.fits.items() if unmet and name != found.profile}
    if others:
        click.echo("profiles that do not fit this machine:")
        for name, unmet in others.items():
            click.echo(f"  {name}: {'; '.join(unmet)}")


@profile.command()
@click.option(
    "--profile",
    "base",
    default="auto",
    show_default=True,
    help="The placement to tune: a profile name or .toml, or 'auto' for the one `profile detect` picks.",
)
@click.option("--target", envvar="EDGESPEC_TARGET", default="default", show_default=True, help="Target GGUF.")
@click.option("--draft", envvar="EDGESPEC_DRAFT", default="default", show_default=True, help="Draft GGUF.")
@click.option("--ctx", type=click.IntRange(min=64), default=N_CTX, show_default=True, help="Context size.")
@click.option(
    "--threads", type=click.IntRange(min=1), default=None, help="Target threads (default: the profile's)."
)
@click.option("--verbose", "-v", is_flag=True, help="Let llama.cpp's own log lines through.")
def tune(base: str, target: str, draft: str, ctx: int, threads: int | None, verbose: bool) -> None:
    """Measure speculation on this machine and save a tuned profile (what `--profile auto` uses).

    Measures the target's cost for one pass over n = 1 … k_max + 1 tokens, the cost of a draft
    token, and the model drafter's acceptance on a few short prompts (skipped when the costs show
    it cannot pay even with every draft accepted), then writes the placement profile plus a
    [costs] table into the user profile folder. `edgespec run --profile auto` tunes on first use
    by itself; run this again after changing hardware, drivers or thread settings.

    \b
    Examples:
      edgespec profile tune
      edgespec profile tune --profile dovetail --draft small.gguf
    """
    from edgespec.cli.common import progress, tune_progress
    from edgespec.load.builder import EngineSpec, build

    spec = EngineSpec(target, draft, base, n_ctx=ctx, threads=threads, verbose=verbose, retune=True)
    built = build(
        spec, progress=progress, tune_progress=tune_progress, on_note=lambda line: click.echo(line, err=True)
    )
    built.pair.close()
    tuned = built.profile
    assert tuned is not None and tuned.costs is not None  # a profile, retuned: always measured
    costs = tuned.costs
    t1 = costs.t_verify_ms[0]
    click.echo(f"profile: {tuned.name} (saved as {tuned.source})")
    ratio = costs.t_draft_ms / t1
    click.echo(f"target step T(1): {t1:.1f} ms; draft token: {costs.t_draft_ms:.1f} ms ({ratio:.2f} of T(1))")
    curve = ", ".join(f"{n}: {t / t1:.2f}" for n, t in enumerate(costs.t_verify_ms, start=1))
    click.echo(f"T(n)/T(1): {curve}")
    if costs.acceptance_model:
        click.echo(
            "model acceptance per position: " + ", ".join(f"{a:.2f}" for a in costs.acceptance_model[:8])
        )
    drafters = ", ".join(tuned.speculation.drafters) or "none (target only)"
    click.echo(f"drafters the controller may use: {drafters}")
