"""Files over server streams: a download written beside its target, verified, then renamed into place."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import grpc

from rulewright.client.errors import RulewrightError

__all__ = ["receive_file"]


def receive_file(call, part: Path, path: Path, what: str) -> tuple[Any, int]:
    """Write a stream of ``metadata`` then ``chunk`` messages to ``part``; once its size and sha256
    match the metadata's, rename it to ``path``. Returns (metadata, size); DATA_LOSS otherwise."""
    meta, digest, size = None, hashlib.sha256(), 0
    try:
        with open(part, "wb") as f:
            for msg in call:
                if msg.WhichOneof("content") == "metadata":
                    meta = msg.metadata
                else:
                    f.write(msg.chunk)
                    digest.update(msg.chunk)
                    size += len(msg.chunk)
    finally:
        call.cancel()          # a no-op once the stream ended; stops the server's work otherwise
    if meta is None or size != meta.size_bytes or digest.hexdigest() != meta.sha256:
        part.unlink(missing_ok=True)
        raise RulewrightError(grpc.StatusCode.DATA_LOSS, f"{what} is corrupt: got {size} bytes with sha256 "
                              f"{digest.hexdigest()}, the server announced {meta.size_bytes if meta else '?'} bytes "
                              f"with sha256 {meta.sha256 if meta else '?'}", "EXPORT_CORRUPT")
    os.replace(part, path)
    return meta, size
