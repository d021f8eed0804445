"""The endpoints: each maps its request to the domain's typed request (``schemas``), calls the
``Domain`` method every transport calls, and renders the typed result (``views``)."""

from __future__ import annotations

import mimetypes
import re
from pathlib import Path
from typing import Callable

from starlette.responses import Response

from rulewright.service.server import convert
from rulewright.service.server.errors import renamed
from rulewright.service.server.web import events as sse
from rulewright.service.server.web import rewrites, schemas, views
from rulewright.service.server.web.context import Call
from rulewright.service.server.web.errors import RouteNotFound
from rulewright.service.server.web.render import png

NOT_BUILT = "the editor is not built: run make web\n"
_HASHED = re.compile(r"[-.][A-Za-z0-9_-]{8,}\.[a-z0-9]+$")     # a bundler's content hash: cached for good


def _every(fetch: Callable) -> list:
    """Every item of a paged listing (``fetch(page_size, page_token)``)."""
    items, token = [], ""
    while True:
        page = fetch(1000, token)
        items += page.items
        token = page.next_page_token
        if not token:
            return items


def _alias(call: Call, state) -> dict:
    history = _every(lambda size, token: call.domain.alias_history(state.model, state.alias, size, token))
    return views.alias(state, history)


def _resolution(call: Call, summary) -> int | None:
    """A model's image size: from its config, else from its newest version's layers."""
    resolution = (summary.model.config or {}).get("resolution")
    if resolution is None and summary.latest is not None:
        resolution = call.domain.list_layers(f"{summary.model.name}/{summary.latest}").resolution
    return resolution


# ---- static files ----------------------------------------------------------------------------

def _static(call: Call, path: Path, cache: str) -> Response:
    ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
    if ctype == "application/javascript":
        ctype = "text/javascript"
    if ctype.startswith("text/") or ctype.endswith(("+xml", "/json")):
        ctype += "; charset=utf-8"
    return call.send(200, ctype, path.read_bytes(), {"Cache-Control": cache})


def page(call: Call) -> Response:
    """``GET /``: the editor (503 until ``make web`` built it)."""
    index = call.web.static_dir / "index.html"
    if not index.is_file():
        return call.send(503, "text/plain; charset=utf-8", NOT_BUILT.encode(), {"Cache-Control": "no-store"})
    return _static(call, index, "no-cache")


def asset(call: Call, path: str) -> Response:
    """``GET /assets/{path}``: a file of the built editor; nothing outside ``assets/``."""
    root = (call.web.static_dir / "assets").resolve()
    parts = path.split("/")
    if "\\" in path or "\x00" in path or any(p in ("", ".", "..") or p.startswith(".") for p in parts):
        raise RouteNotFound(f"no asset {path!r}")
    target = root.joinpath(*parts).resolve()
    if not target.is_relative_to(root) or not target.is_file():
        raise RouteNotFound(f"no asset {path!r}")
    return _static(call, target, "public, max-age=31536000, immutable" if _HASHED.search(target.name) else "no-cache")


# The tab's icon: a lens over a grid, the editor's two halves (search and rewrite); small enough to
# live here, so a page without a build still has one.
FAVICON = (b'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 16 16">'
           b'<rect width="16" height="16" rx="3" fill="#1d2330"/>'
           b'<path d="M3 4h6M3 7h4M3 10h6" stroke="#8aa4d6" stroke-width="1.4"/>'
           b'<circle cx="11" cy="10" r="3" fill="none" stroke="#f2c14e" stroke-width="1.6"/></svg>')


def favicon(call: Call) -> Response:
    """``GET /favicon.ico``: the editor's icon (SVG), so browsers stop asking for a missing one."""
    return call.send(200, "image/svg+xml", FAVICON, {"Cache-Control": "public, max-age=86400"})


def healthz(call: Call) -> Response:
    """``GET /healthz``: 200 SERVING or 503 NOT_SERVING, as the server's serving check says."""
    try:
        serving = bool(call.web.serving())
    except Exception:  # noqa: BLE001 -- a failing check reads as not serving
        serving = False
    return call.json(200 if serving else 503, {"status": "SERVING" if serving else "NOT_SERVING"})


# ---- registry --------------------------------------------------------------------------------

