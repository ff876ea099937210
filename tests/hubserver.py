"""A local Hugging Face Hub for download tests: an HTTP server on 127.0.0.1 answering the requests
huggingface_hub's own client sends, so its real download code runs end to end.

It serves, for each repo it holds:
- `GET /api/models/{repo}[/revision/{rev}]`: the model's info, with each file's size and, for
  files it calls LFS (every .gguf), the sha256 (`siblings[].lfs`), as `model_info(files_metadata=
  True)` reads it;
- `HEAD` / `GET /{repo}/resolve/{rev}/{file}`: the file, with the headers `hf_hub_download` reads
  (`X-Repo-Commit`, `ETag` / `X-Linked-Etag`, `X-Linked-Size`), honouring `Range: bytes=N-` with a
  206 so an interrupted download resumes.

`cut` makes the first GET of a file stop after that many bytes (the connection closes mid-body),
to test resuming; `corrupt` serves other bytes than the sha256 the info states.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class HubFile:
    data: bytes
    sha256: str = ""

    def __post_init__(self) -> None:
        self.sha256 = self.sha256 or hashlib.sha256(self.data).hexdigest()


@dataclass
class FakeHub:
    """repos: repo id → file name → bytes."""

    repos: dict[str, dict[str, bytes]]
    cut: dict[str, int] = field(default_factory=dict)
    corrupt: set[str] = field(default_factory=set)
    #: (method, path, Range header) of every request
    log: list[tuple[str, str, str | None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.files = {
            repo: {name: HubFile(data) for name, data in files.items()} for repo, files in self.repos.items()
        }
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_HEAD(self) -> None:
                hub.answer(self, body=False)

            def do_GET(self) -> None:
                hub.answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    def gets(self, name: str) -> list[str | None]:
        """The Range headers of the GETs of a file (None: the whole file)."""
        return [r for method, path, r in self.log if method == "GET" and path.endswith("/" + name)]

    def answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        path = handler.path.split("?", 1)[0]
        self.log.append((handler.command, path, handler.headers.get("Range")))
        info = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?", path)
        if info and handler.command == "GET":
            return self._info(handler, info[1])
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        if resolve is None:
            return self._error(handler, 404, "RepoNotFound")
        repo, name = resolve[1], resolve[3]
        if repo not in self.files:
            return self._error(handler, 404, "RepoNotFound")
        if name not in self.files[repo]:
            return self._error(handler, 404, "EntryNotFound")
        self._file(handler, self.files[repo][name], name, body)

    def _info(self, handler: BaseHTTPRequestHandler, repo: str) -> None:
        if repo not in self.files:
            return self._error(handler, 404, "RepoNotFound")
        siblings = []
        for name, file in self.files[repo].items():
            sibling: dict[str, Any] = {"rfilename": name, "size": len(file.data)}
            if name.endswith(".gguf"):
                sibling["lfs"] = {"sha256": file.sha256, "size": len(file.data), "pointerSize": 134}
            siblings.append(sibling)
        data = json.dumps({"id": repo, "modelId": repo, "sha": COMMIT, "siblings": siblings}).encode()
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _file(self, handler: BaseHTTPRequestHandler, file: HubFile, name: str, body: bool) -> None:
        data = file.data if name not in self.corrupt else bytes(b ^ 1 for b in file.data)
        start = 0
        asked = handler.headers.get("Range")
        if asked and (match := re.fullmatch(r"bytes=(\d+)-", asked)):
            start = int(match[1])
        handler.send_response(206 if start else 200)
        handler.send_header("X-Repo-Commit", COMMIT)
        lfs = name.endswith(".gguf")
        handler.send_header("ETag", f'"{file.sha256 if lfs else hashlib.sha1(file.data).hexdigest()}"')
        if lfs:
            handler.send_header("X-Linked-Etag", f'"{file.sha256}"')
            handler.send_header("X-Linked-Size", str(len(data)))
        handler.send_header("Accept-Ranges", "bytes")
        if start:
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        handler.send_header("Content-Length", str(len(data) - start))
        handler.end_headers()
        if not body:
            return
        part = data[start:]
        cut = self.cut.pop(name, None) if handler.command == "GET" else None
        if cut is not None:
            handler.wfile.write(part[:cut])
            handler.wfile.flush()
            handler.close_connection = True
            handler.connection.shutdown(2)  # mid-body: the client sees a broken transfer
            return
        handler.wfile.write(part)

    def _error(self, handler: BaseHTTPRequestHandler, status: int, code: str) -> None:
        data = json.dumps({"error": code}).encode()
        handler.send_response(status)
        handler.send_header("X-Error-Code", code)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        if handler.command == "GET":
            handler.wfile.write(data)
