"""The HTTP side of the server: the editor page and its small JSON API (``docs/web-api.md``), a
Starlette application served by uvicorn; a second transport over the same ``Domain`` as gRPC.

- ``server``: lifecycle and connection limits (``WebServer``, ``create_web_server``).
- ``app``: the routes (``ROUTES``, each with the gRPC method whose role it needs) and the
  middleware that adds the security headers and logs each request.
- ``context``: what endpoints share (``WebApp``) and one request (``Call``: auth with the same
  tokens and roles as gRPC, from ``Authorization: Bearer`` or ``?token=``; with auth off, a
  loopback ``Host`` only and no cross-site writes; the JSON body, at most ``max_body_bytes``).
- ``schemas``: JSON bodies as the domain's typed requests; ``endpoints``: one small function per
  route, calling ``Domain``; ``views``: JSON rendered from the domain's typed results.
- ``oip``: the Open Inference Protocol's REST binding (KServe v2, ``/v2``: health, metadata,
  the model configuration, infer), sharing ``oip_model`` with gRPC ``GRPCInferenceService``.
- ``render``: PNGs (the bytes gRPC returns), heatmaps, and the LRU of computed images;
  ``rewrites``: rewrites as background jobs; ``events``: their server-sent events.
- ``errors``: the HTTP side's refusals and ``error_body``, the one exception → JSON error mapping
  (through the ``ERROR_TABLE`` gRPC uses).
- Static files: ``GET /`` and ``/assets/*`` from ``service/server/webui/`` (built by ``make web``;
  missing: 503 ``the editor is not built: run make web``); nothing outside ``assets/`` is served.
"""

from rulewright.service.server.web.app import ROUTES, Route, asgi_app
from rulewright.service.server.web.context import WebApp
from rulewright.service.server.web.errors import HTTP_STATUS, error_body
from rulewright.service.server.web.render import Renders, heatmap_png, png
from rulewright.service.server.web.server import WebServer, create_web_server

__all__ = ["HTTP_STATUS", "ROUTES", "Renders", "Route", "WebApp", "WebServer", "asgi_app", "create_web_server",
           "error_body", "heatmap_png", "png"]
