"""The HTTP side's bounds: request caps, deep JSON, OPTIONS and unknown
methods, and a bounded number of connections with an idle timeout, over real sockets."""

from __future__ import annotations

import base64
import select
import socket
import threading
import time
import zlib
from urllib.parse import urlsplit

import pytest

from rulewright.service.domain.requests import RewriteRequest
from rulewright.service.engine.errors import InvalidArgument

from .conftest import request

BOX = [8, 8, 16, 16]


def test_oversized_requests_are_refused_naming_field_and_setting(web):
    base, _ = web
    r = request(base, "POST", "/api/search", {"model": "tiny", "version": 1, "context": [{"seed": 0, "box": BOX}],
                                              "seed_range": [0, 10**9]})
    assert r.status == 400 and "max_search_seeds" in r.violations()["seed_range.count"]
    r = request(base, "POST", "/api/search", {"model": "tiny", "version": 1,
                                              "context": [{"seed": i, "box": BOX} for i in range(65)], "seeds": [1]})
    assert r.status == 400 and "max_regions" in r.violations()["context"]
    bomb = {"encoding": "zlib-base64-u8", "size": [32, 32],
            "data": base64.b64encode(zlib.compress(b"\1" * (64 << 20))).decode()}     # 64 MiB in a ~64 KiB body
    r = request(base, "POST", "/api/dissect", {"model": "tiny", "version": 1, "region": {"seed": 0, "mask": bomb}})
    assert r.status == 400 and "region.mask" in r.violations()
    huge = {"encoding": "zlib-base64-u8", "size": [5000, 5000], "data": ""}
    r = request(base, "POST", "/api/dissect", {"model": "tiny", "version": 1, "region": {"seed": 0, "mask": huge}})
    assert r.status == 400 and "max_mask_pixels" in r.violations()["region.mask"]
    r = request(base, "POST", "/api/dissect", {"model": "tiny", "version": 1, "region": {"seed": 0, "box": BOX},
                                               "thresholds": {"samples": 10**7}})
    assert r.status == 400 and "max_stats_samples" in r.violations()["thresholds.samples"]
    spec = {"copy": {"seed": 1, "box": BOX}, "paste": [{"seed": 2, "box": BOX}]}
    r = request(base, "POST", "/api/rewrites", {"model": "tiny", "version": 1,
                                                "spec": {**spec, "search": {"candidates": 10**6}}})
    assert r.status == 400 and "max_search_seeds" in r.violations()["spec.search.candidates"]
    r = request(base, "POST", "/api/rewrites", {"model": "tiny", "version": 1,
                                                "spec": {**spec, "found": [{"seed": i, "box": BOX} for i in range(70)]}})
    assert r.status == 400 and "max_regions" in r.violations()["spec.found"]    # the list that crosses the cap
    assert request(base, "GET", "/api/models/tiny/versions/1/images/3.png").status == 200     # still serving


def test_deeply_nested_json_is_a_bad_request(web):
    base, _ = web
    r = request(base, "POST", "/api/search", raw=b"[" * 200_000 + b"]" * 200_000,
                headers={"Content-Type": "application/json"})
    assert r.status == 400 and r.error["code"] == "INVALID_ARGUMENT" and "body" in r.violations()


def test_options_and_unknown_methods_are_not_internal_errors(web):
    base, _ = web
    r = request(base, "OPTIONS", "/api/models")
    assert r.status == 405 and r.headers["Allow"] == "GET" and r.error["code"] != "INTERNAL"
    r = request(base, "BREW", "/api/models")
    assert r.status == 501 and r.error["code"] == "UNIMPLEMENTED"


def _threads() -> int:
    return threading.active_count()


def test_connections_are_bounded_and_idle_ones_time_out(web_server):
    server = web_server(max_connections=8, idle_timeout_s=1.0)
    url = urlsplit(server.url)
    before = _threads()
    idle = [socket.create_connection((url.hostname, url.port), timeout=5) for _ in range(40)]   # send nothing
    try:
        time.sleep(0.5)
        assert _threads() <= before + 8 + 1, _threads() - before        # one per accepted connection, no more
        refused = 0
        for s in idle:
            s.settimeout(3)
            try:
                data = s.recv(4096)
            except OSError:
                data = b""
            refused += data.startswith(b"HTTP/1.1 503")
        assert refused >= 40 - 8, refused
        time.sleep(1.5)                                                  # past the idle timeout: all closed
        assert _threads() <= before + 1
    finally:
        for s in idle:
            s.close()
    assert request(server.url, "GET", "/healthz").status in (200, 503)    # and it still answers


def test_one_set_of_bounds_for_both_transports(web):
    """The HTTP side and gRPC refuse the same field with the same description: the bounds are the
    domain's (tests/server/test_limits.py sends the same requests over gRPC)."""
    base, _ = web
    search = {"model": "tiny", "version": 1, "context": [{"seed": 0, "box": BOX}], "seeds": [1, 2]}
    r = request(base, "POST", "/api/search", {**search, "top": 10_001})
    assert r.status == 400 and r.violations()["top"] == TOP_OVER
    r = request(base, "POST", "/api/search", {**search, "top": 0})
    assert r.status == 400 and r.violations()["top"] == "must be a positive integer, got 0"
    r = request(base, "POST", "/api/search", {**search, "quantile": 1.5})
    assert r.status == 400 and r.violations()["quantile"] == QUANTILE_OUT


