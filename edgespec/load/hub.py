"""Downloads from the Hugging Face Hub (`edgespec pull hf:REPO[:QUANT|/FILE.gguf]`) and removals
(`edgespec models rm`).

A pull goes through `huggingface_hub` into the standard Hub cache (`registry.hf_cache_dir`), with
its progress bar, so other tools find the files and `registry` lists them. An interrupted transfer
leaves `blobs/<sha256>.incomplete`, and the next pull resumes it with a range request
(huggingface_hub does that by itself). huggingface_hub checks only the size of what arrives; each
file is then hashed here and compared with the sha256 the Hub records for it (its LFS pointer),
and a file that does not match is deleted.

`HF_ENDPOINT` (a mirror, or the tests' local Hub) and `HF_HUB_OFFLINE` are read when a pull
starts. Offline, or with the Hub out of reach, a pull says so in one line and names the models
already here.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from edgespec.errors import EdgespecError, ModelCacheError, SettingsError
from edgespec.load import models, registry

__all__ = ["OfflineError", "PullPlan", "choose_files", "parse_hf", "pull", "remove"]

DEFAULT_QUANT = "Q4_K_M"


class OfflineError(EdgespecError):
    """The Hub cannot be reached (offline mode, or no network)."""


def parse_hf(name: str) -> tuple[str, str | None, str | None]:
    """`hf:REPO[/FILE.gguf|:QUANT]` → (repo, file or None, quant or None); a SettingsError when it
    is not that form."""
    if not name.startswith("hf:"):
        raise SettingsError(f"{name!r}: edgespec pull takes hf:REPO, hf:REPO:QUANT or hf:REPO/FILE.gguf")
    text = name[3:].strip().strip("/")
    quant = None
    if ":" in text:
        text, quant = text.rsplit(":", 1)
    parts = text.split("/")
    if len(parts) < 2 or not all(parts) or (quant is not None and not quant):
        raise SettingsError(f"{name!r} does not name a Hub repo (hf:OWNER/REPO…)")
    repo, file = "/".join(parts[:2]), "/".join(parts[2:]) or None
    if file is not None and not file.endswith(".gguf"):
        raise SettingsError(f"{name!r}: the file to pull must be a .gguf file")
    if file is not None and quant is not None:
        raise SettingsError(f"{name!r}: give a file or a quantization, not both")
    return repo, file, quant


@dataclass(frozen=True)
class PullPlan:
    """What a pull fetches: the files of one model (every shard), and why that model.

    Attributes:
        repo: the repo.
        model_id: the model's path in the repo (shards: their common name, as `registry` lists it).
        files: its files.
        reason: which file, and why.
    """

    repo: str
    model_id: str
    files: tuple[str, ...]
    reason: str


def choose_files(repo: str, available: Sequence[str], file: str | None, quant: str | None) -> PullPlan:
    """The model to fetch among a repo's GGUF files: the one named, the one with the quantization
    asked for, the repo's only model, or else its Q4_K_M one. Shards count as one model;
    multimodal projectors (`mmproj`) are never chosen. A SettingsError lists the choices when
    none or several fit."""
    groups: dict[str, list[str]] = {}
    for name in sorted(available):
        if not name.endswith(".gguf") or "mmproj" in name.lower():
            continue
        match = registry.SHARD.match(name.rsplit("/", 1)[-1])
        key = name if match is None else name[: -len(name.rsplit("/", 1)[-1])] + match["stem"] + ".gguf"
        groups.setdefault(key, []).append(name)
    choices = ", ".join(groups) or "none"
    if file is not None:
        picked = [key for key, names in groups.items() if file in (key, *names)]
        why = f"{file}, as asked"
    elif quant is not None:
        picked = [key for key in groups if registry.has_quant(key, quant)]
        why = f"the {quant} file, as asked"
    elif len(groups) == 1:
        picked, why = list(groups), "the repo's only GGUF model"
    else:
        picked = [key for key in groups if registry.has_quant(key, DEFAULT_QUANT)]
        why = f"{DEFAULT_QUANT}, the default quantization (name another with hf:{repo}:QUANT)"
    if len(picked) != 1:
        what = "nothing" if not picked else f"{len(picked)} models"
        raise SettingsError(f"hf:{repo}: that picks {what}; its GGUF models are: {choices}")
    return PullPlan(repo, picked[0], tuple(groups[picked[0]]), f"{picked[0]}: {why}")


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _offline_error(why: str) -> OfflineError:
    local = [m.name for m in registry.find_models() if m.error is None]
    listed = "; models here: " + ", ".join(local) if local else "; no models are here yet"
    return OfflineError(why + listed)


def pull(name: str, on_note: Callable[[str], None] = lambda line: None) -> registry.LocalModel:
    """Download a model from the Hub into its cache (resuming a broken transfer), check each
    file's sha256 against the Hub's record, and return it as a listed model.

    Raises:
        SettingsError: the name is malformed, or picks no single model.
        OfflineError: offline mode is on, or the Hub cannot be reached.
        ModelCacheError: a file's sha256 is not the Hub's (the file is deleted).
    """
    repo, file, quant = parse_hf(name)
    if offline():
        raise _offline_error(f"offline (HF_HUB_OFFLINE is set): not downloading {name}")
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError

    endpoint = os.environ.get("HF_ENDPOINT") or None
    try:
        info = HfApi(endpoint=endpoint).model_info(repo, files_metadata=True)
    except RepositoryNotFoundError:
        raise SettingsError(f"hf:{repo}: no such model repo on the Hub (or it is private)") from None
    except HfHubHTTPError as exc:
        raise EdgespecError(f"hf:{repo}: the Hub answered {_one_line(exc)}") from None
    except OSError as exc:  # requests' connection errors are OSErrors
        raise _offline_error(
            f"cannot reach the Hub ({endpoint or 'huggingface.co'}): {_one_line(exc)}"
        ) from None
    siblings = {s.rfilename: s for s in info.siblings or ()}
    plan = choose_files(repo, list(siblings), file, quant)
    on_note(f"hf:{repo}: {plan.reason}")
    paths = []
    for filename in plan.files:
        try:
            path = Path(
                hf_hub_download(
                    repo, filename, revision=info.sha, cache_dir=registry.hf_cache_dir(), endpoint=endpoint
                )
            )
        except OSError as exc:
            raise EdgespecError(
                f"downloading {filename} from hf:{repo} broke off ({_one_line(exc)}); pull again to resume"
            ) from None
        lfs = siblings[filename].lfs
        if lfs is None:
            raise ModelCacheError(f"hf:{repo}/{filename}: the Hub records no sha256 for it")
        on_note(f"checking {filename} against the Hub's sha256")
        if models.sha256_of(path) != lfs.sha256:
            _unlink_cached(path)
            raise ModelCacheError(
                f"hf:{repo}/{filename} does not match the sha256 the Hub records ({lfs.sha256[:12]}…); "
                "it was deleted, pull again"
            )
        paths.append(path)
    return registry.resolve(f"hf:{repo}/{plan.model_id}")


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:300] or type(exc).__name__


def _unlink_cached(link: Path) -> None:
    """Delete a file of the Hub cache: its snapshot link, and its blob unless another links it."""
    blob = link.resolve()
    link.unlink(missing_ok=True)
    snapshots = blob.parent.parent / "snapshots"
    still_used = snapshots.is_dir() and any(
        p.is_symlink() and p.resolve() == blob for p in snapshots.rglob("*")
    )
    if not still_used:
        blob.unlink(missing_ok=True)


def remove(model: registry.LocalModel) -> list[Path]:
    """Delete a model edgespec's cache or the Hub cache holds; returns what was deleted.

    Raises:
        SettingsError: the model belongs to another program (Ollama, LM Studio) or to a folder of
            the user's, which edgespec does not delete from.
    """
    owners = {"ollama": "Ollama (`ollama rm`)", "lmstudio": "LM Studio", "folder": "a folder of yours"}
    if model.source in owners:
        raise SettingsError(f"{model.name} belongs to {owners[model.source]}; edgespec leaves it alone")
    removed = []
    for path in model.files:
        if model.source == "hf":
            _unlink_cached(path)
        else:
            path.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                Path(str(path) + ".verified.json").unlink(missing_ok=True)  # a default model's stamp
        removed.append(path)
    return removed
