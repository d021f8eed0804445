"""The HTTP side's server (uvicorn, service/server/web/) over real sockets: the connection cap's
JSON 503, idle and half-sent connections closed while slow endpoints are not cut off, endpoints
off the event loop, TLS and mutual TLS from the gRPC server's files, IPv6, a taken port, and
``stop()`` ending event streams and cancelling jobs."""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import threading
import time
from urllib.parse import urlsplit

import pytest

from rulewright.service.server.tls import TlsFiles
from rulewright.service.server.web import WebServer
from tests.builders import TINY_SPEC
from tests.certs import write_pki

from .conftest import events, request


def connect(server: WebServer) -> socket.socket:
    url = urlsplit(server.url)
    return socket.create_connection((url.hostname, url.port), timeout=5)


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """Whether the server closes ``sock`` within ``seconds`` (whatever it answered before)."""
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    except OSError:
        pass
    return True


def test_a_connection_over_the_cap_gets_a_json_503_and_is_closed(web_server):
    server = web_server(max_connections=2)
    held = [connect(server) for _ in range(2)]
    try:
        time.sleep(0.2)
        extra = connect(server)
        extra.settimeout(5)
        head, _, body = extra.recv(4096).partition(b"\r\n\r\n")
        lines = head.decode().split("\r\n")
        headers = dict(line.split(": ", 1) for line in lines[1:])
        assert lines[0] == "HTTP/1.1 503 Service Unavailable" and headers["Retry-After"] == "1"
        error = json.loads(body)["error"]
        assert (error["code"], error["reason"]) == ("RESOURCE_EXHAUSTED", "TOO_MANY_CONNECTIONS")
        assert closed_within(extra, 2)
        extra.close()
    finally:
        for s in held:
            s.close()
    deadline = time.monotonic() + 5         # the held ones are gone: their places are free again
    while request(server.url, "GET", "/healthz").status == 503 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert request(server.url, "GET", "/healthz").status == 200


def test_silent_half_sent_and_idle_keep_alive_connections_are_closed(web_server):
    server = web_server(idle_timeout_s=0.5)
    silent = connect(server)
    half_head = connect(server)
    half_head.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    half_body = connect(server)
    half_body.sendall(b"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                      b"Content-Length: 100\r\n\r\n{\"model\":")
    for sock in (silent, half_head, half_body):
        assert closed_within(sock, 3)
        sock.close()

    url = urlsplit(server.url)
    conn = http.client.HTTPConnection(url.hostname, url.port, timeout=5)
    try:
        for _ in range(3):                  # keep-alive: requests within the timeout share the connection
            conn.request("GET", "/healthz")
            assert conn.getresponse().read() == b'{"status":"SERVING"}'
            time.sleep(0.2)
        assert closed_within(conn.sock, 3)  # then, idle, it is closed
    finally:
        conn.close()


def test_a_slow_endpoint_is_not_cut_off_by_the_idle_timeout_nor_holds_up_others(web_server):
    def slow() -> bool:
        time.sleep(1.5)
        return True

    server = web_server(idle_timeout_s=0.5, serving=slow)
    out = []
    thread = threading.Thread(target=lambda: out.append(request(server.url, "GET", "/healthz")))
    thread.start()
    time.sleep(0.2)
    started = time.monotonic()
    assert request(server.url, "GET", "/api/renders/gone.png").status == 404    # served meanwhile
    assert time.monotonic() - started < 1.2
    thread.join()
    assert (out[0].status, out[0].json()) == (200, {"status": "SERVING"})


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return write_pki(tmp_path_factory.mktemp("pki"))


def https(server: WebServer, context: ssl.SSLContext) -> int:
    conn = http.client.HTTPSConnection("localhost", server.port, context=context, timeout=10)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status
    finally:
        conn.close()


def test_tls_and_mutual_tls_from_the_grpc_servers_files(web_server, pki):
    server = web_server(tls=TlsFiles(str(pki.server_cert), str(pki.server_key)))
    assert server.url.startswith("https://")
    trusting = ssl.create_default_context(cafile=str(pki.ca))
    assert https(server, trusting) == 200
    with pytest.raises(ssl.SSLError):
        https(server, ssl.create_default_context(cafile=str(pki.other_ca)))
    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        request(server.url.replace("https://", "http://"), "GET", "/healthz", timeout=5)

    mutual = web_server(tls=TlsFiles(str(pki.server_cert), str(pki.server_key), str(pki.ca)))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        https(mutual, trusting)                                   # no client certificate
    client = ssl.create_default_context(cafile=str(pki.ca))
    client.load_cert_chain(str(pki.client_cert), str(pki.client_key))
    assert https(mutual, client) == 200
    foreign = ssl.create_default_context(cafile=str(pki.ca))
    foreign.load_cert_chain(str(pki.other_client_cert), str(pki.other_client_key))
    with pytest.raises((ssl.SSLError, ConnectionError)):
        https(mutual, foreign)


def test_ipv6_loopback(tiny):
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        if os.environ.get("CI"):       # CI's machine has one: its absence there is a failure, not a pass
            pytest.fail("no IPv6 loopback on this machine")
        pytest.skip("no IPv6 loopback on this machine")
    server = WebServer(tiny, "[::1]:0").start()
    try:
        assert server.url == f"http://[::1]:{server.port}" and server.port > 0
        assert request(server.url, "GET", "/healthz").json() == {"status": "SERVING"}
    finally:
        server.stop()


def test_a_taken_port_is_an_oserror_naming_the_address(web_server, tiny):
    taken = f"127.0.0.1:{web_server().port}"
    with pytest.raises(OSError, match=f"could not bind web address {taken}"):
        WebServer(tiny, taken)


def test_stop_ends_event_streams_and_cancels_running_jobs(web_server, tiny):
    server = web_server()
    job = request(server.url, "POST", "/api/rewrites", {"model": "tiny", "version": 1,
                                                        "spec": {**TINY_SPEC, "steps": 100_000}}).json()
    seen = threading.Event()
    stream: list = []

    def on_event(name, data):
        if name == "progress" and data["stage"] == "optimize":
            seen.set()

    reader = threading.Thread(target=lambda: stream.extend(events(server.url, job["events_url"], on_event=on_event)))
    reader.start()
    assert seen.wait(60)
    started = time.monotonic()
    server.stop()
    reader.join(10)
    assert not reader.is_alive() and time.monotonic() - started < 8
    assert stream and {name for _, name, _ in stream} <= {"progress", "error"}   # the error, if in time: CANCELLED
    state = server.app.jobs.get(job["job"])
    assert state.done and state.state == "cancelled"
    assert [v.number for v in tiny.registry.list_versions("tiny").items] == [1]
    with pytest.raises(OSError):
        request(server.url, "GET", "/healthz", timeout=2)
