"""The HTTP side of the server: the editor page and its small JSON API (``docs/web-api.md``), a
Starlette application served by uvicorn.

- ``create_web_server(domain, address, tokens=..., serving=..., tls=...) -> WebServer``: uvicorn
  started on a thread of its own (the gRPC server keeps the main thread and the signals) and its own
  port (port 0: a free one); ``WebServer.stop()`` (also ``shutdown()``) stops it, cancels its
  running jobs and ends their event streams. ``tls`` (``tls.TlsFiles``, the gRPC server's PEM
  files) becomes uvicorn's certificate, key and client CA. Like ``create_server``, it refuses a
  non-loopback address without tokens (``auth.check_auth_config``).
- Connections (``_Connection``, uvicorn's HTTP/1.1 protocol with three bounds added): at most
  ``max_connections`` open (more get 503 ``TOO_MANY_CONNECTIONS`` and are closed), one on which
  the client owes the next bytes (a request, the rest of one) is closed after ``idle_timeout_s``
  without any (uvicorn's keep-alive timeout, which alone covers only the time between requests),
  and a request whose headers and body have not all arrived ``request_timeout_s`` after the
  server began waiting for it is answered 408 ``REQUEST_TIMEOUT`` and closed (a client dripping
  a byte at a time cannot keep a slot). Requests h11 cannot parse are answered as JSON too.
- Routes: ``ROUTES``, one Starlette ``Route`` per endpoint, each with the gRPC method whose role it
  needs (``Route.rpc``, ``auth.METHOD_ROLES``); no route, a method the route does not take (405
  with ``Allow``) and a method no endpoint knows (501) answer JSON errors. ``_RequestLog`` adds the
  security headers to every answer and logs one JSON line (and the metrics) per request.
- Endpoints: the ``h_*`` methods of ``_Handler``, one object per request, run in Starlette's thread
  pool, never on the event loop (the domain's work is CPU-bound PyTorch). Each maps its JSON to
  the same typed request (``service/requests.py``) the gRPC servicers build and calls the same
  ``Domain`` method, which checks it with the same bounds. Only what JSON itself can get wrong is
  refused here (``_body``: at most ``max_body_bytes``, ``application/json``, no chunked bodies;
  types, unknown fields, mask sizes before inflating); ``errors.renamed`` names the few fields
  JSON spells differently.
- Auth: the same tokens and roles as gRPC; the token comes from ``Authorization: Bearer`` or
  ``?token=``. With auth off (loopback only) the ``Host`` header must name a loopback host (no DNS
  rebinding), and every request that changes something must be ``application/json`` from no or
  the same origin (no cross-site form posts).
- Errors: ``error_body(exc)`` maps any exception through ``errors.to_status`` (the one
  ``ERROR_TABLE``) to ``{"error": {"code", "message", "reason", "domain", "metadata",
  "field_violations"}}`` and an HTTP status (``HTTP_STATUS``).
- Images are PNG URLs: samples at ``/api/models/{m}/versions/{n}/images/{seed}.png`` (PNG bytes
  from ``convert.images_pb``, the bytes gRPC Sample returns), computed images (heatmaps, rewrite
  previews) at ``/api/renders/{id}.png`` from a small LRU (``Renders``).
- Rewrites run as jobs (``web_jobs.Jobs``): ``domain.rewrite`` on a thread, its progress events
  (the stages gRPC streams, ``convert.progress_stage``) as server-sent events, replayed to late
  subscribers; a stream waits for news on a thread of its own pool (``WebApp.stream_threads``),
  so open streams never take the endpoints' threads.
- Static files: ``GET /`` and ``/assets/*`` from ``service/server/webui/`` (built by ``make web``;
  missing: 503 ``the editor is not built: run make web``); nothing outside ``assets/`` is served.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import io
import json
import logging
import math
import mimetypes
import re
import secrets
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import anyio
import h11
import torch
import torch.nn.functional as F
import uvicorn
from google.rpc import code_pb2, error_details_pb2
from PIL import Image as PILImage
from starlette import routing
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.http.h11_impl import H11Protocol

from rulewright.service.domain.core import _json_metrics
from rulewright.service.engine.dissect import Intervention
from rulewright.service.engine.errors import InvalidArgument
from rulewright.service.engine.progress import Event, Progress
from rulewright.service.engine.regions import Region
from rulewright.service.errors import Code, Error
from rulewright.service.domain.requests import AliasRequest, DissectRequest, RewriteRequest, SampleRequest, SearchRequest
from rulewright.v1 import images_pb2

from rulewright.service.server import convert
from rulewright.service.server.auth import AuthInterceptor, check_auth_config, is_loopback
from rulewright.service.server.errors import PermissionDenied, renamed, to_status
from rulewright.service.domain.limits import check_count, check_region_json
from rulewright.service.server.tls import TlsFiles
from rulewright.service.jobs.editor import CANCELLED, FAILED, Jobs

log = logging.getLogger(__name__)

WEBUI_DIR = Path(__file__).resolve().parent / "webui"
NOT_BUILT = "the editor is not built: run make web\n"
MAX_BODY_BYTES = 1 << 20           # largest JSON request body (a mask is a few KiB of zlib+base64)
SSE_KEEPALIVE_S = 15.0             # a comment line this often keeps proxies from closing an idle stream
MAX_CONNECTIONS = 64               # open connections; more are refused with 503
IDLE_TIMEOUT_S = 15.0              # a connection that sends nothing (or half a request) this long is closed
REQUEST_TIMEOUT_S = 30.0           # a whole request (headers and body) must arrive this soon once awaited
STOP_TIMEOUT_S = 5.0               # how long stop() lets requests in flight finish, by default


def _raw_answer(status: str, code: str, reason: str, message: str, extra: str = "", **metadata: str) -> bytes:
    """A whole HTTP/1.1 JSON error answer, written to a socket as is (outside any request's cycle)."""
    body = json.dumps({"error": {"code": code, "message": message, "reason": reason, "domain": "rulewright.dev",
                                 "metadata": metadata, "field_violations": []}}).encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{extra}Connection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


_BUSY = _raw_answer("503 Service Unavailable", "RESOURCE_EXHAUSTED", "TOO_MANY_CONNECTIONS",
                    "too many open connections; retry", extra="Retry-After: 1\r\n")
_GEN = "/rulewright.v1.GeneratorService/"
_REG = "/rulewright.v1.RegistryService/"
_MISSING_TOKEN = "missing bearer token (header 'Authorization: Bearer <token>' or ?token=)"
_MAX_INT64 = 2**63 - 1
_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"}   # others: 501; these on a wrong path: 405
_ROUTE_NAME = "rulewright.route"   # scope key: the endpoint that answered, for the log line and the metrics

# gRPC code name → HTTP status (docs/web-api.md); anything else: 500.
HTTP_STATUS = {"INVALID_ARGUMENT": 400, "OUT_OF_RANGE": 400, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403,
               "NOT_FOUND": 404, "ALREADY_EXISTS": 409, "ABORTED": 409, "FAILED_PRECONDITION": 412,
               "RESOURCE_EXHAUSTED": 429, "CANCELLED": 499, "UNAVAILABLE": 503, "DEADLINE_EXCEEDED": 504}
_SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
                     "X-Frame-Options": "DENY"}
