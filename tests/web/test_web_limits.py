"""The HTTP side's bounds (issue 12, defects 1 and 7): request caps, deep JSON, OPTIONS and unknown
methods, and a bounded number of connections with an idle timeout, over real sockets."""

from __future__ import annotations

import base64
import socket
import threading
import time
import zlib
from urllib.parse import urlsplit

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


TOP_OVER = "at most 10,000 matches per request (server setting max_search_seeds), got 10,001"
QUANTILE_OUT = "must lie strictly between 0 and 1, got 1.5"
