"""What a local server refuses before any route runs: request heads over 16 KiB, and requests a
web page could make without its user knowing.

A server on 127.0.0.1 without an API key is reachable from every web page the user opens: a page
may POST to it with a "simple" content type (text/plain, no CORS preflight), and a page on a name
that resolves to 127.0.0.1 (DNS rebinding) may even read the answers. So, as local servers that
care do it:
- a POST body must say `Content-Type: application/json` (415 otherwise), which a page can send
  only after a CORS preflight, and the preflight needs an allowed origin;
- a request with an `Origin` header is refused (403) unless that origin was allowed
  (`--cors-origin`), whatever its method: browsers send `Origin` on every cross-site POST;
- when the server listens on a loopback address only, the `Host` header must name a loopback
  address or `localhost` (403 otherwise), which defeats DNS rebinding. Listening on another
  address (`--host`) opens the server to other names, and then the API key is what protects it.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from typing import Any

from fastapi.responses import JSONResponse

from edgespec.server.queue import APIError

#: The most a request line and its headers may hold. uvicorn's parser (h11) enforces the same
#: 16 KiB only while a head is still incomplete, so a larger head that arrives in one read got
#: through (20 KB and 60 KB heads were answered 200); this makes the limit hold however it arrives.
MAX_HEAD_BYTES = 16 * 1024

#: Host names a loopback-only server answers to (besides its own address)
LOCAL_NAMES = frozenset({"localhost", "localhost.", "127.0.0.1", "::1"})


def host_name(header: str) -> str:
    """The name in a Host header, without its port and brackets, lower-cased."""
    header = header.strip().lower()
    if header.startswith("["):  # [::1]:8080
        return header[1:].partition("]")[0]
    if header.count(":") == 1:
        return header.partition(":")[0]
    return header


def is_local_host(name: str) -> bool:
    if name in LOCAL_NAMES or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def media_type(content_type: str) -> str:
    return content_type.partition(";")[0].strip().lower()


class RequestGuard:
    """ASGI middleware: refuses cross-site and rebinding requests (see the module's docstring).

    Args:
        cors_origins: origins whose pages may call the API ("*": any).
        local_only: check the Host header (the server listens on a loopback address only).
    """

    def __init__(self, app: Any, *, cors_origins: Sequence[str], local_only: bool) -> None:
        self.app = app
        self.any_origin = "*" in cors_origins
        self.origins = frozenset(origin.rstrip("/") for origin in cors_origins)
        self.local_only = local_only

    def refusal(self, scope: Any) -> APIError | None:
        size = len(scope.get("raw_path") or b"") + len(scope.get("query_string") or b"")
        size += sum(len(name) + len(value) + 4 for name, value in scope["headers"])
        if size > MAX_HEAD_BYTES:
            return APIError(
                431,
                f"the request line and headers are over {MAX_HEAD_BYTES // 1024} KiB ({size} bytes)",
                code="request_header_fields_too_large",
            )
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        if self.local_only:
            name = host_name(headers.get("host", ""))
            # No Host at all (HTTP/1.0 tools) is no rebinding: a browser always sends one.
            if name and not is_local_host(name):
                return APIError(
                    403,
                    f"refused: the Host header {name!r} is not a local name of this server, which "
                    "listens on a loopback address only (edgespec serve --host opens it to others)",
                    code="host_not_allowed",
                )
        origin = headers.get("origin")
        if origin is not None and not self.any_origin and origin.rstrip("/") not in self.origins:
            return APIError(
                403,
                f"refused: requests from web pages at {origin} are not allowed "
                f"(edgespec serve --cors-origin {origin} allows them)",
                code="origin_not_allowed",
            )
        if scope["method"] == "POST":
            given = media_type(headers.get("content-type", ""))
            if given != "application/json":
                return APIError(
                    415,
                    "the request body must be sent with Content-Type: application/json, "
                    f"got {given or 'none'}",
                    param="Content-Type",
                    code="unsupported_media_type",
                )
        return None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            error = self.refusal(scope)
            if error is not None:
                # The body is not read: close the connection after the answer.
                response = JSONResponse(
                    error.body(), status_code=error.status, headers={"Connection": "close"}
                )
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
