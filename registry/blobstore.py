"""The storage interface every registry backend implements, and the URI that picks one.

- ``BlobStore``: an ``abc.ABC`` with two groups of primitives: content-addressed **blobs** (sha256,
  verified on every read) and small named **documents** (manifests, alias entries) whose only
  mutation is a conditional create, so concurrent writers can never overwrite each other.
- ``BlobRef(sha256, size)``: what a manifest records of a blob; ``BlobInfo`` adds the blob's age.
- ``open_store(uri)`` lives in ``stores`` (it knows the backends; this module knows none).
- ``default_store_uri()``: ``$RULEWRIGHT_REGISTRY_URI``, else a folder in the local cache.
- ``sha256_hex(data)``, ``check_sha256(text)``: hashing and digest validation helpers.
- ``call_deadline(seconds)``: store calls made inside end by then (the caller's deadline, e.g. an
  RPC's); a backend that can block reads what is left with ``deadline_left()``.

No torch here: clients import this module.
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
import dataclasses
import hashlib
import os
import re
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Iterator, Union

from rulewright.registry import errors
from rulewright.registry.errors import Reason


BlobSource = Union[bytes, bytearray, memoryview, BinaryIO]

CHUNK = 1 << 20
# A file-like source is hashed into a spool first (S3 needs the key, the sha, before the upload);
# it stays in memory up to this size and moves to a temporary file beyond it.
_SPOOL_MEMORY = 64 << 20

_SHA_RE = re.compile(r"^[0-9a-f]{64}$")
# Document keys are built by the registry from validated names; the store re-checks them so that
# no key can climb out of a filesystem root or address something that is not a document.
_KEY_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*(/[a-z0-9][a-z0-9._-]*)*$")


@dataclasses.dataclass(frozen=True)
class BlobRef:
    """A blob as a manifest names it: its sha256 (hex) and size in bytes."""

    sha256: str
    size: int

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"sha256": self.sha256, "size": self.size}

    @classmethod
    def from_dict(cls, d: dict) -> "BlobRef":
        """Inverse of ``to_dict``."""
        return cls(check_sha256(d["sha256"]), int(d["size"]))


@dataclasses.dataclass(frozen=True)
class BlobInfo:
    """A stored blob as a listing shows it (for the consistency check and GC)."""

    sha256: str
    size: int
    modified: float  # unix seconds of the last write (the GC grace period counts from it)


def sha256_hex(data: bytes | bytearray | memoryview) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def check_sha256(text: str) -> str:
    """``text`` if it is a lowercase hex sha256, else INVALID_ARGUMENT."""
    if not isinstance(text, str) or not _SHA_RE.match(text):
        raise errors.invalid(Reason.INVALID_ARGUMENT, "sha256", f"not a sha256 digest: {text!r}")
    return text


def check_key(key: str) -> str:
    """``key`` if it is a safe document key (lowercase path segments, no ``..``), else INVALID_ARGUMENT."""
    if not isinstance(key, str) or not _KEY_RE.match(key) or any(p in (".", "..") for p in key.split("/")):
        raise errors.invalid(Reason.INVALID_ARGUMENT, "key", f"not a valid object key: {key!r}")
    return key


def blob_corrupt(sha: str, actual: str) -> errors.DataLoss:
    """The DATA_LOSS error for a blob whose bytes hash to something else."""
    return errors.DataLoss(
        Reason.BLOB_CORRUPT, f"blob {sha} is corrupt: its bytes hash to {actual}", sha256=sha, actual=actual
    )


# When (time.monotonic()) the current caller stops waiting for store calls; None: no deadline.
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("rulewright_store_deadline", default=None)


@contextlib.contextmanager
def call_deadline(seconds: float | None):
    """Store calls made inside (on this thread) give up once ``seconds`` have passed (None: no bound)."""
    token = _DEADLINE.set(None if seconds is None else time.monotonic() + max(seconds, 0.0))
    try:
        yield
    finally:
        try:
            _DEADLINE.reset(token)
        except ValueError:        # a streaming RPC's generator closed from another thread's context
            pass


def deadline_left() -> float | None:
    """Seconds left of the innermost ``call_deadline`` (may be ≤ 0); None when there is none."""
    deadline = _DEADLINE.get()
    return None if deadline is None else deadline - time.monotonic()


class BlobStore(abc.ABC):
    """Content-addressed blobs plus conditionally created documents, on one backend.

    Subclasses implement the underscore-free abstract primitives below and ``_write_blob`` /
    ``_blob_chunks``; hashing, spooling and verification are shared here so every backend verifies
    the same way. A backend whose calls can block (a network) ends each one by the caller's
    ``call_deadline`` (``deadline_left()``), failing with ``Unavailable``; a local one need not.
    """

    uri: str = ""

    # ---- blobs -------------------------------------------------------------------------------

    def put_blob(self, data: BlobSource) -> BlobRef:
        """Store bytes (or a binary stream) under their sha256; storing existing content is a no-op.

        Args:
            data: the bytes, or a readable binary file object (read to its end).
        Returns:
            The blob's ``BlobRef``. Re-storing refreshes the blob's modified time, so a
            concurrent GC's grace period protects it until the caller's manifest is written.
        """
        if isinstance(data, (bytes, bytearray, memoryview)):
            body = bytes(data)
            ref = BlobRef(sha256_hex(body), len(body))
            self._write_blob(ref, body)
            return ref
        digest, size = hashlib.sha256(), 0
        with tempfile.SpooledTemporaryFile(max_size=_SPOOL_MEMORY) as spool:
            while chunk := data.read(CHUNK):
                digest.update(chunk)
                size += len(chunk)
                spool.write(chunk)
            spool.seek(0)
            ref = BlobRef(digest.hexdigest(), size)
            self._write_blob(ref, spool)
        return ref

    def get_blob(self, sha256: str) -> bytes:
        """The blob's bytes, verified: NOT_FOUND if absent, DATA_LOSS (BLOB_CORRUPT) if they hash to another digest."""
        data = b"".join(self._blob_chunks(check_sha256(sha256)))
        actual = sha256_hex(data)
        if actual != sha256:
            raise blob_corrupt(sha256, actual)
        return data

    def read_blob_into(self, sha256: str, out: BinaryIO) -> int:
        """Stream the blob into ``out`` and return its size; verified at the end.

        On DATA_LOSS the bytes already written to ``out`` must be discarded by the caller (the
        hash is only known once the last byte is read).
        """
        digest, size = hashlib.sha256(), 0
        for chunk in self._blob_chunks(check_sha256(sha256)):
            digest.update(chunk)
            size += len(chunk)
            out.write(chunk)
        if digest.hexdigest() != sha256:
            raise blob_corrupt(sha256, digest.hexdigest())
        return size

    @abc.abstractmethod
    def _write_blob(self, ref: BlobRef, body: bytes | BinaryIO) -> None:
        """Store ``body`` (already hashed to ``ref``) atomically: readers see all of it or nothing."""

    @abc.abstractmethod
    def _blob_chunks(self, sha256: str) -> Iterator[bytes]:
        """The stored bytes of a blob in chunks, unverified; NOT_FOUND (BLOB_NOT_FOUND) if absent."""

    @abc.abstractmethod
    def has_blob(self, sha256: str) -> bool:
        """Whether a blob with this digest is stored (its content is not checked)."""

    @abc.abstractmethod
    def stat_blob(self, sha256: str) -> BlobInfo | None:
        """The blob's size and modified time, or None if it is absent."""

    @abc.abstractmethod
    def delete_blob(self, sha256: str) -> None:
        """Remove a blob; removing an absent blob is not an error."""

    @abc.abstractmethod
    def iter_blobs(self) -> Iterator[BlobInfo]:
        """Every stored blob with its size and modified time (any order)."""

    # ---- documents ---------------------------------------------------------------------------

    @abc.abstractmethod
    def create(self, key: str, data: bytes) -> None:
        """Create document ``key`` only if no document has that key (``If-None-Match: *`` / ``O_EXCL``).

        Args:
            key: a path of lowercase segments (``models/faces/versions/0000000001.json``).
            data: the whole content; readers see all of it or none of it.
        Raises:
            AlreadyExists (OBJECT_EXISTS): another writer created ``key`` first.
        """

    @abc.abstractmethod
    def read(self, key: str) -> bytes:
        """The content of document ``key``; NOT_FOUND (OBJECT_NOT_FOUND) if absent."""

    @abc.abstractmethod
    def delete(self, key: str) -> None:
        """Remove document ``key``; removing an absent document is not an error."""

    @abc.abstractmethod
    def list_keys(self, prefix: str, start_after: str = "", limit: int | None = None) -> list[str]:
        """Document keys that start with ``prefix``, in byte order, after ``start_after``.

        Args:
            prefix: a key prefix; ``models/faces/versions/`` lists that folder recursively.
            start_after: exclusive lower bound (a full key), for paging.
            limit: at most this many keys (None: all).
        """

    def document_uri(self, key: str) -> str:
        """Where document ``key`` can be read without this API (``file://...``, ``s3://...``), for
        readers such as the ``webdataset`` library; a backend without such a place raises."""
        raise NotImplementedError(f"{type(self).__name__} has no URI for its documents")

    @abc.abstractmethod
    def list_children(self, prefix: str) -> list[str]:
        """Names of the folders directly under ``prefix`` (ending in ``/``), sorted."""

    @abc.abstractmethod
    def abandoned_uploads(self, older_than_s: float) -> list[str]:
        """Names of writes that never finished (temporary files, multipart uploads) older than ``older_than_s``."""

    @abc.abstractmethod
    def remove_upload(self, name: str) -> None:
        """Discard one write named by ``abandoned_uploads``."""

    def available(self) -> bool:
        """False while the backend is known to be unreachable (its calls would fail or hang); True otherwise."""
        return True

    def close(self) -> None:
        """Release connections (a no-op where there are none)."""

    def __enter__(self) -> "BlobStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def default_store_uri() -> str:
    """``$RULEWRIGHT_REGISTRY_URI``, else ``file://`` + ``$RULEWRIGHT_CACHE_DIR/registry`` (the embedded default)."""
    uri = os.environ.get("RULEWRIGHT_REGISTRY_URI")
    if uri:
        return uri
    cache = os.environ.get("RULEWRIGHT_CACHE_DIR") or str(Path.home() / ".cache" / "rulewright")
    return Path(cache, "registry").resolve().as_uri()
