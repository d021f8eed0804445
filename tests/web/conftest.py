"""The HTTP side (service/server/web/) on a free loopback port over the tiny random DCGAN, and a
small HTTP client for the tests (``http.client``: real sockets, no test client in between).

- ``tiny``: a Domain with model ``tiny`` (32×32, z 16, rewritable ``main.6``), version 1 aliased
  ``production``.
- ``web``: ``(base_url, domain)``, the HTTP side without auth.
- ``web_server``: a factory ``(**options) -> WebServer`` over the same domain (tokens, a static
  folder, health), stopped after the test.
- ``faces_web``: ``(base_url, domain)`` over the real faces model (64×64).
"""

from __future__ import annotations

import http.client
import json
from urllib.parse import urlsplit

import pytest

from tests.builders import tiny_domain


@pytest.fixture
def tiny(tmp_path):
    domain = tiny_domain(tmp_path)
    yield domain
    domain.close()


@pytest.fixture
def web_server(tiny):
    from rulewright.service.server.web import WebServer

    servers = []

    def make(**options):
        server = WebServer(tiny, "127.0.0.1:0", **options).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def web(web_server, tiny):
    return web_server().url, tiny


@pytest.fixture(scope="module")
def faces_web(tmp_path_factory, faces_path):
    from rulewright.service.domain.core import Domain
    from rulewright.service.server.web import WebServer

    domain = Domain.open(tmp_path_factory.mktemp("faces-web"), device="cpu")
    domain.bootstrap("faces", faces_path)
    server = WebServer(domain, "127.0.0.1:0").start()
    yield server.url, domain
    server.stop()
    domain.close()


class Response:
    def __init__(self, status: int, headers, data: bytes):
        self.status, self.headers, self.data = status, headers, data

    def json(self):
        return json.loads(self.data)

    @property
    def error(self) -> dict:
        return self.json()["error"]

    def violations(self) -> dict[str, str]:
        return {v["field"]: v["description"] for v in self.error["field_violations"]}

    def __repr__(self) -> str:
        return f"Response({self.status}, {self.data[:300]!r})"


def request(base: str, method: str, path: str, body=None, headers: dict | None = None, raw: bytes | None = None,
            timeout: float = 60) -> Response:
    """One request on a fresh connection; ``body`` is sent as JSON, ``raw`` as is."""
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    try:
        headers = dict(headers or {})
        data = raw
        if body is not None:
            data = json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return Response(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


def events(base: str, path: str, headers: dict | None = None, on_event=None, timeout: float = 120) -> list:
    """The server-sent events of ``path`` as (id, event, data) until the server ends the stream.

    ``on_event(event, data)`` is called as each arrives (e.g. to cancel the job mid-stream).
    """
    url = urlsplit(base)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        if resp.status != 200:
            return [("status", resp.status, resp.read())]
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        out, block = [], {}
        while True:
            line = resp.readline()
            if not line:
                break
            line = line.decode().rstrip("\n")
            if line == "":
                if "event" in block:
                    item = (int(block["id"]), block["event"], json.loads(block["data"]))
                    out.append(item)
                    if on_event is not None:
                        on_event(item[1], item[2])
                block = {}
            elif not line.startswith(":"):
                key, _, value = line.partition(": ")
                block[key] = value
        return out
    finally:
        conn.close()
