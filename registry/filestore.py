"""The embedded default store: blobs and documents in one local folder.

- ``FileStore(root)``: ``root/blobs/sha256/ab/<sha>`` for blobs, ``root/docs/<key>`` for documents,
  ``root/tmp/`` for writes in flight.

Every write goes to a temporary file in ``root/tmp`` (same filesystem), is fsynced, then appears
under its final name in one step: ``rename`` for blobs (same content, so replacing is harmless)
and ``link`` for documents, which fails if the name exists. That is the conditional create: an
``open(O_CREAT | O_EXCL)`` on the final name would also be exclusive, but readers could see a
half-written document; ``link`` publishes the complete, fsynced file or nothing.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import BinaryIO, Iterator

from rulewright.registry import errors
from rulewright.registry.blobstore import CHUNK, BlobInfo, BlobRef, BlobStore, check_key, check_sha256
from rulewright.registry.errors import Reason

log = logging.getLogger(__name__)


def _unavailable(exc: OSError, what: str) -> errors.Unavailable:
    return errors.Unavailable(
        Reason.STORE_UNAVAILABLE, f"filesystem store failed to {what}: {exc.strerror or exc}", errno=exc.errno
    )


def _fsync_dir(path: Path) -> None:
    # The rename/link is durable only once the directory entry is on disk.
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileStore(BlobStore):
    """Blobs and documents under one local folder (created on first use)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.uri = self.root.as_uri()
        self._blobs = self.root / "blobs" / "sha256"
        self._docs = self.root / "docs"
        self._tmp = self.root / "tmp"
        try:
            for path in (self._blobs, self._docs, self._tmp):
                path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _unavailable(exc, f"create {self.root}") from exc

    def __repr__(self) -> str:
        return f"FileStore({str(self.root)!r})"

    # ---- helpers -----------------------------------------------------------------------------

    def _blob_path(self, sha: str) -> Path:
        # Two hex digits of fan-out keep directories small (256 of them) for millions of blobs.
        return self._blobs / sha[:2] / sha

    def _doc_path(self, key: str) -> Path:
        return self._docs / check_key(key)

    def _spill(self, body: bytes | BinaryIO) -> str:
        """Write ``body`` to a fsynced temporary file in ``tmp/`` and return its path."""
        fd, tmp = tempfile.mkstemp(dir=self._tmp, prefix="upload-")
        try:
            with os.fdopen(fd, "wb") as f:
                if isinstance(body, bytes):
                    f.write(body)
                else:
                    while chunk := body.read(CHUNK):
                        f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            _unlink_quietly(tmp)
            raise
        return tmp

    # ---- blobs -------------------------------------------------------------------------------

    def _write_blob(self, ref: BlobRef, body: bytes | BinaryIO) -> None:
        target = self._blob_path(ref.sha256)
        try:
            tmp = self._spill(body)
            try:
                target.parent.mkdir(exist_ok=True)
                # Even when the blob exists we replace it: that refreshes its mtime (so a GC running
                # now keeps it through the grace period) and heals a copy that rotted on disk.
                os.replace(tmp, target)
            except BaseException:
                _unlink_quietly(tmp)
                raise
            _fsync_dir(target.parent)
        except OSError as exc:
            raise _unavailable(exc, f"write blob {ref.sha256}") from exc

    def _blob_chunks(self, sha256: str) -> Iterator[bytes]:
        try:
            f = open(self._blob_path(sha256), "rb")
        except FileNotFoundError:
            raise errors.NotFound(Reason.BLOB_NOT_FOUND, f"blob {sha256} not found", sha256=sha256) from None
        except OSError as exc:
            raise _unavailable(exc, f"read blob {sha256}") from exc
        return _chunks(f)

    def has_blob(self, sha256: str) -> bool:
        """Whether the blob file exists."""
        return self._blob_path(check_sha256(sha256)).is_file()

    def stat_blob(self, sha256: str) -> BlobInfo | None:
        """``stat`` of the blob file."""
        try:
            st = self._blob_path(check_sha256(sha256)).stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise _unavailable(exc, f"stat blob {sha256}") from exc
        return BlobInfo(sha256, st.st_size, st.st_mtime)

    def delete_blob(self, sha256: str) -> None:
        """Unlink the blob file (absent is fine)."""
        try:
            os.unlink(self._blob_path(check_sha256(sha256)))
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _unavailable(exc, f"delete blob {sha256}") from exc

    def iter_blobs(self) -> Iterator[BlobInfo]:
        """Every blob file with its size and mtime."""
        try:
            paths = [p for sub in sorted(self._blobs.iterdir()) if sub.is_dir() for p in sorted(sub.iterdir())]
        except OSError as exc:
            raise _unavailable(exc, "list blobs") from exc
        for path in paths:
            try:
                st = path.stat()
            except FileNotFoundError:  # deleted while we listed
                continue
            except OSError as exc:
                raise _unavailable(exc, f"stat blob {path.name}") from exc
            yield BlobInfo(path.name, st.st_size, st.st_mtime)

    # ---- documents ---------------------------------------------------------------------------

    def create(self, key: str, data: bytes) -> None:
        """Publish ``data`` at ``key`` with ``link()``, which refuses an existing name."""
        target = self._doc_path(key)
        try:
            tmp = self._spill(bytes(data))
            try:
                # A concurrent delete may prune the empty parent between mkdir and link: retry.
                for attempt in range(5):
                    target.parent.mkdir(parents=True, exist_ok=True)
                    try:
                        os.link(tmp, target)
                        break
                    except FileNotFoundError:
                        if attempt == 4:
                            raise
                    except FileExistsError:
                        raise errors.AlreadyExists(Reason.OBJECT_EXISTS, f"{key} already exists", key=key) from None
            finally:
                _unlink_quietly(tmp)
            _fsync_dir(target.parent)
        except OSError as exc:
            raise _unavailable(exc, f"create {key}") from exc

    def read(self, key: str) -> bytes:
        """The file's bytes."""
        try:
            return self._doc_path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            raise errors.NotFound(Reason.OBJECT_NOT_FOUND, f"{key} not found", key=key) from None
        except OSError as exc:
            raise _unavailable(exc, f"read {key}") from exc

    def delete(self, key: str) -> None:
        """Unlink the file and prune folders left empty (so listings match S3, which has no folders)."""
        path = self._doc_path(key)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _unavailable(exc, f"delete {key}") from exc
        parent = path.parent
        while parent != self._docs:
            try:
                parent.rmdir()
            except OSError:  # not empty (or already gone): stop pruning
                break
            parent = parent.parent

    def document_uri(self, key: str) -> str:
        """``file://`` URI of document ``key`` (its file under ``root/docs``)."""
        return self._doc_path(key).as_uri()

    def list_keys(self, prefix: str, start_after: str = "", limit: int | None = None) -> list[str]:
        """Walk the folder holding ``prefix`` and filter; sorted like S3 (byte order)."""
        head, _, _ = prefix.rpartition("/")
        base = self._docs / head if head else self._docs
        keys = []
        try:
            for dirpath, _dirs, files in os.walk(base):
                rel = Path(dirpath).relative_to(self._docs).as_posix()
                for name in files:
                    key = name if rel == "." else f"{rel}/{name}"
                    if key.startswith(prefix) and key > start_after:
                        keys.append(key)
        except OSError as exc:
            raise _unavailable(exc, f"list {prefix}") from exc
        keys.sort()
        return keys if limit is None else keys[:limit]

    def list_children(self, prefix: str) -> list[str]:
        """Sub-folders of the folder ``prefix`` names."""
        base = self._docs / prefix.strip("/") if prefix.strip("/") else self._docs
        try:
            return sorted(p.name for p in base.iterdir() if p.is_dir())
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise _unavailable(exc, f"list {prefix}") from exc

    # ---- writes that never finished ----------------------------------------------------------

    def abandoned_uploads(self, older_than_s: float) -> list[str]:
        """Temporary files in ``tmp/`` older than ``older_than_s`` (left by killed writers)."""
        now, out = time.time(), []
        try:
            entries = sorted(self._tmp.iterdir())
        except OSError as exc:
            raise _unavailable(exc, "list temporary files") from exc
        for path in entries:
            try:
                if now - path.stat().st_mtime >= older_than_s:
                    out.append(path.name)
            except FileNotFoundError:
                continue
        return out

    def remove_upload(self, name: str) -> None:
        """Remove one temporary file named by ``abandoned_uploads``."""
        if "/" in name or name in ("", ".", ".."):
            raise errors.invalid(Reason.INVALID_ARGUMENT, "", f"not an upload name: {name!r}")
        _unlink_quietly(str(self._tmp / name))


def _chunks(f) -> Iterator[bytes]:
    with f:
        while True:
            try:
                chunk = f.read(CHUNK)
            except OSError as exc:
                raise _unavailable(exc, f"read {f.name}") from exc
            if not chunk:
                return
            yield chunk


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError as exc:
        if exc.errno != errno.ENOENT:
            log.warning("could not remove temporary file", extra={"path": path, "error": str(exc)})