_RAW_SECURITY_HEADERS = [(k.lower().encode(), v.encode()) for k, v in _SECURITY_HEADERS.items()]


# ---- errors ----------------------------------------------------------------------------------

class RouteNotFound(Error):
    """No endpoint at that path (→ NOT_FOUND)."""

    code = Code.NOT_FOUND
    reason = "NOT_FOUND"


class MethodNotAllowed(RouteNotFound):
    """An endpoint that does not take this HTTP method (→ NOT_FOUND's code, HTTP 405)."""

    http_status = 405

    def __init__(self, message: str, allow: list[str]):
        super().__init__(message)
        self.allow = allow


class RenderNotFound(RouteNotFound):
    """A computed image no longer (or never) in the LRU (→ NOT_FOUND)."""


class Refused(Error):
    """A refusal of the HTTP side itself (a limit, a method or a request it cannot parse) with its
    own code and reason; ``http_status`` refines the HTTP status (413 for a body, 501 for a method)."""

    def __init__(self, code: Code, reason: str, message: str, http_status: int, **metadata: Any):
        super().__init__(message, reason=reason, **metadata)
        self.code = code
        self.http_status = http_status


class BodyTooLarge(Refused):
    """A request body over the HTTP side's limit (→ RESOURCE_EXHAUSTED, HTTP 413)."""

    def __init__(self, message: str, **metadata: Any):
        super().__init__(Code.RESOURCE_EXHAUSTED, "BODY_TOO_LARGE", message, 413, **metadata)


def error_body(exc: BaseException) -> tuple[int, dict]:
    """(HTTP status, ``{"error": ...}``) for ``exc``, through ``errors.to_status`` (``ERROR_TABLE``)."""
    status = to_status(exc)
    code = code_pb2.Code.Name(status.code)
    out: dict[str, Any] = {"code": code, "message": status.message, "reason": "", "domain": "", "metadata": {},
                           "field_violations": []}
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            out.update(reason=info.reason, domain=info.domain, metadata=dict(info.metadata))
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            out["field_violations"] = [{"field": v.field, "description": v.description}
                                       for v in bad.field_violations]
    if code == "INTERNAL":
        log.error("unhandled error", exc_info=exc, extra={"event": "web_internal_error"})
    return getattr(exc, "http_status", None) or HTTP_STATUS.get(code, 500), {"error": out}


# ---- JSON values -----------------------------------------------------------------------------

def _finite(value: Any) -> Any:
    """JSON-safe: NaN and infinities (which browsers' JSON.parse refuses) become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _int(body: dict, key: str, default: Any = None, lo: int = 0, hi: int = _MAX_INT64, field: str | None = None):
    """``body[key]`` as an integer in [lo, hi]; ``default`` when absent or null."""
    field = field or key
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(field, f"must be an integer, got {json.dumps(value)[:80]}")
    if not lo <= value <= hi:
        raise InvalidArgument(field, f"must lie in [{lo}, {hi}], got {value}")
    return value


def _required_int(body: dict, key: str, lo: int = 0, hi: int = _MAX_INT64) -> int:
    if body.get(key) is None:
        raise InvalidArgument(key, "is required")
    return _int(body, key, lo=lo, hi=hi)


def _float(body: dict, key: str) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgument(key, f"must be a finite number, got {json.dumps(value)}")
    return float(value)


def _str(body: dict, key: str, default: str = "", required: bool = False, limit: int = 256) -> str:
    value = body.get(key)
    if value is None or value == "":
        if required:
            raise InvalidArgument(key, "is required")
        return default
    if not isinstance(value, str):
        raise InvalidArgument(key, f"must be a string, got {json.dumps(value)}")
    if len(value) > limit:
        raise InvalidArgument(key, f"must be at most {limit} characters")
    return value


def _bool(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidArgument(key, f"must be true or false, got {json.dumps(value)}")
    return value


def _int_list(body: dict, key: str, limit: int = 1_000_000) -> list[int]:
    value = body.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidArgument(key, f"must be a list of integers, got {json.dumps(value)[:80]}")
    if len(value) > limit:
        raise InvalidArgument(key, f"at most {limit} entries, got {len(value)}")
    return [_int({"v": v}, "v", field=f"{key}[{i}]") for i, v in enumerate(value)]


def _stats(body: dict, key: str) -> tuple[int | None, int]:
    """(samples or None for the default, first seed) of a statistics object ``{samples, seed_start}``."""
    value = body.get(key) or {}
    if not isinstance(value, dict):
        raise InvalidArgument(key, "must be an object {samples, seed_start}")
    unknown = set(value) - {"samples", "seed_start"}
    if unknown:
        raise InvalidArgument(key, f"unknown fields {sorted(unknown)}")
    return (_int(value, "samples", None, field=f"{key}.samples") or None,
            _int(value, "seed_start", 0, field=f"{key}.seed_start"))


def _ref(body: dict) -> tuple[str, int, str]:
    """(model, version, reference) of a body's ``model`` and ``version``."""
    model = _str(body, "model", required=True, limit=128)
    version = _required_int(body, "version", lo=1)
    return model, version, f"{model}/{version}"


