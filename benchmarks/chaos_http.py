"""Slow-drip HTTP clients against a real server: ``python -m benchmarks.chaos_http``.

A fresh ``rulewright-engine serve`` process (empty registry, the HTTP side on a free loopback
port, its default bounds unless flags say otherwise) gets ``--drips`` (70) connections that
each send one byte of a never-ending request header every ``--drip-every`` seconds (5: well
inside the idle timeout, so only the request deadline can end them), more than the connection
cap (64). Meanwhile ``/healthz`` is asked on a fresh connection every second. Until the end
(health 200 with every drip connection closed, or ``--bound`` seconds) it records:

- **slow-drip HTTP health**: the ``/healthz`` statuses seen while the drips held their slots and
  the first 200 after, with when it came;
- **slow-drip HTTP slots**: how many drip connections the server closed, with which status and
  when, and how many were refused at connect (over the cap).

``run(args) -> list[dict]`` returns rows ``{"scenario", "backend", "result", "detail"}``;
``main()`` prints them as a table (``--json FILE`` also writes them). Loopback only.
"""

from __future__ import annotations

import argparse
import collections
import http.client
import os
import select
import socket
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.reliability_serving import Server, _free_port, _row, run_alone

SCENARIO = "slow-drip HTTP"
HEADER = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Drip: " + b"a" * 100_000     # never ends


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This scenario's flags."""
    parser.add_argument("--drips", type=int, default=70, help="slow-drip connections (default 70)")
    parser.add_argument("--drip-every", type=float, default=5.0, help="seconds between a drip's bytes (default 5)")
    parser.add_argument("--web-max-connections", type=int, default=None,
                        help="the server's connection cap (default: the server's, 64)")
    parser.add_argument("--web-request-timeout-s", type=float, default=None,
                        help="the server's request deadline (default: the server's, 30 s)")
    parser.add_argument("--bound", type=float, default=90.0, help="give up after this many seconds (default 90)")


def _health(port: int) -> int | str:
    """``/healthz``'s status on a fresh connection, or the error's name."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", "/healthz")
        return conn.getresponse().status
    except (OSError, http.client.HTTPException) as exc:
        return type(exc).__name__
    finally:
        conn.close()


def _status(answer: bytes) -> str:
    """The status code of an HTTP answer, or ``closed`` for none."""
    return answer.split(b" ", 2)[1].decode() if answer.startswith(b"HTTP/1.1 ") else "closed"


def _read_to_close(s: socket.socket) -> bytes:
    s.settimeout(2)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except OSError:
        pass
    return out


def drip(port: int, drips: int, every_s: float, bound_s: float) -> dict:
    """Open ``drips`` connections that each send a header byte every ``every_s`` s; watch ``/healthz``."""
    socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(drips)]
    started = time.monotonic()
    ended: dict[int, tuple[float, str]] = {}            # index -> (seconds, status it got)
    health: list[tuple[float, int | str]] = []
    sent = [0] * drips
    next_byte = [started] * drips
    next_health = started
    try:
        while time.monotonic() - started < bound_s:
            now = time.monotonic()
            live = [n for n in range(drips) if n not in ended]
            readable = select.select([socks[n] for n in live], [], [], 0)[0] if live else []
            for n in live:
                if socks[n] in readable:                # answered or closed by the server: its slot is free
                    ended[n] = (now - started, _status(_read_to_close(socks[n])))
                elif now >= next_byte[n]:
                    try:
                        socks[n].sendall(HEADER[sent[n]:sent[n] + 1])
                        sent[n] += 1
                    except OSError:
                        ended[n] = (now - started, "reset")
                    next_byte[n] = now + every_s
            if now >= next_health:
                health.append((now - started, _health(port)))
                next_health = now + 1.0
                if health[-1][1] == 200 and len(ended) == drips:
                    break
            time.sleep(0.05)
    finally:
        for s in socks:
            s.close()
    return {"ended": ended, "health": health, "seconds": time.monotonic() - started}


def _summary(statuses: list) -> str:
    return ", ".join(f"{k} x{v}" for k, v in collections.Counter(str(s) for s in statuses).items()) or "none"


def rows_of(seen: dict, drips: int, every_s: float, cap: int, deadline_s: float) -> list[dict]:
    """The scenario's two rows from what ``drip`` saw."""
    ended, health = seen["ended"], seen["health"]
    first_ok = next((t for t, status in health if status == 200), None)
    before = [status for t, status in health if first_ok is None or t < first_ok]
    refused = [t for t, status in ended.values() if status == "503"]
    cut = sorted((t, status) for t, status in ended.values() if status != "503")
    setup = f"{drips} connections, 1 header byte every {every_s:g} s, cap {cap}, request deadline {deadline_s:g} s"
    if first_ok is None:
        result = f"no 200 in {seen['seconds']:.0f} s"
    else:
        result = f"200 at {first_ok:.1f} s"
    return [
        _row(f"{SCENARIO} health", "embedded", result, f"/healthz before: {_summary(before)}; {setup}"),
        _row(f"{SCENARIO} slots", "embedded", f"{len(cut)}/{drips - len(refused)} held slots freed",
             (f"closed with {_summary([s for _, s in cut])} at {cut[0][0]:.1f}-{cut[-1][0]:.1f} s; " if cut else "")
             + f"{len(refused)} refused at connect (503); still open after {seen['seconds']:.0f} s: "
             + f"{drips - len(ended)}"),
    ]


def run(args) -> list[dict]:
    """The slow-drip scenario on a fresh server; rows ``{"scenario", "backend", "result", "detail"}``."""
    from rulewright.service.server.config import SETTINGS

    defaults = {s.name: s.default for s in SETTINGS}
    cap = args.web_max_connections or defaults["web_max_connections"]
    deadline_s = args.web_request_timeout_s or defaults.get("web_request_timeout_s", float("inf"))
    web_port = _free_port()
    extra = ["--web-address", f"127.0.0.1:{web_port}", "--web-max-connections", str(cap)]
    if args.web_request_timeout_s:
        extra += ["--web-request-timeout-s", str(args.web_request_timeout_s)]
    env = {k: v for k, v in os.environ.items() if not k.startswith("RULEWRIGHT_")}
    with tempfile.TemporaryDirectory(prefix="rulewright-chaos-http-") as tmp:
        server = Server(Path(tmp), env, extra)
        try:
            if _health(web_port) != 200:
                raise RuntimeError(f"the HTTP side on {web_port} is not healthy; see {tmp}/server.log")
            seen = drip(web_port, args.drips, args.drip_every, args.bound)
        finally:
            server.stop()
    return rows_of(seen, args.drips, args.drip_every, cap, deadline_s)


def main(argv: list[str] | None = None) -> int:
    """Run the scenario and print its rows; 1 if health never came back."""
    return run_alone("benchmarks.chaos_http", __doc__, add_arguments, run, argv,
                     ok=lambda rows: rows[0]["result"].startswith("200"))


if __name__ == "__main__":
    sys.exit(main())
