"""The models on this machine: every GGUF model edgespec can find, and the names people give them.

Sources, each read as the program that owns it writes it:

- `default`: the default pair, once joined into edgespec's cache (`models`);
- `edgespec`: other GGUF files in edgespec's cache folder;
- `hf`: the Hugging Face Hub cache, read through `huggingface_hub.scan_cache_dir` (`HF_HUB_CACHE`,
  `HF_HOME` and `XDG_CACHE_HOME` respected, read when asked, not when imported);
- `lmstudio`: LM Studio's models folders, `<publisher>/<repo>/<file>.gguf` under `~/.lmstudio/models`,
  the older `~/.cache/lm-studio/models`, the home a `~/.lmstudio-home-pointer` names, and the
  `downloadsFolder` of its `settings.json`;
- `ollama`: Ollama's store (`$OLLAMA_MODELS`, else `~/.ollama/models` and the Linux service's
  `/usr/share/ollama/.ollama/models`): each manifest `manifests/<host>/<namespace>/<model>/<tag>`
  names its weights layer (media type `application/vnd.ollama.image.model`), a blob
  `blobs/sha256-<hex>`;
- `folder`: folders the user adds, in `$EDGESPEC_MODEL_DIRS` (separated like PATH) or as
  `folders = [...]` in `models.toml` in edgespec's config folder; searched three levels deep.

A model split into shards (`<name>-00001-of-00003.gguf`) counts once. Multimodal projectors
(architecture `clip`) are not language models and are left out. Each model's facts come from its
GGUF header through the one checked parser (`formats.gguf.check_gguf`): no weights are read. The
facts are kept in `.headers.json` in edgespec's cache, keyed by file and its size, modification
time and inode, so a second listing reads no header that has not changed. A file whose header is
bad is listed with the reason, and refused by name.

Names (`resolve`): a listed name (`hf:bartowski/Qwen2.5-Coder-7B-Instruct-GGUF/…Q4_K_M.gguf`,
`ollama:qwen2.5-coder:7b`), its part after the source, or a unique prefix of either (case
ignored); `ollama:NAME[:TAG]` as Ollama spells it; `hf:REPO`, `hf:REPO/FILE.gguf` or
`hf:REPO:QUANT`. A name that fits several models is an error listing them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgespec.errors import ModelLoadError, SettingsError
from edgespec.fileio import user_config_dir, write_text_atomic
from edgespec.formats.vocabmap import KEY_SOURCE_SHA256
from edgespec.load import models
from edgespec.placement import tomldata

__all__ = [
    "MODEL_DIRS_ENV",
    "SOURCES",
    "LocalModel",
    "ModelInfo",
    "AmbiguousModelName",
    "ModelNotFound",
    "find_models",
    "resolve",
]

SOURCES = ("default", "edgespec", "hf", "lmstudio", "ollama", "folder")
MODEL_DIRS_ENV = "EDGESPEC_MODEL_DIRS"
FOLDER_DEPTH = 3  # levels searched below a user's folder
OLLAMA_MODEL_LAYER = "application/vnd.ollama.image.model"
SHARD = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$")
_CACHE_VERSION = 3

# llama.cpp's `enum llama_ftype` (llama.h, llama-cpp-python 0.3.36), as `general.file_type` holds it.
FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 19: "IQ2_XXS", 20: "IQ2_XS", 21: "Q2_K_S", 22: "IQ3_XS",
    23: "IQ3_XXS", 24: "IQ1_S", 25: "IQ4_NL", 26: "IQ3_S", 27: "IQ3_M", 28: "IQ2_S", 29: "IQ2_M",
    30: "IQ4_XS", 31: "IQ1_M", 32: "BF16", 36: "TQ1_0", 37: "TQ2_0", 38: "MXFP4_MOE",
}  # fmt: skip


class ModelNotFound(ModelLoadError):
    """No usable model answers to a name."""


class AmbiguousModelName(ModelNotFound):
    """More than one model answers to a name."""


@dataclass(frozen=True)
class ModelInfo:
    """What a model's GGUF header says about it.

    Attributes:
        architecture: `general.architecture` ("qwen2", "llama", …).
        title: `general.name`, when set.
        n_params: parameters, counted over its tensors (every shard's).
        quantization: the file type's name ("Q4_K_M"), or "type N" for one this table lacks.
        context_length: the context it was trained for, when the header says.
        chat_template: whether it carries a chat template.
        size_label: `general.size_label`, the size its makers give ("1.5B"), when set; it may
            leave out a separate output matrix that n_params counts.
        n_vocab: tokens in its vocabulary.
        vocab_id: a fingerprint of its tokenizer: the tokenizer type, BOS insertion, the BOS, EOS
            and EOT ids and every token's text. Equal fingerprints, interchangeable token ids.
        trimmed_from: for a VocabTrim drafter, the sha256 of the model it was trimmed from.
    """

    architecture: str
    title: str | None
    n_params: int
    quantization: str | None
    context_length: int | None
    chat_template: bool
    size_label: str | None = None
    n_vocab: int = 0
    vocab_id: str = ""
    trimmed_from: str | None = None

    @property
    def params_text(self) -> str:
        """The size as people write it: the size label, else the count (494M, 1.78B)."""
        if self.size_label:
            return self.size_label
        n = self.n_params
        return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M" if n >= 1e6 else f"{n / 1e3:.3g}K"


@dataclass(frozen=True)
class LocalModel:
    """A model found on this machine.

    Attributes:
        source: where it was found (one of `SOURCES`).
        id: its name within the source (a repo and file, an Ollama name, a path in a folder).
        files: its GGUF file, or every shard in order.
        info: what its header says; None when it could not be read (`error` says why).
        error: why it cannot be used, or None.
        sha256: the file's sha256 where its store names files by it (the Hugging Face cache's
            blobs, Ollama's) or pins it (the default pair); else None.
    """

    source: str
    id: str
    files: tuple[Path, ...]
    info: ModelInfo | None = None
    error: str | None = None
    sha256: str | None = None

    @property
    def name(self) -> str:
        """The name that always picks this model: `source:id`."""
        return f"{self.source}:{self.id}"

    @property
    def path(self) -> Path:
        """The file llama.cpp opens (the first shard finds the others)."""
        return self.files[0]

    @property
    def size(self) -> int:
        total = 0
        for path in self.files:
            with contextlib.suppress(OSError):
                total += path.stat().st_size
        return total

    def to_dict(self) -> dict[str, Any]:
        info = self.info
        return {
            "name": self.name,
            "source": self.source,
            "id": self.id,
            "path": str(self.path),
            "files": [str(p) for p in self.files],
            "size": self.size,
            "architecture": info.architecture if info else None,
            "title": info.title if info else None,
            "parameters": info.n_params if info else None,
            "size_label": info.size_label if info else None,
            "quantization": info.quantization if info else None,
            "context_length": info.context_length if info else None,
            "chat_template": info.chat_template if info else None,
            "error": self.error,
        }


@dataclass(frozen=True)
class _Found:
    """A model's files as a source lists them, before its header is read."""

    source: str
    id: str
    files: tuple[Path, ...]
    error: str | None = None
    sha256: str | None = None


# -- where each source keeps its models --------------------------------------------------------


def hf_cache_dir() -> Path:
    """The Hugging Face Hub cache, by huggingface_hub's rules, read from the environment now."""
    for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(key):
            return Path(os.environ[key]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "huggingface" / "hub"


def lmstudio_dirs() -> list[Path]:
    """LM Studio's models folders that exist: each home's `models`, and a configured one."""
    home = Path.home()
    homes = [home / ".cache" / "lm-studio", home / ".lmstudio"]
    with contextlib.suppress(OSError, UnicodeDecodeError):
        homes.insert(0, Path((home / ".lmstudio-home-pointer").read_text().strip()).expanduser())
    folders = []
    for lms_home in homes:
        folders.append(lms_home / "models")
        with contextlib.suppress(OSError, ValueError, AttributeError, TypeError):
            configured = json.loads((lms_home / "settings.json").read_text()).get("downloadsFolder")
            if isinstance(configured, str) and configured:
                folders.append(Path(os.path.expandvars(configured)).expanduser())
    return _existing(folders)


def ollama_dirs() -> list[Path]:
    """Ollama's stores that exist: `$OLLAMA_MODELS` when set, else the user's and the service's."""
    if os.environ.get("OLLAMA_MODELS"):
        return _existing([Path(os.environ["OLLAMA_MODELS"]).expanduser()])
    return _existing([Path.home() / ".ollama" / "models", Path("/usr/share/ollama/.ollama/models")])


def user_dirs() -> list[Path]:
    """The folders the user added: `$EDGESPEC_MODEL_DIRS`, then `folders` in models.toml."""
    folders = [Path(p).expanduser() for p in os.environ.get(MODEL_DIRS_ENV, "").split(os.pathsep) if p]
    config = user_config_dir() / "models.toml"
    if config.is_file():
        try:
            listed = tomldata.loads(config.read_text(encoding="utf-8"), str(config)).get("folders", [])
        except (OSError, UnicodeDecodeError) as exc:
            raise SettingsError(f"could not read {config}: {exc}") from None
        if not (isinstance(listed, list) and all(isinstance(p, str) for p in listed)):
            raise SettingsError(f"{config}: folders must be a list of paths")
        folders += [Path(p).expanduser() for p in listed]
    return _existing(folders)


def _existing(folders: Iterable[Path]) -> list[Path]:
    seen: dict[Path, None] = {}
    for folder in folders:
        with contextlib.suppress(OSError):
            if folder.is_dir():
                seen.setdefault(folder.resolve(), None)
    return list(seen)


# -- listing each source -----------------------------------------------------------------------


def _default_models() -> Iterator[_Found]:
    for model in models.DEFAULT_MODELS.values():
        path = models.cached_path(model)
        if path.is_file():
            yield _Found("default", model.name, (path,), sha256=model.sha256)


def _edgespec_models() -> Iterator[_Found]:
    folder = models.cache_dir()
    defaults = {m.filename for m in models.DEFAULT_MODELS.values()}
    if folder.is_dir():
        files = sorted(p for p in folder.glob("*.gguf") if p.name not in defaults)
        yield from _grouped("edgespec", folder, files)


def _hf_models() -> Iterator[_Found]:
    cache = hf_cache_dir()
    if not cache.is_dir():
        return
    from huggingface_hub import scan_cache_dir

    for repo in sorted(scan_cache_dir(cache).repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        # the revision "main" points at, else the newest one
        revisions = sorted(repo.revisions, key=lambda r: ("main" in r.refs, r.last_modified))
        if not revisions:
            continue
        snapshot = revisions[-1]
        files = sorted(f.file_path for f in snapshot.files if f.file_name.endswith(".gguf"))
        blobs = {f.file_path: f.blob_path.name for f in snapshot.files}
        for found in _grouped("hf", snapshot.snapshot_path, files):
            blob = blobs.get(found.files[0], "") if len(found.files) == 1 else ""
            sha256 = blob if re.fullmatch(r"[0-9a-f]{64}", blob) else None  # an LFS file's etag
            yield _Found("hf", f"{repo.repo_id}/{found.id}", found.files, found.error, sha256)


def _lmstudio_models() -> Iterator[_Found]:
    for folder in lmstudio_dirs():
        # LM Studio reads <publisher>/<repo>/<file>.gguf, exactly two folders down
        yield from _grouped("lmstudio", folder, sorted(folder.glob("*/*/*.gguf")))


def _folder_models() -> Iterator[_Found]:
    for folder in user_dirs():
        files = []
        for root, dirs, names in os.walk(folder):
            depth = len(Path(root).relative_to(folder).parts)
            dirs[:] = sorted(d for d in dirs if not d.startswith(".")) if depth < FOLDER_DEPTH else []
            files += [Path(root) / n for n in sorted(names) if n.endswith(".gguf")]
        yield from _grouped("folder", folder, files)


def _ollama_models() -> Iterator[_Found]:
    for store in ollama_dirs():
        for manifest in sorted(store.glob("manifests/*/*/*/*")):
            if not manifest.is_file():
                continue
            host, namespace, model, tag = manifest.relative_to(store / "manifests").parts
            yield _ollama_found(store, _ollama_name(host, namespace, model, tag), manifest)


def _ollama_name(host: str, namespace: str, model: str, tag: str) -> str:
    if host == "registry.ollama.ai":
        return f"{model}:{tag}" if namespace == "library" else f"{namespace}/{model}:{tag}"
    return f"{host}/{namespace}/{model}:{tag}"


def _ollama_found(store: Path, name: str, manifest: Path) -> _Found:
    """One Ollama model: its manifest's weights layer, as a blob path."""
    try:
        layers = json.loads(manifest.read_text(encoding="utf-8"))["layers"]
        digest = next(layer["digest"] for layer in layers if layer.get("mediaType") == OLLAMA_MODEL_LAYER)
    except StopIteration:
        return _Found("ollama", name, (manifest,), "its manifest has no GGUF weights layer")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        return _Found("ollama", name, (manifest,), f"its manifest {manifest} is unreadable ({exc})")
    if not (isinstance(digest, str) and re.fullmatch(r"sha256[:-][0-9a-fA-F]{64}", digest)):
        return _Found("ollama", name, (manifest,), f"its manifest names a bad blob digest {digest!r}")
    blob = store / "blobs" / digest.replace(":", "-")
    if not blob.is_file() and (store / "blobs" / digest).is_file():
        blob = store / "blobs" / digest  # named before Ollama switched ":" to "-"
    if not blob.is_file():
        return _Found("ollama", name, (blob,), f"its weights blob {blob.name} is missing")
    return _Found("ollama", name, (blob,), sha256=digest[7:].lower())


def _grouped(source: str, folder: Path, files: Sequence[Path]) -> Iterator[_Found]:
    """Files under `folder` as models, shards of one model joined; ids are paths below `folder`."""
    shards: dict[tuple[Path, str, int], dict[int, Path]] = {}
    for path in files:
        match = SHARD.match(path.name)
        if match is None:
            yield _Found(source, path.relative_to(folder).as_posix(), (path,))
            continue
        key = (path.parent, match["stem"], int(match["count"]))
        shards.setdefault(key, {})[int(match["index"])] = path
    for (parent, stem, count), parts in shards.items():
        model_id = (parent / f"{stem}.gguf").relative_to(folder).as_posix()
        missing = [i for i in range(1, count + 1) if i not in parts]
        ordered = tuple(parts[i] for i in sorted(parts))
        if missing:
            shown = ", ".join(map(str, missing[:5])) + (", …" if len(missing) > 5 else "")
            yield _Found(source, model_id, ordered, f"shard {shown} of {count} is missing")
        else:
            yield _Found(source, model_id, ordered)


_LISTERS = {
    "default": _default_models,
    "edgespec": _edgespec_models,
    "hf": _hf_models,
    "lmstudio": _lmstudio_models,
    "ollama": _ollama_models,
    "folder": _folder_models,
}


# -- headers, read once per file version -------------------------------------------------------


@dataclass
class _HeaderCache:
    """Facts read from headers, by file, with the file's identity when read (see the module)."""

    path: Path
    entries: dict[str, Any] = field(default_factory=dict)
    used: set[str] = field(default_factory=set)
    changed: bool = False

    @classmethod
    def load(cls) -> _HeaderCache:
        path = models.cache_dir() / ".headers.json"
        with contextlib.suppress(OSError, ValueError):
            data = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and data.get("version") == _CACHE_VERSION:
                return cls(path, dict(data.get("files", {})))
        return cls(path)

    def info(self, files: tuple[Path, ...]) -> ModelInfo:
        """The model's facts, from the cache or its headers (ModelLoadError when one is bad)."""
        keys, stamps = [], []
        for path in files:
            stat = path.stat()
            keys.append(str(path.resolve()))
            stamps.append([stat.st_size, stat.st_mtime_ns, stat.st_ino])
        key = "\n".join(keys)
        self.used.add(key)
        entry = self.entries.get(key)
        if isinstance(entry, dict) and entry.get("stamps") == stamps:
            with contextlib.suppress(TypeError):
                return ModelInfo(**entry["info"])
        info = _read_info(files)
        self.entries[key] = {"stamps": stamps, "info": asdict(info)}
        self.changed = True
        return info

    def save(self) -> None:
        if not self.changed and self.used == set(self.entries):
            return
        kept = {key: value for key, value in self.entries.items() if key in self.used}
        with contextlib.suppress(OSError):  # a read-only cache only costs the next listing time
            self.path.parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(self.path, json.dumps({"version": _CACHE_VERSION, "files": kept}))


def _read_info(files: tuple[Path, ...]) -> ModelInfo:
    from edgespec.formats.gguf import check_gguf

    headers = [check_gguf(path) for path in files]
    meta = headers[0].metadata
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelLoadError(f"{files[0]} does not say its architecture (general.architecture)")
    file_type = meta.get("general.file_type")
    quant = FILE_TYPES.get(file_type, f"type {file_type}") if isinstance(file_type, int) else None
    context = meta.get(f"{arch}.context_length")
    title = meta.get("general.name")
    label = meta.get("general.size_label")
    tokenizer = "|".join(
        str(meta.get(f"tokenizer.ggml.{key}"))
        for key in ("model", "add_bos_token", "bos_token_id", "eos_token_id", "eot_token_id")
    )
    vocab_id = hashlib.sha256(f"{tokenizer}|{headers[0].vocab_digest}".encode()).hexdigest()[:16]
    trimmed = meta.get(KEY_SOURCE_SHA256)
    return ModelInfo(
        architecture=arch,
        title=title if isinstance(title, str) else None,
        n_params=sum(h.n_elements for h in headers),
        quantization=quant,
        context_length=context if isinstance(context, int) else None,
        chat_template=isinstance(meta.get("tokenizer.chat_template"), str),
        size_label=label if isinstance(label, str) and label.strip() else None,
        n_vocab=headers[0].n_tokens,
        vocab_id=vocab_id if headers[0].vocab_digest else "",
        trimmed_from=trimmed if isinstance(trimmed, str) and trimmed else None,
    )


def _described(found: _Found, cache: _HeaderCache) -> LocalModel:
    error, info = found.error, None
    if error is None:
        try:
            info = cache.info(found.files)
        except ModelLoadError as exc:
            error = str(exc)
        except OSError as exc:
            error = f"unreadable: {exc.strerror or exc}"
    return LocalModel(found.source, found.id, found.files, info, error, found.sha256)


def describe(path: Path) -> LocalModel:
    """A model file given by its path, described like a listed one (source "file")."""
    return _described(_Found("file", str(path), (path,)), _HeaderCache.load())


def find_models(sources: Iterable[str] = SOURCES) -> list[LocalModel]:
    """Every GGUF model in these sources, in source order, then by name. Projectors (`clip`) are
    left out; models whose files are bad are kept, with `error` set."""
    cache = _HeaderCache.load()
    out = []
    for source in sources:
        for found in _LISTERS[source]():
            model = _described(found, cache)
            if model.info is None or model.info.architecture != "clip":
                out.append(model)
    cache.save()
    return out


# -- names -------------------------------------------------------------------------------------


def resolve(name: str, found: Sequence[LocalModel] | None = None) -> LocalModel:
    """The one usable model a name picks (see the module for the forms a name takes).

    Args:
        name: what the user typed.
        found: the models to choose among (None: `find_models()`, or only the source the name's
            prefix names).

    Raises:
        ModelNotFound: no model, or several, answer to it; or the one that does is damaged.
    """
    text = name.strip()
    source, _, rest = text.partition(":")
    if source == "ollama" and rest:
        model = _ollama_by_name(rest)
    elif source == "hf" and rest:
        model = _hf_by_name(rest, found if found is not None else find_models(["hf"]))
    else:
        model = _by_name(text, found if found is not None else find_models())
    if model.error is not None:
        raise ModelNotFound(f"model {model.name} cannot be used: {model.error}")
    return model


def _by_name(text: str, found: Sequence[LocalModel]) -> LocalModel:
    wanted = text.lower()
    exact = [m for m in found if wanted in (m.name.lower(), m.id.lower())]
    if len(exact) == 1:
        return exact[0]
    matches = exact or [
        m for m in found if m.name.lower().startswith(wanted) or m.id.lower().startswith(wanted)
    ]
    if len(matches) == 1:
        return matches[0]
    if not matches:
        raise ModelNotFound(f"no model named {text!r}: not a file, nor a name `edgespec models` lists")
    raise AmbiguousModelName(_ambiguous(text, matches))


def _ambiguous(text: str, matches: Sequence[LocalModel]) -> str:
    shown = ", ".join(m.name for m in matches[:8]) + (
        f" and {len(matches) - 8} more" if len(matches) > 8 else ""
    )
    return f"{text!r} names {len(matches)} models: {shown}; give more of the name"


def _ollama_by_name(text: str) -> LocalModel:
    """`NAME[:TAG]` as Ollama parses it: [host/][namespace/]model[:tag], defaults filled in."""
    body, tag = text, "latest"
    if text.rfind(":") > text.rfind("/"):
        body, tag = text.rsplit(":", 1)
    parts = body.split("/")
    if not (1 <= len(parts) <= 3 and all(parts) and tag):
        raise ModelNotFound(f"ollama:{text} is not an Ollama model name (NAME[:TAG])")
    host, namespace, model = (["registry.ollama.ai", "library"][: 3 - len(parts)] + parts)[-3:]
    short = _ollama_name(host, namespace, model, tag)
    stores = ollama_dirs()
    for store in stores:
        manifest = store / "manifests" / host / namespace / model / tag
        if manifest.is_file():
            return _described(_ollama_found(store, short, manifest), _HeaderCache.load())
    where = ", ".join(map(str, stores)) or "no Ollama store (set OLLAMA_MODELS if it is elsewhere)"
    raise ModelNotFound(
        f"Ollama has no model {short} here (looked in {where}); `ollama pull {short}` gets it"
    )


def _hf_by_name(text: str, found: Sequence[LocalModel]) -> LocalModel:
    """`REPO`, `REPO/FILE.gguf` or `REPO:QUANT` among the Hugging Face cache's models."""
    repo, quant = text, None
    if ":" in text:
        repo, quant = text.rsplit(":", 1)
    in_cache = [m for m in found if m.source == "hf"]
    if repo.endswith(".gguf"):
        matches = [m for m in in_cache if m.id.lower() == repo.lower()]
    else:
        matches = [m for m in in_cache if m.id.lower().startswith(repo.lower().rstrip("/") + "/")]
        if quant is not None:
            matches = [m for m in matches if has_quant(m.id, quant)]
    if not matches:
        raise ModelNotFound(f"hf:{text} is not in the Hugging Face cache; `edgespec pull hf:{text}` gets it")
    if len(matches) > 1:
        chosen = [m for m in matches if has_quant(m.id, "Q4_K_M")] if quant is None else []
        if len(chosen) != 1:
            raise AmbiguousModelName(_ambiguous(f"hf:{text}", matches))
        matches = chosen
    return matches[0]


def has_quant(model_id: str, quant: str) -> bool:
    """Whether a file name carries a quantization label (Q4_K_M in `…-Q4_K_M.gguf`, case ignored)."""
    stem = model_id.rsplit("/", 1)[-1].lower()
    return re.search(rf"(^|[-_.]){re.escape(quant.lower())}([-_.]|$)", stem) is not None


def looks_like_path(text: str) -> bool:
    """Whether a model argument was meant as a file path rather than a name."""
    source, colon, _ = text.partition(":")
    if colon and source in SOURCES:
        return False
    return text.endswith((".gguf", ".onnx")) or text.startswith((".", "~", os.sep)) or os.path.isabs(text)