def _time(t) -> str:
    return t.isoformat()


# ---- computed images -------------------------------------------------------------------------

def png(images: torch.Tensor) -> list[bytes]:
    """(N, H, W, 3) uint8 → PNG bytes each, exactly as gRPC Sample encodes them."""
    return [m.data for m in convert.images_pb(images, images_pb2.IMAGE_FORMAT_PNG)]


def heatmap_png(values: torch.Tensor, threshold: float, size: int) -> bytes:
    """An RGBA PNG of ``values`` (H, W) at ``size``×``size``: transparent where a cell is not above
    ``threshold``, yellow to red (and more opaque) from the threshold up to the map's maximum.

    Cells are enlarged as blocks (nearest), so the shaded share is exactly the share of cells
    above the threshold that search reports as ``above``."""
    v = values.detach().float().cpu()
    if tuple(v.shape) != (size, size):
        v = F.interpolate(v[None, None], size=(size, size), mode="nearest")[0, 0]
    threshold = float(threshold) if math.isfinite(float(threshold)) else float(v.max())
    span = max(float(v.max()) - threshold, 1e-12)
    t = ((v - threshold) / span).clamp(0, 1)
    above = v > threshold
    rgba = torch.zeros(size, size, 4, dtype=torch.uint8)
    rgba[..., 0] = 255
    rgba[..., 1] = (230 - 190 * t).round().to(torch.uint8)
    rgba[..., 2] = (40 * (1 - t)).round().to(torch.uint8)
    rgba[..., 3] = torch.where(above, (110 + 145 * t).round(), torch.zeros_like(t)).to(torch.uint8)
    buf = io.BytesIO()
    PILImage.fromarray(rgba.numpy(), "RGBA").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class Renders:
    """Computed PNGs (heatmaps, previews) by random id, the ``capacity`` newest kept."""

    def __init__(self, capacity: int = 2048):
        self.capacity = capacity
        self._items: "collections.OrderedDict[str, bytes]" = collections.OrderedDict()
        self._lock = threading.Lock()

    def put(self, data: bytes) -> str:
        """The URL of ``data``."""
        key = secrets.token_urlsafe(12)
        with self._lock:
            self._items[key] = data
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return f"/api/renders/{key}.png"

    def get(self, key: str) -> bytes:
        with self._lock:
            data = self._items.get(key)
            if data is not None:
                self._items.move_to_end(key)
        if data is None:
            raise RenderNotFound(f"image {key!r} is gone (the server keeps the {self.capacity} newest computed "
                                 "images): run the search, dissection or rewrite again")
        return data


# ---- routes ----------------------------------------------------------------------------------

class Route(routing.Route):
    """One endpoint: its HTTP method and path, the ``_Handler`` method that answers it (``h_`` and
    the route's ``name``), and the gRPC method whose role it needs (``rpc``; None: public)."""

    def __init__(self, method: str, path: str, name: str, rpc: str | None):
        super().__init__(path, self._serve, methods=[method], name=name)
        self.methods = {method}        # not Starlette's implicit HEAD: a path takes its one method (405, Allow)
        self.method = method
        self.rpc = rpc

    async def _serve(self, request: Request) -> Response:
        request.scope[_ROUTE_NAME] = self.name
        handler = _Handler(request.app.state.web, request)
        return await run_in_threadpool(handler.answer, self, request.path_params)


_M = "/api/models/{model}"
_V = _M + "/versions/{version}"
_J = "/api/rewrites/{job}"
ROUTES = [
    Route("GET", "/", "page", None),
    Route("GET", "/index.html", "page", None),
    Route("GET", "/assets/{path:path}", "asset", None),
    Route("GET", "/healthz", "healthz", None),
    Route("GET", "/api/models", "models", _REG + "ListModels"),
    Route("GET", _M + "/versions", "versions", _REG + "ListVersions"),
    Route("GET", _V + "/layers", "layers", _GEN + "ListLayers"),
    Route("GET", _V + "/images/{seed}.png", "image", _GEN + "Sample"),
    Route("GET", "/api/renders/{key}.png", "render", _GEN + "Sample"),
    Route("POST", "/api/search", "search", _GEN + "SearchContext"),
    Route("POST", "/api/dissect", "dissect", _GEN + "Dissect"),
    Route("POST", "/api/rewrites", "rewrite", _GEN + "Rewrite"),
    Route("GET", _J, "job", _GEN + "Rewrite"),
    Route("GET", _J + "/events", "events", _GEN + "Rewrite"),
    Route("POST", _J + "/cancel", "cancel", _GEN + "Rewrite"),
    Route("PUT", _M + "/aliases/{alias}", "set_alias", _REG + "SetAlias"),
    Route("POST", _M + "/aliases/{alias}/rollback", "rollback", _REG + "RollbackAlias"),
]


# ---- the application -------------------------------------------------------------------------

class WebApp:
    """What the handlers share: the domain, auth, jobs, computed images and the static folder."""

    def __init__(self, domain, tokens=None, static_dir: Path | str | None = None,
                 serving: Callable[[], bool] | None = None, max_body_bytes: int = MAX_BODY_BYTES,
                 job_ttl_s: float = 600.0, max_jobs: int = 4, renders: int = 2048,
                 sse_keepalive_s: float = SSE_KEEPALIVE_S, max_streams: int = MAX_CONNECTIONS):
        self.domain = domain
        self.auth = AuthInterceptor(tokens) if tokens else None
        self.static_dir = Path(static_dir) if static_dir is not None else WEBUI_DIR
        self.serving = serving or (lambda: bool(domain.registry.list_models(page_size=1).items))
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

    # -- registry views

    def model_json(self, m) -> dict:
        """A model as ``GET /api/models`` lists it."""
        summary = self.domain.describe_model(m)
        latest = summary.latest
        resolution = (m.config or {}).get("resolution")
        if resolution is None and latest is not None:
            resolution = self.domain.list_layers(f"{m.name}/{latest}").resolution
        return {"name": m.name, "arch": m.arch, "latest_version": latest, "resolution": resolution,
                "z_dim": (m.config or {}).get("z_dim"), "description": m.description,
                "aliases": {a.alias: a.version for a in summary.aliases}}

    def alias_json(self, state) -> dict:
        history = _pages(lambda size, token: self.domain.registry.alias_history(state.model, state.alias, size, token))
        return {"alias": state.alias, "version": state.version, "etag": state.etag, "updated": _time(state.updated_at),
                "history": [{"seq": e.seq, "from": e.from_version, "to": e.to_version, "author": e.author,
                             "time": _time(e.time), "reason": e.reason} for e in history]}


