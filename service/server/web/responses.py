"""Answers as bytes: compact JSON (NaN and infinities as null), JSON errors with their headers, the
security headers every answer carries, and whole raw answers for a socket outside any request."""

from __future__ import annotations

import json
import math
from typing import Any

from starlette.responses import Response

from rulewright.service.server.web.errors import MethodNotAllowed, error_body

SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY"}
RAW_SECURITY_HEADERS = [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]


def finite(value: Any) -> Any:
    """JSON-safe: NaN and infinities (which browsers' JSON.parse refuses) become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def json_bytes(obj: Any) -> bytes:
    """``obj`` as compact JSON, NaN and infinities as null."""
    return json.dumps(finite(obj), allow_nan=False, separators=(",", ":")).encode()


def json_response(status: int, obj: Any, headers: dict | None = None) -> Response:
    """``obj`` as compact JSON, never cached."""
    return Response(json_bytes(obj), status, {"Cache-Control": "no-store", **(headers or {})},
                    media_type="application/json")


def error_response(exc: BaseException, headers: dict | None = None, plain: bool = False) -> Response:
    """The JSON error for ``exc`` (``error_body``), with ``WWW-Authenticate`` on 401 and ``Allow`` on 405;
    ``plain``: KServe's REST form, ``{"error": "<message>"}``, with the same status and headers."""
    status, body = error_body(exc)
    if plain:
        body = {"error": body["error"]["message"]}
    headers = dict(headers or {})
    if status == 401:
        headers["WWW-Authenticate"] = 'Bearer realm="rulewright"'
    if isinstance(exc, MethodNotAllowed):
        headers["Allow"] = ", ".join(exc.allow)
    return json_response(status, body, headers)


def raw_answer(status: str, code: str, reason: str, message: str, extra: str = "", **metadata: str) -> bytes:
    """A whole HTTP/1.1 JSON error answer, written to a socket as is (outside any request's cycle)."""
    body = json.dumps({"error": {"code": code, "message": message, "reason": reason, "domain": "rulewright.dev",
                                 "metadata": metadata, "field_violations": []}}).encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n{extra}Connection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body
