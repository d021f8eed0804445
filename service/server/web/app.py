"""The ASGI application: ``ROUTES`` on Starlette inside ``RequestLog``.

Each ``Route`` names its endpoint and the gRPC method whose role it needs (``Route.rpc``,
``auth.METHOD_ROLES``); no route, a method the route does not take (405 with ``Allow``) and a
method no endpoint knows (501) answer JSON errors. The Open Inference Protocol's REST routes
(``/v2``, ``web/oip``) answer errors in KServe's form, ``{"error": "<message>"}``. ``RequestLog`` adds the security headers to
every answer and logs one JSON line (and the metrics) per request.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

from starlette import routing
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rulewright.service.errors import Code
from rulewright.service.server.web import endpoints as e, oip as o
from rulewright.service.server.web.context import Call, WebApp
from rulewright.service.server.web.errors import MethodNotAllowed, Refused, RouteNotFound
from rulewright.service.server.web.responses import RAW_SECURITY_HEADERS, error_response

log = logging.getLogger(__name__)

_GEN = "/rulewright.v1.GeneratorService/"
_REG = "/rulewright.v1.RegistryService/"
_METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"}   # others: 501; these on a wrong path: 405
ROUTE_NAME = "rulewright.route"   # scope key: the endpoint that answered, for the log line and the metrics


class Route(routing.Route):
    """One endpoint: its HTTP method and path, the function that answers it (its name is the
    route's), and the gRPC method whose role it needs (``rpc``; None: public). ``plain_errors``:
    errors in KServe's form (``{"error": "<message>"}``) instead of the structured one."""

    def __init__(self, method: str, path: str, endpoint: Callable[..., Response], rpc: str | None,
                 plain_errors: bool = False):
        super().__init__(path, self._serve, methods=[method], name=endpoint.__name__)
        self.methods = {method}        # not Starlette's implicit HEAD: a path takes its one method (405, Allow)
        self.method = method
        self.endpoint = endpoint
        self.rpc = rpc
        self.plain_errors = plain_errors

    async def _serve(self, request: Request) -> Response:
        request.scope[ROUTE_NAME] = self.name
        call = Call(request.app.state.web, request)
        return await run_in_threadpool(call.answer, self, request.path_params)


_M = "/api/models/{model}"
_V = _M + "/versions/{version}"
_J = "/api/rewrites/{job}"
_OIP = "/inference.GRPCInferenceService/"       # the OIP routes need the roles of the gRPC methods they mirror
_V2M = "/v2/models/{model}"
_V2V = _V2M + "/versions/{version}"
ROUTES = [
    Route("GET", "/", e.page, None),
    Route("GET", "/index.html", e.page, None),
    Route("GET", "/assets/{path:path}", e.asset, None),
    Route("GET", "/healthz", e.healthz, None),
    Route("GET", "/favicon.ico", e.favicon, None),
    Route("GET", "/api/models", e.models, _REG + "ListModels"),
    Route("GET", _M + "/versions", e.versions, _REG + "ListVersions"),
    Route("GET", _V + "/layers", e.layers, _GEN + "ListLayers"),
    Route("GET", _V + "/images/{seed}.png", e.image, _GEN + "Sample"),
    Route("GET", "/api/renders/{key}.png", e.render, _GEN + "Sample"),
    Route("POST", "/api/search", e.search, _GEN + "SearchContext"),
    Route("POST", "/api/dissect", e.dissect, _GEN + "Dissect"),
    Route("POST", "/api/rewrites", e.rewrite, _GEN + "Rewrite"),
    Route("GET", _J, e.job, _GEN + "Rewrite"),
    Route("GET", _J + "/events", e.events, _GEN + "Rewrite"),
    Route("POST", _J + "/cancel", e.cancel, _GEN + "Rewrite"),
    Route("PUT", _M + "/aliases/{alias}", e.set_alias, _REG + "SetAlias"),
    Route("POST", _M + "/aliases/{alias}/rollback", e.rollback, _REG + "RollbackAlias"),
    Route("GET", "/v2/health/live", o.v2_live, None, plain_errors=True),
    Route("GET", "/v2/health/ready", o.v2_ready, None, plain_errors=True),
    Route("GET", "/v2", o.v2_server_metadata, _OIP + "ServerMetadata", plain_errors=True),
    *(route for base in (_V2M, _V2V) for route in (
        Route("GET", base, o.v2_model_metadata, _OIP + "ModelMetadata", plain_errors=True),
        Route("GET", base + "/ready", o.v2_model_ready, _OIP + "ModelReady", plain_errors=True),
        Route("GET", base + "/config", o.v2_model_config, _OIP + "ModelMetadata", plain_errors=True),
        Route("POST", base + "/infer", o.v2_infer, _OIP + "ModelInfer", plain_errors=True))),
]


# Starlette's own refusals (no route, a method the route does not take) and any error outside an
# endpoint, as the JSON errors every endpoint answers.

def _v2(request: Request) -> bool:
    """Whether the path is under the Open Inference Protocol's ``/v2``, whose errors are KServe's."""
    return request.url.path == "/v2" or request.url.path.startswith("/v2/")


async def _no_route(request: Request, exc: HTTPException) -> Response:
    request.scope[ROUTE_NAME] = "not_found"          # the log and metrics name what answered
    return error_response(RouteNotFound(f"no endpoint at {request.url.path}"), plain=_v2(request))


async def _wrong_method(request: Request, exc: HTTPException) -> Response:
    request.scope[ROUTE_NAME] = "method_not_allowed"
    allow = sorted((exc.headers or {}).get("Allow", "").split(", "))
    return error_response(MethodNotAllowed(f"{request.method} {request.url.path} is not an endpoint "
                                           f"(allowed: {', '.join(allow)})", allow), plain=_v2(request))


async def _internal(request: Request, exc: Exception) -> Response:
    return error_response(exc)


class RequestLog:
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
                message = {**message, "headers": [*message.get("headers", ()), *RAW_SECURITY_HEADERS]}
            await send(message)

        try:
            if scope["method"] in _METHODS:
                await self.app(scope, receive, answer)
            else:
                scope[ROUTE_NAME] = "method_not_supported"
                refusal = Refused(Code.UNIMPLEMENTED, "BAD_HTTP_REQUEST",
                                  f"method {scope['method']!r} is not supported", http_status=501)
                await error_response(refusal)(scope, receive, answer)
        finally:
            self._record(scope, status, time.perf_counter() - started)

    def _record(self, scope: Scope, status: int, seconds: float) -> None:
        name = scope.get(ROUTE_NAME, "-")
        log.info("http", extra={"event": "http", "method": scope["method"], "route": name, "status": status,
                                "ms": round(seconds * 1e3, 2)})
        metrics = self.web.domain.metrics
        if metrics is not None:           # route names are ours, so the labels stay bounded
            metrics.observe_http(name, status, seconds)


def asgi_app(web: WebApp) -> ASGIApp:
    """The editor's ASGI application: ``ROUTES`` on Starlette, inside ``RequestLog``."""
    app = Starlette(routes=ROUTES, exception_handlers={404: _no_route, 405: _wrong_method, Exception: _internal})
    app.router.redirect_slashes = False     # /api/models/ is no endpoint (404), not a redirect
    app.state.web = web
    return RequestLog(app, web)