def models(call: Call) -> Response:
    """``GET /api/models``: every model with its aliases, newest version and image size, and the alias
    a bare model name means (``default_alias``), the version the editor opens first."""
    summaries = _every(call.domain.list_models)
    return call.json(200, {"models": [views.model(s, _resolution(call, s)) for s in summaries],
                           "default_alias": call.domain.default_alias})


def versions(call: Call, model: str) -> Response:
    """``GET /api/models/{model}/versions``: every version with its lineage, every alias with its history."""
    found = _every(lambda size, token: call.domain.list_versions(model, size, token))
    return call.json(200, {"versions": [views.version(v) for v in found],
                           "aliases": [_alias(call, a) for a in call.domain.list_aliases(model)]})


def set_alias(call: Call, model: str, alias: str) -> Response:
    """``PUT .../aliases/{alias}``: compare-and-set an alias."""
    state = call.domain.set_alias(schemas.alias_request(model, alias, call.body(), call.principal))
    return call.json(200, _alias(call, state))


def rollback(call: Call, model: str, alias: str) -> Response:
    """``POST .../aliases/{alias}/rollback``: the alias back where its latest move came from."""
    state = call.domain.rollback_alias(model, alias, author=call.principal, **schemas.rollback_args(call.body()))
    return call.json(200, _alias(call, state))


# ---- generator -------------------------------------------------------------------------------

def layers(call: Call, model: str, version: str) -> Response:
    """``GET .../versions/{version}/layers``."""
    return call.json(200, views.layers(call.domain.list_layers(schemas.path_version(model, version))))


def image(call: Call, model: str, version: str, seed: str) -> Response:
    """``GET .../images/{seed}.png``: the PNG gRPC Sample returns (``?ablate=``: units zeroed;
    ``?strength=``: the version's own edit at that strength, echoed in ``X-Rulewright-Strength``)."""
    request = schemas.sample_request(model, version, seed, call.query)
    with renamed(schemas.ABLATE_FIELDS):
        result = call.domain.sample(request)
    strength = {} if result.strength is None else {"X-Rulewright-Strength": repr(result.strength)}
    return call.send(200, "image/png", png(result.images)[0],
                     {"Cache-Control": "private, max-age=31536000, immutable", **strength})


def render(call: Call, key: str) -> Response:
    """``GET /api/renders/{key}.png``: a computed image (heatmap, preview)."""
    return call.send(200, "image/png", call.web.renders.get(key), {"Cache-Control": "private, max-age=3600"})


def search(call: Call) -> Response:
    """``POST /api/search``: the best matches of a context, with heatmaps."""
    request = schemas.search_request(call.body(), call.domain.limits)
    with renamed(schemas.SEED_RANGE_FIELDS if isinstance(request.seeds, range) else {}):
        result = call.domain.search(request)
    return call.json(200, views.search(result, call.web.renders))


def dissect(call: Call) -> Response:
    """``POST /api/dissect``: a region's units, with heatmaps."""
    request = schemas.dissect_request(call.body(), call.domain.limits)
    with renamed(schemas.DISSECT_FIELDS):
        result = call.domain.dissect(request)
    return call.json(200, views.dissect(result, request.regions[0].seed, call.web.renders))


# ---- rewrites --------------------------------------------------------------------------------

def rewrite(call: Call) -> Response:
    """``POST /api/rewrites``: a rewrite job (202), once its request, version and spec are accepted."""
    body = call.body()
    request = convert.rewrite_request_json(body, call.principal, call.domain.limits)   # as gRPC reads it
    job = rewrites.start(call.web, request, body, request.model.model, request.model.number)
    return call.json(202, views.job(job), {"Location": f"/api/rewrites/{job.id}"})


def job(call: Call, job: str) -> Response:
    """``GET /api/rewrites/{job}``: its state, and its outcome once done."""
    return call.json(200, views.job(call.web.jobs.get(job)))


def cancel(call: Call, job: str) -> Response:
    """``POST /api/rewrites/{job}/cancel``: stop it (creates nothing); idempotent."""
    call.body()
    return call.json(202, views.job(call.web.jobs.cancel(job)))


def events(call: Call, job: str) -> Response:
    """``GET /api/rewrites/{job}/events``: its events as server-sent events (204 once all were seen)."""
    found, after = call.web.jobs.get(job), sse.last_event_id(call.headers)
    if sse.replay_over(found, after):
        return call.send(204, "text/plain", b"")   # a reconnect after the last event: EventSource stops
    return sse.response(call.web, found, after)