def test_list_caps_are_the_domains_own(web):
    """Lists over a cap are refused before they are walked, in the domain's words and naming its
    setting: a rewrite's preview seeds (``max_images``) and a search's seeds (``max_search_seeds``)."""
    base, domain = web
    too_many = list(range(domain.limits.max_images + 1))
    with pytest.raises(InvalidArgument) as refused:
        RewriteRequest("tiny/1", {}, preview_seeds=too_many).check(domain.limits)
    r = request(base, "POST", "/api/rewrites", {"model": "tiny", "version": 1, "spec": {}, "preview_seeds": too_many})
    assert r.status == 400 and r.violations() == {"preview_seeds": refused.value.description}
    assert "max_images" in refused.value.description
    seeds = list(range(domain.limits.max_search_seeds + 1))
    r = request(base, "POST", "/api/search", {"model": "tiny", "version": 1, "context": [{"seed": 0, "box": BOX}],
                                              "seeds": seeds})
    assert r.status == 400 and "server setting max_search_seeds" in r.violations()["seeds"]


TOP_OVER = "at most 10,000 matches per request (server setting max_search_seeds), got 10,001"
QUANTILE_OUT = "must lie strictly between 0 and 1, got 1.5"


def _drip(socks: list[socket.socket], data: list[bytes], rounds: int, every_s: float) -> dict[int, bytes]:
    """Send ``data[n]`` to socket n one byte per round, ``every_s`` apart, for at most ``rounds`` rounds;
    returns what each socket the server closed got back before its close, by index."""
    answers: dict[int, bytes] = {}
    for i in range(rounds):
        for n, s in enumerate(socks):
            if n in answers:
                continue
            readable, _, _ = select.select([s], [], [], 0)
            if readable:                                      # the server answered or closed: the slot is free
                answers[n] = _read_to_close(s)
                continue
            try:
                s.sendall(data[n][i:i + 1])
            except OSError:
                answers[n] = b""
        if len(answers) == len(socks):
            break
        time.sleep(every_s)
    return answers


def _read_to_close(s: socket.socket) -> bytes:
    s.settimeout(5)
    out = b""
    try:
        while chunk := s.recv(4096):
            out += chunk
    except OSError:
        pass
    return out


def test_slow_drip_requests_lose_their_slot_at_the_request_deadline(web_server):
    """Clients that send a request one byte at a time, each byte well inside the idle timeout, hold
    every connection slot only until the request deadline: then they get 408 and health answers."""
    server = web_server(max_connections=4, idle_timeout_s=1.0, request_timeout_s=2.0)
    url = urlsplit(server.url)
    head = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Drip: " + b"a" * 4000        # never ends
    body = (b"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 4000\r\n\r\n" + b" " * 4000)                             # its headers in at once
    drips = [socket.create_connection((url.hostname, url.port), timeout=5) for _ in range(4)]
    try:
        for s in drips[2:]:
            s.sendall(body[:body.index(b"\r\n\r\n") + 4])
        assert request(server.url, "GET", "/healthz").status == 503                    # all four slots held
        data = [head, head] + [body[body.index(b"\r\n\r\n") + 4:]] * 2    # two in the headers, two in a body
        answers = _drip(drips, data, rounds=40, every_s=0.25)                           # at most 10 s: 5x the deadline
        assert sorted(answers) == [0, 1, 2, 3], f"{len(answers)} of 4 dripping connections were closed"
        for answer in answers.values():
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            assert b'"DEADLINE_EXCEEDED"' in answer and b"web_request_timeout_s" in answer, answer
        assert request(server.url, "GET", "/healthz").status == 200
    finally:
        for s in drips:
            s.close()


def _reply(s: socket.socket) -> bytes:
    """One whole response (headers and its Content-Length of body) read from ``s``; b"" if it closed."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = s.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":", 1)[1] for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:")))
    while len(rest) < length and (chunk := s.recv(65536)):
        rest += chunk
    return head + b"\r\n\r\n" + rest


def test_the_request_deadline_is_per_request_and_spares_slow_but_steady_clients(web_server):
    """On one keep-alive connection, four requests whose bytes come in over about a second each are all
    answered, though together they take longer than the deadline: it restarts with every request,
    also after an answer that went out before the request's body was all in (a 404)."""
    server = web_server(max_connections=4, idle_timeout_s=1.0, request_timeout_s=2.5)
    url = urlsplit(server.url)
    body = b'{"model": "tiny", "version": 1}' + b" " * 600      # the headers are all in with the first piece

    def post(path: bytes) -> bytes:
        return (b"POST " + path + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)

    with socket.create_connection((url.hostname, url.port), timeout=10) as s:
        statuses = []
        for path in (b"/api/nothing-here", b"/api/nothing-here", b"/api/nothing-here", b"/api/search"):
            one = post(path)
            for part in range(4):                                         # four pieces, 0.25 s apart
                time.sleep(0.25)
                s.sendall(one[part * len(one) // 4:(part + 1) * len(one) // 4])
            reply = _reply(s)
            statuses.append(reply.split(b" ", 2)[1] if reply else b"closed")
        assert statuses == [b"404", b"404", b"404", b"400"], statuses
