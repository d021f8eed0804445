"""What endpoints work with: ``WebApp`` (shared by every request: the domain, auth, jobs, computed
images, the static folder) and ``Call`` (one request: its principal, query and body, and the
answers it builds), on a thread of Starlette's pool."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import anyio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response

from rulewright.service.domain.core import Domain
from rulewright.service.errors import InvalidArgument
from rulewright.service.jobs.editor import Jobs
from rulewright.service.server.auth import AuthInterceptor, is_loopback
from rulewright.service.server.errors import PermissionDenied
from rulewright.service.server.web.errors import BodyTooLarge
from rulewright.service.server.web.render import Renders
from rulewright.service.server.web.responses import error_response, json_response
from rulewright.service.server.web.schemas import parse_body

WEBUI_DIR = Path(__file__).resolve().parent.parent / "webui"
MAX_BODY_BYTES = 1 << 20           # largest JSON request body (a mask is a few KiB of zlib+base64)
SSE_KEEPALIVE_S = 15.0             # a comment line this often keeps proxies from closing an idle stream
MAX_CONNECTIONS = 64               # open connections; more are refused with 503
_MISSING_TOKEN = "missing bearer token (header 'Authorization: Bearer <token>' or ?token=)"


class WebApp:
    """What the endpoints share: the domain, auth, jobs, computed images and the static folder."""

    def __init__(self, domain: Domain, tokens=None, static_dir: Path | str | None = None,
                 serving: Callable[[], bool] | None = None, max_body_bytes: int = MAX_BODY_BYTES,
                 job_ttl_s: float = 600.0, max_jobs: int = 4, renders: int = 2048,
                 sse_keepalive_s: float = SSE_KEEPALIVE_S, max_streams: int = MAX_CONNECTIONS):
        self.domain = domain
        self.auth = AuthInterceptor(tokens) if tokens else None
        self.static_dir = Path(static_dir) if static_dir is not None else WEBUI_DIR
        self.serving = serving or domain.has_models
        self.max_body_bytes = max_body_bytes
        self.jobs = Jobs(ttl_s=job_ttl_s, max_running=max_jobs)
        self.renders = Renders(renders)
        self.sse_keepalive_s = sse_keepalive_s
        self.max_streams = max_streams

    @functools.cached_property
    def stream_threads(self) -> anyio.CapacityLimiter:
        """The threads event streams wait for news on (at most ``max_streams``: one per open
        connection at most), apart from the endpoints' pool; made on the event loop, where it is used."""
        return anyio.CapacityLimiter(self.max_streams)


def _host_name(host: str) -> str:
    """The name in a Host header: ``[::1]:8080`` → ``::1``, ``localhost:8080`` → ``localhost``."""
    if host.startswith("["):
        return host[1:host.index("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class Call:
    """One request on a thread of Starlette's pool: ``answer`` authorizes it and runs the route's
    endpoint, which reads ``body()`` and ``query`` and returns ``json(...)`` or ``send(...)``."""

    def __init__(self, web: WebApp, request: Request):
        self.web = web
        self.domain = web.domain
        self.request = request
        self.headers = request.headers
        self.query = parse_qs(request.scope["query_string"].decode("latin-1"), keep_blank_values=True)
        self.principal = "anonymous"
        self.close_connection = False    # set when the request's body is left unread: no request may follow it

    def answer(self, route, params: dict[str, str]) -> Response:
        """The response to this request on ``route``, an error as JSON."""
        try:
            self.principal = self._authorize(route)
            return route.endpoint(self, **params)
        except Exception as exc:  # noqa: BLE001 -- every error becomes a JSON answer; the server keeps serving
            return error_response(exc, self._closing(), plain=route.plain_errors)

    def _closing(self) -> dict:
        return {"Connection": "close"} if self.close_connection else {}

    def send(self, status: int, ctype: str, data: bytes, headers: dict | None = None) -> Response:
        """``data`` as is, of type ``ctype``."""
        return Response(data, status, {**(headers or {}), **self._closing()}, media_type=ctype)

    def json(self, status: int, obj: Any, headers: dict | None = None) -> Response:
        """``obj`` as JSON, never cached."""
        return json_response(status, obj, {**(headers or {}), **self._closing()})

    def _authorize(self, route) -> str:
        """The principal for this request, after the host, origin and token checks."""
        host = self.headers.get("Host", "")
        if self.web.auth is None and host and not is_loopback(_host_name(host) + ":0"):
            # auth off means loopback only: a foreign Host is a browser tricked into calling us (DNS rebinding)
            raise PermissionDenied("HOST_REFUSED", f"Host {host!r} is not a loopback name; this server has auth "
                                                   "off and answers only http://127.0.0.1 or http://localhost")
        if route.method in ("POST", "PUT"):
            origin = self.headers.get("Origin")
            if origin is not None and urlsplit(origin).netloc != host:
                raise PermissionDenied("ORIGIN_REFUSED", f"cross-origin request from {origin!r} refused")
        if route.rpc is None or self.web.auth is None:
            return "anonymous"
        secret = None
        header = self.headers.get("Authorization")
        if header is not None:
            scheme, _, token = header.strip().partition(" ")
            secret = token.strip().encode() if scheme.lower() == "bearer" else b""
        elif self.query.get("token"):
            secret = self.query["token"][-1].encode()
        return self.web.auth.authorize(route.rpc, secret, missing=_MISSING_TOKEN).principal

    def body(self) -> dict:
        """The JSON object of the request body (at most ``max_body_bytes``, ``application/json``)."""
        return parse_body(self.data(json_only=True))

    def data(self, json_only: bool = False) -> bytes:
        """The request body's bytes (at most ``max_body_bytes``; ``json_only``: ``application/json`` only)."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True
            raise InvalidArgument("body", "send a Content-Length (chunked bodies are not accepted)")
        length = int(self.headers.get("Content-Length") or 0)      # h11 has refused one that is not a number
        if length > self.web.max_body_bytes:
            self.close_connection = True
            raise BodyTooLarge(f"request body of {length} bytes is over the limit of {self.web.max_body_bytes}",
                               limit=self.web.max_body_bytes)
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if json_only and length and ctype != "application/json":
            raise InvalidArgument("body", f"Content-Type must be application/json, got {ctype or 'none'!r}")
        try:
            return anyio.from_thread.run(self.request.body) if length else b""    # read on the event loop
        except ClientDisconnect:
            raise InvalidArgument("body", f"the connection closed before the {length} bytes came") from None