def _pages(fetch) -> list:
    items, token = [], ""
    while True:
        page = fetch(1000, token)
        items += page.items
        token = page.next_page_token
        if not token:
            return items


def _version_json(v, lineage: list[int]) -> dict:
    return {"number": v.number, "parent": v.parent, "lineage": lineage, "kind": v.kind, "author": v.author,
            "created": _time(v.created_at), "spec": v.spec or {}, "metrics": _json_metrics(v.metrics or {})}


def _host_name(host: str) -> str:
    """The name in a Host header: ``[::1]:8080`` → ``::1``, ``localhost:8080`` → ``localhost``."""
    if host.startswith("["):
        return host[1:host.index("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _progress_json(event: Event) -> dict | None:
    """A progress event as the editor's JSON (the stages gRPC streams); None for the others."""
    stage = convert.progress_stage(event)
    if stage is None:
        return None
    out = {"stage": stage, "step": event.done, "steps": event.total}
    if event.loss is not None:
        out["loss"] = event.loss
    return out


def _json_response(status: int, obj: Any, headers: dict | None = None) -> Response:
    """``obj`` as compact JSON (NaN and infinities as null), never cached."""
    data = json.dumps(_finite(obj), allow_nan=False, separators=(",", ":")).encode()
    return Response(data, status, {"Cache-Control": "no-store", **(headers or {})}, media_type="application/json")


def _error_response(exc: BaseException, headers: dict | None = None) -> Response:
    """The JSON error for ``exc`` (``error_body``), with ``WWW-Authenticate`` on 401 and ``Allow`` on 405."""
    status, body = error_body(exc)
    headers = dict(headers or {})
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="rulewright"'
    if isinstance(exc, MethodNotAllowed):
        headers["Allow"] = ", ".join(exc.allow)
    return _json_response(status, body, headers)


class _Handler:
    """One request's endpoints, on a thread of Starlette's pool: ``answer`` authorizes and runs the
    route's ``h_*`` method, which answers through ``_json`` / ``_send`` (or sets ``response``)."""

    def __init__(self, app: WebApp, request: Request):
        self.app = app
        self.request = request
        self.headers = request.headers
        self.query = parse_qs(request.scope["query_string"].decode("latin-1"), keep_blank_values=True)
        self.principal = "anonymous"
        self.close_connection = False    # set when the request's body is left unread: no request may follow it
        self.response: Response | None = None

    def answer(self, route: Route, params: dict[str, str]) -> Response:
        """The response to this request on ``route``, an error as JSON."""
        try:
            self.principal = self._authorize(route)
            getattr(self, "h_" + route.name)(**params)
        except Exception as exc:  # noqa: BLE001 -- every error becomes a JSON answer; the server keeps serving
            self._error(exc)
        return self.response

    # -- plumbing

    def _closing(self) -> dict:
        return {"Connection": "close"} if self.close_connection else {}

    def _send(self, status: int, ctype: str, data: bytes, headers: dict | None = None) -> None:
        self.response = Response(data, status, {**(headers or {}), **self._closing()}, media_type=ctype)

    def _json(self, status: int, obj: Any, headers: dict | None = None) -> None:
        self.response = _json_response(status, obj, {**(headers or {}), **self._closing()})

    def _error(self, exc: BaseException) -> None:
        self.response = _error_response(exc, self._closing())

    def _authorize(self, route: Route) -> str:
        """The principal for this request, after the host, origin and token checks."""
        host = self.headers.get("Host", "")
        if self.app.auth is None and host and not is_loopback(_host_name(host) + ":0"):
            # auth off means loopback only: a foreign Host is a browser tricked into calling us (DNS rebinding)
            raise PermissionDenied("HOST_REFUSED", f"Host {host!r} is not a loopback name; this server has auth "
                                                   "off and answers only http://127.0.0.1 or http://localhost")
        if route.method in ("POST", "PUT"):
            origin = self.headers.get("Origin")
            if origin is not None and urlsplit(origin).netloc != host:
                raise PermissionDenied("ORIGIN_REFUSED", f"cross-origin request from {origin!r} refused")
        if route.rpc is None or self.app.auth is None:
            return "anonymous"
        secret = None
        header = self.headers.get("Authorization")
        if header is not None:
            scheme, _, token = header.strip().partition(" ")
            secret = token.strip().encode() if scheme.lower() == "bearer" else b""
        elif self.query.get("token"):
            secret = self.query["token"][-1].encode()
        return self.app.auth.authorize(route.rpc, secret, missing=_MISSING_TOKEN).principal

    def _body(self) -> dict:
        """The JSON object of the request body (at most ``max_body_bytes``)."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True
            raise InvalidArgument("body", "send a Content-Length (chunked bodies are not accepted)")
        length = int(self.headers.get("Content-Length") or 0)      # h11 has refused one that is not a number
        if length > self.app.max_body_bytes:
            self.close_connection = True
            raise BodyTooLarge(f"request body of {length} bytes is over the limit of {self.app.max_body_bytes}",
                               limit=self.app.max_body_bytes)
        ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip().lower()
        if length and ctype != "application/json":
            raise InvalidArgument("body", f"Content-Type must be application/json, got {ctype or 'none'!r}")
        try:
            data = anyio.from_thread.run(self.request.body) if length else b""    # read on the event loop
        except ClientDisconnect:
            raise InvalidArgument("body", f"the connection closed before the {length} bytes came") from None
        if not data.strip():
            return {}
        try:
            body = json.loads(data, parse_constant=_refuse_constant)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidArgument("body", f"not valid JSON: {exc}") from None
        except RecursionError:                # the parser recurses per level: 1 MiB of '[' is too deep for it
            raise InvalidArgument("body", "JSON nested too deeply") from None
        if not isinstance(body, dict):
            raise InvalidArgument("body", f"must be a JSON object, got {type(body).__name__}")
        return body

    # -- static files

    def _static(self, path: Path, cache: str) -> None:
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        if ctype == "application/javascript":
            ctype = "text/javascript"
        if ctype.startswith("text/") or ctype.endswith(("+xml", "/json")):
            ctype += "; charset=utf-8"
        self._send(200, ctype, path.read_bytes(), {"Cache-Control": cache})

    def h_page(self) -> None:
        index = self.app.static_dir / "index.html"
        if not index.is_file():
            self._send(503, "text/plain; charset=utf-8", NOT_BUILT.encode(), {"Cache-Control": "no-store"})
            return
        self._static(index, "no-cache")

    def h_asset(self, path: str) -> None:
        root = (self.app.static_dir / "assets").resolve()
        parts = path.split("/")
        if "\\" in path or "\x00" in path or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
            raise RouteNotFound(f"no asset {path!r}")
        target = root.joinpath(*parts).resolve()
        if not target.is_relative_to(root) or not target.is_file():
            raise RouteNotFound(f"no asset {path!r}")
        hashed = re.search(r"[-.][A-Za-z0-9_-]{8,}\.[a-z0-9]+$", target.name) is not None
        self._static(target, "public, max-age=31536000, immutable" if hashed else "no-cache")

    def h_healthz(self) -> None:
        try:
            serving = bool(self.app.serving())
        except Exception:  # noqa: BLE001 -- a failing check reads as not serving
            serving = False
        self._json(200 if serving else 503, {"status": "SERVING" if serving else "NOT_SERVING"})

    # -- registry

    def h_models(self) -> None:
        models = _pages(lambda size, token: self.app.domain.registry.list_models(size, token))
        self._json(200, {"models": [self.app.model_json(m) for m in models]})

    def h_versions(self, model: str) -> None:
        registry = self.app.domain.registry
        versions = _pages(lambda size, token: registry.list_versions(model, size, token))
        chains = self.app.domain.lineages(versions)
        self._json(200, {"versions": [_version_json(v, chain) for v, chain in zip(versions, chains)],
                         "aliases": [self.app.alias_json(a) for a in registry.list_aliases(model)]})

    def h_set_alias(self, model: str, alias: str) -> None:
        body = self._body()
        unknown = set(body) - {"version", "expected_version", "etag", "reason"}
        if unknown:
            raise InvalidArgument("body", f"unknown fields {sorted(unknown)}")
        if "etag" in body and "expected_version" in body:
            raise InvalidArgument("etag", "give expected_version or etag, not both")
        if "etag" in body:
            expectation: dict[str, Any] = {"etag": _str(body, "etag", required=True)}
        elif "expected_version" in body:
            expectation = {"expected_version": _int(body, "expected_version", 0) or 0}
        else:
            raise InvalidArgument("expected_version", "state expected_version (null or 0 for a new alias) or etag")
        state = self.app.domain.set_alias(AliasRequest(model, alias, _required_int(body, "version"),
                                                       reason=_str(body, "reason", limit=1000), author=self.principal,
                                                       **expectation))
        self._json(200, self.app.alias_json(state))

    def h_rollback(self, model: str, alias: str) -> None:
        body = self._body()
        unknown = set(body) - {"etag", "reason"}
        if unknown:
            raise InvalidArgument("body", f"unknown fields {sorted(unknown)}")
        state = self.app.domain.rollback_alias(model, alias, etag=_str(body, "etag") or None,
                                               reason=_str(body, "reason", limit=1000), author=self.principal)
        self._json(200, self.app.alias_json(state))

    # -- generator

    @staticmethod
    def _version(version: str) -> int:
        if not version.isdigit() or not 1 <= int(version) <= _MAX_INT64:
            raise InvalidArgument("version", f"must be a version number, got {version!r}")
        return int(version)

    def h_layers(self, model: str, version: str) -> None:
        result = self.app.domain.list_layers(f"{model}/{self._version(version)}")
        self._json(200, {"model": result.version.model, "version": result.version.number,
                         "default_layer": result.default_layer, "image_resolution": result.resolution,
                         "z_dim": result.z_dim,
                         "layers": [{"name": i.name, "resolution": i.resolution, "in_channels": i.key_shape[0],
                                     "out_channels": i.value_shape[0], "key_shape": list(i.key_shape),
                                     "value_shape": list(i.value_shape), "linear": i.linear} for i in result.layers]})

    def h_image(self, model: str, version: str, seed: str) -> None:
        number = self._version(version)
        if not seed.isdigit() or int(seed) > _MAX_INT64:
            raise InvalidArgument("seed", f"must be an integer in [0, 2**63), got {seed!r}")
        layer = (self.query.get("layer") or [""])[-1] or None
        ablate = (self.query.get("ablate") or [""])[-1]
        interventions = []
        if ablate:
            try:
                units = [int(u) for u in ablate.split(",")]
            except ValueError:
                raise InvalidArgument("ablate", f"must be unit numbers separated by commas, got {ablate!r}") from None
            interventions = [Intervention(units=units)]
        with renamed({"interventions[0].units": "ablate", "interventions[0]": "ablate"}):
            result = self.app.domain.sample(SampleRequest(f"{model}/{number}", seeds=[int(seed)], layer=layer,
                                                          interventions=interventions))
        self._send(200, "image/png", png(result.images)[0], {"Cache-Control": "private, max-age=31536000, immutable"})

    def h_render(self, key: str) -> None:
        self._send(200, "image/png", self.app.renders.get(key), {"Cache-Control": "private, max-age=3600"})

    def h_search(self) -> None:
        body = self._body()
        unknown = set(body) - {"model", "version", "layer", "context", "seeds", "seed_range", "rank", "top",
                               "quantile", "truncation", "ridge", "stats"}
        if unknown:
            raise InvalidArgument("body", f"unknown fields {sorted(unknown)}")
        model, number, ref = _ref(body)
        context = body.get("context")
        limits = self.app.domain.limits
        if not isinstance(context, list) or not context:
            raise InvalidArgument("context", "give a list of at least one region")
        check_count(len(context), limits.max_regions, "context", "regions", "max_regions")   # before any mask is inflated
        for i, r in enumerate(context):
            check_region_json(limits, r, f"context[{i}]")
        regions = [Region.from_spec(r, f"context[{i}]") for i, r in enumerate(context)]
        if (body.get("seeds") is None) == (body.get("seed_range") is None):
            raise InvalidArgument("seeds", "give exactly one of seeds and seed_range")
        if body.get("seed_range") is not None:
            span = body["seed_range"]
            if (not isinstance(span, list) or len(span) != 2
                    or any(isinstance(x, bool) or not isinstance(x, int) for x in span)):
                raise InvalidArgument("seed_range", "must be [first, end) as two integers")
            if not 0 <= span[0] < span[1] <= _MAX_INT64:
                raise InvalidArgument("seed_range", f"needs 0 <= first < end, got {span}")
            seeds: range | list[int] = range(span[0], span[1])
        else:
            seeds = _int_list(body, "seeds", limits.max_search_seeds)
        samples, seed_start = _stats(body, "stats")
        options = {k: v for k in ("quantile", "truncation", "ridge") if (v := _float(body, k)) is not None}
        with renamed({"seeds": "seed_range.count"} if isinstance(seeds, range) else {}):
            result = self.app.domain.search(SearchRequest(
                ref, regions, seeds, layer=_str(body, "layer") or None, rank=_int(body, "rank", 1),
                top=_int(body, "top", 16), samples=samples, seed_start=seed_start, **options))
        self._json(200, {"model": result.version.model, "version": result.version.number, "layer": result.layer,
                         "threshold": result.threshold,
                         "matches": [{"seed": m.seed, "score": m.score, "above": m.above,
                                      "map_url": self.app.renders.put(heatmap_png(m.response, result.threshold,
                                                                                  result.resolution))}
                                     for m in result.matches]})

    def h_dissect(self) -> None:
        body = self._body()
        unknown = set(body) - {"model", "version", "layer", "region", "top", "rank_by", "quantile", "truncation",
                               "thresholds"}
        if unknown:
            raise InvalidArgument("body", f"unknown fields {sorted(unknown)}")
        model, number, ref = _ref(body)
        if body.get("region") is None:
            raise InvalidArgument("region", "is required (seed and mask or box)")
        check_region_json(self.app.domain.limits, body["region"], "region")
        region = Region.from_spec(body["region"], "region")
        samples, seed_start = _stats(body, "thresholds")
        options = {k: v for k in ("quantile", "truncation") if (v := _float(body, k)) is not None}
        with renamed({"regions[0]": "region"}):
            result = self.app.domain.dissect(DissectRequest(
                ref, [region], layer=_str(body, "layer") or None, rank_by=_str(body, "rank_by", "iou"),
                top=_int(body, "top", 8), samples=samples, seed_start=seed_start, include_maps=True, **options))
        thresholds = result.thresholds.tolist()
        maps = {unit: m for unit, _, m in result.maps}
        self._json(200, {"model": result.version.model, "version": result.version.number, "layer": result.layer,
                         "seed": region.seed,
                         "units": [{"unit": u.unit, "iou": u.iou, "contrast": u.contrast, "inside": u.inside,
                                    "outside": u.outside, "threshold": thresholds[u.unit],
                                    "map_url": self.app.renders.put(heatmap_png(maps[u.unit], thresholds[u.unit],
                                                                                result.resolution))
                                    if u.unit in maps else None} for u in result.units]})

    # -- rewrites

    def h_rewrite(self) -> None:
        body = self._body()
        unknown = set(body) - {"model", "version", "spec", "request_id", "dry_run", "preview_seeds"}
        if unknown:
            raise InvalidArgument("body", f"unknown fields {sorted(unknown)}")
        model, number, ref = _ref(body)
        if body.get("spec") is None:
            raise InvalidArgument("spec", "is required (an edit spec, as examples/edits/*.json)")
        domain = self.app.domain
        preview_seeds = _int_list(body, "preview_seeds", domain.limits.max_images)
        parent = domain.resolve(ref)
        call = RewriteRequest(f"{parent.model}/{parent.number}", body["spec"], author=self.principal,
                              request_id=_str(body, "request_id", limit=128) or None, dry_run=_bool(body, "dry_run"),
                              preview_seeds=preview_seeds)
        # The checks Domain.rewrite starts with, here too, so bad specs answer 400 rather than a failed job.
        call.check(domain.limits)
        domain.check_edit(call.spec, call.model)
        key = None
        if call.request_id and not call.dry_run:
            digest = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()
            key = (parent.model, call.request_id, digest)
        renders = self.app.renders

        def work(emit, should_stop) -> dict:
            def event(e: Event) -> None:
                if (data := _progress_json(e)) is not None:
                    emit(data)
            result = domain.rewrite(call, Progress(event, should_stop))
            out = {"model": parent.model, "parent": result.parent.number,
                   "version": result.version.number if result.version is not None else None,
                   "dry_run": result.version is None, "replayed": result.replayed,
                   "metrics": _json_metrics(result.edit.metrics or {}),
                   "found": (result.edit.spec or {}).get("found")}
            if result.previews is not None:
                out["previews"] = [{"seed": s, "url": renders.put(data)}
                                   for s, data in zip(preview_seeds, png(result.previews))]
            return out

        def on_error(exc: BaseException) -> tuple[str, dict]:
            _, err = error_body(exc)
            return (CANCELLED if err["error"]["code"] == "CANCELLED" else FAILED), err

        job, _ = self.app.jobs.start(work, on_error, key, info={"model": parent.model, "parent": parent.number})
        self._json(202, self._job_json(job), {"Location": f"/api/rewrites/{job.id}"})

    @staticmethod
    def _job_json(job) -> dict:
        out = {"job": job.id, "state": job.state, **job.info, "events_url": f"/api/rewrites/{job.id}/events",
               "cancel_url": f"/api/rewrites/{job.id}/cancel"}
        last = job.last()
        if last is not None:
            out[last[0]] = last[1].get("error", last[1]) if last[0] == "error" else last[1]
        return out

    def h_job(self, job: str) -> None:
        self._json(200, self._job_json(self.app.jobs.get(job)))

    def h_cancel(self, job: str) -> None:
        self._body()
        self._json(202, self._job_json(self.app.jobs.cancel(job)))

    def h_events(self, job: str) -> None:
        found = self.app.jobs.get(job)
        try:
            after = max(0, int(self.headers.get("Last-Event-ID") or 0))
        except ValueError:
            after = 0
        if found.done and after >= len(found.events):
            # a reconnect after the last event: 204 tells EventSource to stop reconnecting
            self._send(204, "text/plain", b"")
            return
        self.response = StreamingResponse(self._events(found, after), 200, {
            "Cache-Control": "no-store", "X-Accel-Buffering": "no", "Connection": "close"},
            media_type="text/event-stream; charset=utf-8")

    async def _events(self, found, after: int):
        """The event stream after event ``after``, until the job is done or the server stops; runs on
        the event loop and waits for news on a thread of ``stream_threads``."""
        yield b"retry: 2000\n\n"
        while True:
            events, finished = await anyio.to_thread.run_sync(found.wait, after, self.app.sse_keepalive_s,
                                                              abandon_on_cancel=True, limiter=self.app.stream_threads)
            chunk = b"".join(f"id: {i}\nevent: {name}\ndata: {json.dumps(_finite(data), allow_nan=False)}\n\n"
                             .encode() for i, name, data in events)
            if events:
                after = events[-1][0]
            yield chunk or b": keepalive\n\n"
            if finished:                      # the events came with the state, under one lock: nothing follows
                return


# ---- the ASGI application ----------------------------------------------------------------------

# Starlette's own refusals (no route, a method the route does not take) and any error outside an
# endpoint, as the JSON errors every endpoint answers.

async def _no_route(request: Request, exc: HTTPException) -> Response:
    return _error_response(RouteNotFound(f"no endpoint at {request.url.path}"))


async def _wrong_method(request: Request, exc: HTTPException) -> Response:
    allow = sorted((exc.headers or {}).get("Allow", "").split(", "))
    return _error_response(MethodNotAllowed(f"{request.method} {request.url.path} is not an endpoint "
                                            f"(allowed: {', '.join(allow)})", allow))


async def _internal(request: Request, exc: Exception) -> Response:
    return _error_response(exc)


class _RequestLog:
    """ASGI middleware around the routes: every answer gets the security headers, a method no
    endpoint knows answers 501, and each request ends with one JSON log line and its metrics."""

    def __init__(self, app: ASGIApp, web: WebApp):
        self.app = app
        self.web = web

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status = time.perf_counter(), 0

        async def answer(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), *_RAW_SECURITY_HEADERS]}
            await send(message)

        try:
            if scope["method"] in _METHODS:
                await self.app(scope, receive, answer)
            else:
                refusal = Refused(Code.UNIMPLEMENTED, "BAD_HTTP_REQUEST",
                                  f"method {scope['method']!r} is not supported", http_status=501)
                await _error_response(refusal)(scope, receive, answer)
        finally:
            seconds = time.perf_counter() - started
            name = scope.get(_ROUTE_NAME, "-")
            log.info("http", extra={"event": "http", "method": scope["method"], "route": name, "status": status,
                                    "ms": round(seconds * 1e3, 2)})
            metrics = self.web.domain.metrics
            if metrics is not None:           # route names are ours, so the labels stay bounded
                metrics.observe_http(name, status, seconds)


def asgi_app(web: WebApp) -> ASGIApp:
    """The editor's ASGI application: ``ROUTES`` on Starlette, inside ``_RequestLog``."""
    app = Starlette(routes=ROUTES, exception_handlers={404: _no_route, 405: _wrong_method, Exception: _internal})
    app.router.redirect_slashes = False     # /api/models/ is no endpoint (404), not a redirect
    app.state.web = web
    return _RequestLog(app, web)


# ---- the server ------------------------------------------------------------------------------

class _Connection(H11Protocol):
    """uvicorn's HTTP/1.1 connection with the bounds it leaves to a proxy in front.

    At most ``max_connections`` are open: one more is answered 503 at once and closed (uvicorn's
    own ``limit_concurrency`` answers only a request that arrives, in plain text, so silent
    connections would pile up). uvicorn's keep-alive timer (``timeout_keep_alive``) runs only
    between requests; here it also runs before the first request and while a request is half
    sent, so a silent client cannot hold a connection. A client that keeps sending a byte now and
    then (inside that timer) has ``request_timeout_s`` from the moment the server waits for a
    request (the connection opened, or the last answer went out) until the request's last body
    byte; then it gets 408 and the connection closes, so a slow drip cannot hold a slot either.
    A request h11 cannot parse is answered as JSON, like every other error.
    """

    def __init__(self, *args: Any, max_connections: int, request_timeout_s: float = REQUEST_TIMEOUT_S,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.max_connections = max_connections
        self.request_timeout_s = request_timeout_s
        self._request_deadline: Any = None        # asyncio.TimerHandle while the client owes a request

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.write(_BUSY)
            transport.close()                 # connection_lost takes it out of the count
            log.warning("web connection refused", extra={"event": "web_busy", "max_connections": self.max_connections})
            return
        self._await_client()

    def connection_lost(self, exc: Exception | None) -> None:
        self._end_request_deadline()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._await_client()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._await_client()                  # the next request (if the connection stays open) has its own deadline

    def _owes_bytes(self) -> bool:
        return not self.transport.is_closing() and self.conn.their_state in (h11.IDLE, h11.SEND_BODY)

    def _await_client(self) -> None:
        """While the client owes the next bytes: close the connection after ``timeout_keep_alive``
        without any, and answer 408 once the whole request has taken ``request_timeout_s``."""
        if not self._owes_bytes():
            self._end_request_deadline()      # the server's turn: the request is all here
            return
        if self.conn.their_state is h11.IDLE and not self.conn.trailing_data[0]:
            self._end_request_deadline()      # not a byte of the next request yet: its deadline starts now
        if self._request_deadline is None:
            self._request_deadline = self.loop.call_later(self.request_timeout_s, self._request_timed_out)
        if self.flow.read_paused:
            return                            # reading paused until the app catches up: not the client's silence
        self._unset_keepalive_if_required()
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.transport.close)

    def _end_request_deadline(self) -> None:
        if self._request_deadline is not None:
            self._request_deadline.cancel()
            self._request_deadline = None

    def _request_timed_out(self) -> None:
        """The request deadline passed: 408 (unless an answer has begun) and close."""
        self._request_deadline = None
        if not self._owes_bytes():
            return
        if self.flow.read_paused:             # the app is behind on the body, not the client: look again later
            self._request_deadline = self.loop.call_later(self.timeout_keep_alive, self._request_timed_out)
            return
        cycle = self.cycle if self.conn.their_state is h11.SEND_BODY else None
        if cycle is None or not cycle.response_started:
            if cycle is not None:
                cycle.disconnected = True     # the app's own answer, if it comes, goes nowhere
            self.transport.write(_raw_answer(
                "408 Request Timeout", "DEADLINE_EXCEEDED", "REQUEST_TIMEOUT",
                f"the request did not arrive whole within {self.request_timeout_s:g} s (server setting "
                "web_request_timeout_s)", web_request_timeout_s=f"{self.request_timeout_s:g}"))
        log.warning("web request timed out", extra={"event": "web_request_timeout",
                                                    "request_timeout_s": self.request_timeout_s})
        self.transport.close()                # connection_lost wakes the app's receive() with a disconnect

    def send_400_response(self, msg: str) -> None:
        _, body = error_body(Refused(Code.INVALID_ARGUMENT, "BAD_HTTP_REQUEST", msg, http_status=400))
        data = json.dumps(body).encode()
        headers = [*self.server_state.default_headers, (b"content-type", b"application/json"),
                   (b"content-length", str(len(data)).encode()), (b"connection", b"close"), *_RAW_SECURITY_HEADERS]
        for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=data),
                      h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        self.transport.close()


class WebServer:
    """The HTTP side on ``address`` (port 0: a free one; ``[::1]:port`` for IPv6): ``start()``,
    then ``port``, ``url`` and ``app``; ``stop()`` (also ``shutdown()``) stops it. ``options`` go
    to ``WebApp``.

    Like ``create_server``, it refuses a non-loopback address without tokens; binding and loading
    the TLS files happen in the constructor (``OSError`` naming the address when it is taken).
    """

    def __init__(self, domain, address: str = "127.0.0.1:0", tokens=None, static_dir: Path | str | None = None,
                 serving: Callable[[], bool] | None = None, tls: TlsFiles | None = None,
                 max_connections: int = MAX_CONNECTIONS, idle_timeout_s: float = IDLE_TIMEOUT_S,
                 request_timeout_s: float = REQUEST_TIMEOUT_S, **options: Any):
        check_auth_config(address, tokens)
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"web address must be host:port, got {address!r}")
        host = host.strip("[]") or "0.0.0.0"
        self.app = WebApp(domain, tokens=tokens, static_dir=static_dir, serving=serving, max_streams=max_connections,
                          **options)
        tls = tls if tls is not None and tls.enabled else None
        config = uvicorn.Config(
            asgi_app(self.app), interface="asgi3",
            http=functools.partial(_Connection, max_connections=max_connections, request_timeout_s=request_timeout_s),
            ws="none", lifespan="off", loop="asyncio", backlog=128, timeout_keep_alive=idle_timeout_s,
            proxy_headers=False, server_header=False,
            headers=[("Server", "rulewright")],
            # our own JSON line per request; uvicorn's loggers only for its warnings, through the root handler
            log_config=None, log_level=logging.WARNING, access_log=False,
            ssl_certfile=tls and tls.cert, ssl_keyfile=tls and tls.key, ssl_ca_certs=tls and tls.client_ca,
            ssl_cert_reqs=ssl.CERT_REQUIRED if tls and tls.client_ca else ssl.CERT_NONE)
        config.load()                         # here: a bad certificate or key fails the caller, not the thread
        self.socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self.socket.bind((host, int(port)))
        except OSError as exc:
            self.socket.close()
            raise OSError(f"could not bind web address {address}: {exc.strerror or exc}") from None
        self.address = address
        self.port = self.socket.getsockname()[1]
        bound = self.socket.getsockname()[0]
        self.url = f"{'https' if tls else 'http'}://{f'[{bound}]' if ':' in bound else bound}:{self.port}"
        # uvicorn off the main thread installs no signal handlers: SIGTERM stays the gRPC server's
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True,
                                       name="web")

    def start(self) -> "WebServer":
        """Serve on the thread; returns once uvicorn listens."""
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise RuntimeError(f"the web server on {self.address} did not start (see the log)")
            time.sleep(0.01)
        return self

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop accepting, cancel running jobs (they create nothing), end event streams, free the port;
        requests in flight have ``timeout`` seconds to finish."""
        self.server.config.timeout_graceful_shutdown = timeout     # read by uvicorn's shutdown, which follows
        self.server.should_exit = True
        self.app.jobs.close(timeout)          # also wakes every event stream, which then ends
        if self.thread.ident is None:
            self.socket.close()               # never started
        else:
            self.thread.join(timeout + 1.0)

    shutdown = stop

    def running_work(self) -> list[threading.Thread]:
        """The editor jobs' threads still running (after ``stop``: those its timeout did not see end)."""
        return self.app.jobs.running()


def create_web_server(domain, address: str = "127.0.0.1:0", **kw: Any) -> WebServer:
    """A started ``WebServer`` (see there for the arguments)."""
    return WebServer(domain, address, **kw).start()
