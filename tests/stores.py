"""Model stores as other programs write them, for the tests of `edgespec models` and names."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
from gguf import GGUFWriter


def ollama_put(store: Path, source: Path | bytes, host: str, namespace: str, model: str, tag: str) -> Path:
    """A model as `ollama pull` stores it: the weights as a content-addressed blob, and a manifest
    naming it among the other layers."""
    data = source if isinstance(source, bytes) else source.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    blobs = store / "blobs"
    blobs.mkdir(parents=True, exist_ok=True)
    (blobs / f"sha256-{digest}").write_bytes(data)
    template = b"{{ .Prompt }}"
    template_digest = hashlib.sha256(template).hexdigest()
    (blobs / f"sha256-{template_digest}").write_bytes(template)

    def layer(kind: str, digest: str, size: int) -> dict[str, object]:
        return {"mediaType": kind, "digest": f"sha256:{digest}", "size": size}

    manifest = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.v2+json",
        "config": layer("application/vnd.docker.container.image.v1+json", "0" * 64, 2),
        "layers": [
            layer("application/vnd.ollama.image.model", digest, len(data)),
            layer("application/vnd.ollama.image.template", template_digest, len(template)),
        ],
    }
    path = store / "manifests" / host / namespace / model / tag
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(manifest))
    return blobs / f"sha256-{digest}"


def write_projector(path: Path) -> Path:
    writer = GGUFWriter(str(path), "clip")
    writer.add_tensor("v.patch_embd.weight", np.zeros((4, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
