"""The HTTP side's lifecycle and connection limits: uvicorn on a thread of its own (the gRPC server
keeps the main thread and the signals) with its own port, its HTTP/1.1 connections bounded.

- ``create_web_server(domain, address, tokens=..., serving=..., tls=...) -> WebServer``: started;
  ``WebServer.stop()`` (also ``shutdown()``) stops it, cancels its running jobs and ends their
  event streams. ``tls`` (``tls.TlsFiles``, the gRPC server's PEM files) becomes uvicorn's
  certificate, key and client CA. Like ``create_server``, it refuses a non-loopback address
  without tokens (``auth.check_auth_config``).
- Connections (``Connection``, uvicorn's HTTP/1.1 protocol with three bounds added): at most
  ``max_connections`` open (more get 503 ``TOO_MANY_CONNECTIONS`` and are closed), one on which
  the client owes the next bytes (a request, the rest of one) is closed after ``idle_timeout_s``
  without any (uvicorn's keep-alive timeout, which alone covers only the time between requests),
  and a request whose headers and body have not all arrived ``request_timeout_s`` after the
  server began waiting for it is answered 408 ``REQUEST_TIMEOUT`` and closed (a client dripping
  a byte at a time cannot keep a slot). Requests h11 cannot parse are answered as JSON too.
"""

from __future__ import annotations

import functools
import json
import logging
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any, Callable

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from rulewright.service.errors import Code
from rulewright.service.server.auth import check_auth_config
from rulewright.service.server.tls import TlsFiles
from rulewright.service.server.web.app import asgi_app
from rulewright.service.server.web.context import MAX_CONNECTIONS, WebApp
from rulewright.service.server.web.errors import Refused, error_body
from rulewright.service.server.web.responses import RAW_SECURITY_HEADERS, raw_answer

log = logging.getLogger(__name__)

IDLE_TIMEOUT_S = 15.0              # a connection that sends nothing (or half a request) this long is closed
REQUEST_TIMEOUT_S = 30.0           # a whole request (headers and body) must arrive this soon once awaited
STOP_TIMEOUT_S = 5.0               # how long stop() lets requests in flight finish, by default
_BUSY = raw_answer("503 Service Unavailable", "RESOURCE_EXHAUSTED", "TOO_MANY_CONNECTIONS",
                   "too many open connections; retry", extra="Retry-After: 1\r\n")


class Connection(H11Protocol):
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
            self.transport.write(raw_answer(
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
                   (b"content-length", str(len(data)).encode()), (b"connection", b"close"), *RAW_SECURITY_HEADERS]
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
            http=functools.partial(Connection, max_connections=max_connections, request_timeout_s=request_timeout_s),
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
