"""How long `edgespec models` takes on a machine holding 50 models in every store it reads.

Two machines are laid out in temporary folders (HOME, the Hugging Face cache, LM Studio's folder,
Ollama's store, a folder of the user's, edgespec's cache), as each program writes them:

- `mixed`: the default pair (the real joined files, linked into a fresh edgespec cache) and 48
  tiny test models, 12 in each of the four other stores;
- `full-size`: 50 files with the default target's real header (152k-token vocabulary, 339
  tensors) and its full size, the weights left as a sparse hole; 12 or 13 in each store. This is
  the cost of reading 50 real headers, without 50 GB of disk.

Each round runs `edgespec models --json` in a fresh interpreter (the command a user types, start-up
included) twice: cold, with the cache of header facts deleted, and warm, as a second listing
finds it. Rounds alternate the layouts; medians and maxima are printed and written as JSON.

    python benchmarks/model_listing.py --rounds 7 --out benchmarks/results/model_listing.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgespec.formats.gguf import check_gguf  # noqa: E402
from edgespec.load import models  # noqa: E402

STORES = ("hf", "lmstudio", "ollama", "folder")


def place(kind: str, machine: Path, index: int, write) -> None:
    """Put model number `index` into store `kind` under `machine`; `write(path)` makes the file."""
    name = f"model{index:02d}-Q4_K_M.gguf"
    if kind == "hf":
        repo = machine / "hf" / "hub" / f"models--org--Model{index:02d}-GGUF"
        blob_id = hashlib.sha256(name.encode()).hexdigest()  # the blob's name; nothing checks it
        blob = repo / "blobs" / blob_id
        blob.parent.mkdir(parents=True)
        write(blob)
        commit = "0" * 40
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True)
        link.symlink_to(Path("..") / ".." / "blobs" / blob_id)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(commit)
    elif kind == "lmstudio":
        path = machine / "home" / ".lmstudio" / "models" / "publisher" / f"Model{index:02d}-GGUF" / name
        path.parent.mkdir(parents=True)
        write(path)
    elif kind == "ollama":
        store = machine / "ollama"
        digest = hashlib.sha256(name.encode()).hexdigest()
        blob = store / "blobs" / f"sha256-{digest}"
        blob.parent.mkdir(parents=True, exist_ok=True)
        write(blob)
        layer = {"mediaType": "application/vnd.ollama.image.model", "digest": f"sha256:{digest}", "size": 1}
        manifest = store / "manifests" / "registry.ollama.ai" / "library" / f"model{index:02d}" / "latest"
        manifest.parent.mkdir(parents=True)
        manifest.write_text(json.dumps({"schemaVersion": 2, "layers": [layer]}))
    else:
        path = machine / "mine" / f"sub{index % 3}" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        write(path)


def sparse_copy(source: Path, header_bytes: int):
    """A writer of files with `source`'s header and size, the rest a hole."""
    with source.open("rb") as handle:
        head = handle.read(header_bytes)
    size = source.stat().st_size

    def write(path: Path) -> None:
        with path.open("wb") as handle:
            handle.write(head)
            handle.truncate(size)

    return write


def build(machine: Path, layout: str) -> int:
    """Lay out a machine; returns how many models it holds."""
    cache = machine / "edgespec-cache"
    cache.mkdir(parents=True)
    (machine / "home").mkdir(exist_ok=True)
    target = models.cached_path(models.TARGET)
    count = 0
    if layout == "mixed":
        for model in models.DEFAULT_MODELS.values():
            (cache / model.filename).symlink_to(models.cached_path(model))
            count += 1
        from tests.tinymodels import build_tiny_model

        tiny = build_tiny_model(machine / "tiny.gguf", seed=1)

        def write(path: Path) -> None:
            shutil.copyfile(tiny, path)

        for i in range(48):
            place(STORES[i % 4], machine, i, write)
            count += 1
        tiny.unlink()
    else:
        write = sparse_copy(target, check_gguf(target).data_offset)
        for i in range(50):
            place(STORES[i % 4], machine, i, write)
            count += 1
    return count


def environment(machine: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "OLLAMA", "EDGESPEC", "XDG_"))}
    env.update(
        HOME=str(machine / "home"),
        HF_HOME=str(machine / "hf"),
        OLLAMA_MODELS=str(machine / "ollama"),
        EDGESPEC_MODEL_DIRS=str(machine / "mine"),
        EDGESPEC_CACHE_DIR=str(machine / "edgespec-cache"),
        EDGESPEC_CONFIG_DIR=str(machine / "config"),
    )
    return env


def listing(machine: Path) -> tuple[float, int]:
    """One `edgespec models --json` in a fresh interpreter: (seconds, models listed)."""
    command = [sys.executable, "-m", "edgespec", "models", "--json"]
    start = time.perf_counter()
    done = subprocess.run(command, env=environment(machine), capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    return seconds, len(json.loads(done.stdout)["models"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if not models.is_verified(models.TARGET) or not models.is_verified(models.DRAFT):
        sys.exit("the default pair is not joined yet: run `edgespec run --draft none hi` once first")
    times: dict[str, list[float]] = {}
    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        machines = {layout: Path(tmp) / layout for layout in ("mixed", "full-size")}
        for layout, machine in machines.items():
            expected = build(machine, layout)
            seconds, listed = listing(machine)  # warms the page cache; not counted
            if listed != expected:
                sys.exit(f"{layout}: listed {listed} of {expected} models")
            counts[layout] = listed
        for _ in range(args.rounds):
            for layout, machine in machines.items():
                (machine / "edgespec-cache" / ".headers.json").unlink(missing_ok=True)
                times.setdefault(f"{layout} cold", []).append(listing(machine)[0])
                times.setdefault(f"{layout} warm", []).append(listing(machine)[0])
    result = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "date": time.strftime("%Y-%m-%d"),
        "rounds": args.rounds,
        "models": counts,
        "seconds": {
            key: {"median": statistics.median(v), "max": max(v), "all": v} for key, v in times.items()
        },
    }
    for key, value in result["seconds"].items():
        print(f"{key:<16} median {value['median']:.3f} s   max {value['max']:.3f} s")
    if args.out is not None:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
