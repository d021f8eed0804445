"""Server-sent events of an editor job: its progress, then its result or error, replayed to late
subscribers from ``Last-Event-ID``; a stream waits for news on a thread of the app's own pool
(``WebApp.stream_threads``), so open streams never take the endpoints' threads."""

from __future__ import annotations

import json
from typing import AsyncIterator

import anyio
from starlette.responses import StreamingResponse

from rulewright.service.server.web.responses import finite

HEADERS = {"Cache-Control": "no-store", "X-Accel-Buffering": "no", "Connection": "close"}


def last_event_id(headers) -> int:
    """The id of the last event a reconnecting client saw (0: none)."""
    try:
        return max(0, int(headers.get("Last-Event-ID") or 0))
    except ValueError:
        return 0


def replay_over(job, after: int) -> bool:
    """Whether a client that saw event ``after`` has seen the job's last event."""
    return job.done and after >= len(job.events)


def response(web, job, after: int) -> StreamingResponse:
    """The job's events after event ``after`` as a ``text/event-stream``."""
    return StreamingResponse(stream(job, after, web.sse_keepalive_s, web.stream_threads), 200, HEADERS,
                             media_type="text/event-stream; charset=utf-8")


def _chunk(events: list[tuple[int, str, dict]]) -> bytes:
    return b"".join(f"id: {i}\nevent: {name}\ndata: {json.dumps(finite(data), allow_nan=False)}\n\n".encode()
                    for i, name, data in events)


async def stream(job, after: int, keepalive_s: float, limiter: anyio.CapacityLimiter) -> AsyncIterator[bytes]:
    """The event stream after event ``after``, until the job is done or the server stops; runs on
    the event loop, a comment line every ``keepalive_s`` while nothing happens."""
    yield b"retry: 2000\n\n"
    while True:
        events, finished = await anyio.to_thread.run_sync(job.wait, after, keepalive_s, abandon_on_cancel=True,
                                                          limiter=limiter)
        if events:
            after = events[-1][0]
        yield _chunk(events) or b": keepalive\n\n"
        if finished:                      # the events came with the state, under one lock: nothing follows
            return
