"""Where a job writes: caller-named output locations, checked against the operator's allow-list.

- ``output_location(uri)``: ``s3://bucket/prefix`` or ``file:///path``, checked and normalized;
  ``allowed_prefix(uri, allowed)``, ``check_output_allowed``: the operator's prefix it lies under
  (compared by path segment), else OUTPUT_NOT_ALLOWED.
- ``OutputStores``: the stores of output locations, opened once each; ``ConfinedFileStore``: a
  ``file://`` location's store, which follows no symbolic link below the allowed prefix on any
  call (a link there is OUTPUT_NOT_ALLOWED, before the job or while it runs).
- ``output_bytes(count, shards, resolution)``: the most a dataset job's shards can take;
  ``existing_folder(where)``: the filesystem folder a write there fills (None for S3).
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import stat
import tarfile
import threading
from pathlib import Path, PurePosixPath
from typing import Iterable
from urllib.parse import unquote, urlparse

from rulewright.registry.blobstore import BlobStore, check_key
from rulewright.registry.errors import (AlreadyExists, NotFound as RegistryNotFound, Reason,
                                       Unavailable as StoreUnavailable)
from rulewright.registry.filestore import FileStore
from rulewright.registry.stores import open_store

from rulewright.service.engine.errors import InvalidArgument
from rulewright.service.jobs.errors import OutputRefused

_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_SEGMENT = re.compile(r"^[A-Za-z0-9._~+=@-]+$")


def _location_parts(uri: str, field: str) -> tuple[str, ...]:
    """``uri`` as (scheme, bucket or "", segments...): what prefixes are compared on."""
    if not isinstance(uri, str) or not uri:
        raise InvalidArgument(field, "give s3://bucket/prefix or file:///path")
    if uri.startswith("s3://"):
        bucket, _, path = uri[len("s3://"):].partition("/")
        if not _BUCKET.match(bucket):
            raise InvalidArgument(field, f"{uri!r} does not name an S3 bucket (s3://bucket/prefix)")
        scheme, segments = "s3", path.strip("/").split("/") if path.strip("/") else []
    elif uri.startswith("file://"):
        parsed = urlparse(uri)
        if parsed.netloc not in ("", "localhost") or parsed.query or parsed.fragment:
            raise InvalidArgument(field, f"{uri!r} must name a local path: file:///absolute/path")
        bucket, scheme = "", "file"
        path = unquote(parsed.path)
        segments = [p for p in path.strip("/").split("/")] if path.strip("/") else []
    else:
        raise InvalidArgument(field, f"{uri!r} must start with s3:// or file://")
    # ".." would climb out of an allowed prefix that a plain string comparison lets through.
    bad = [p for p in segments if p in ("", ".", "..") or not _SEGMENT.match(p)]
    if bad:
        raise InvalidArgument(field, f"{uri!r} has a path segment {bad[0]!r}; use letters, digits and ._~+=@-")
    return (scheme, bucket, *segments)


def output_location(uri: str, field: str = "output_uri") -> str:
    """``uri`` checked and normalized (no trailing slash): ``s3://bucket/prefix`` or ``file:///path``;
    InvalidArgument naming ``field`` if it is neither."""
    scheme, bucket, *segments = _location_parts(uri, field)
    if scheme == "s3":
        return "/".join([f"s3://{bucket}", *segments])
    return PurePosixPath("/", *segments).as_uri()


def allowed_prefix(uri: str, allowed: Iterable[str], field: str = "output_uri") -> str:
    """The normalized prefix of ``allowed`` that ``uri`` lies at or under (compared by path segment,
    so ``s3://b/data`` does not allow ``s3://b/database``); else OUTPUT_NOT_ALLOWED."""
    parts = _location_parts(uri, field)
    for prefix in allowed:
        p = _location_parts(prefix, "job_output_prefixes")
        if parts[:len(p)] == p:
            return output_location(prefix, "job_output_prefixes")
    raise OutputRefused("OUTPUT_NOT_ALLOWED", f"{field}: {uri!r} is not under an output prefix this server allows; "
                        f"ask its operator to add it to job_output_prefixes", field=field, uri=uri)


def check_output_allowed(uri: str, allowed: Iterable[str], field: str = "output_uri") -> str:
    """The normalized ``uri`` if it lies at or under one of the ``allowed`` prefixes; else OUTPUT_NOT_ALLOWED."""
    allowed_prefix(uri, allowed, field)
    return output_location(uri, field)


def local_path(uri: str) -> str:
    """The filesystem path of a ``file://`` URI."""
    return unquote(urlparse(uri).path)


class ConfinedFileStore(FileStore):
    """The documents of a ``file://`` output location that never follow a symbolic link below its prefix.

    Every call walks from the real path of the operator's prefix (links above it are the
    operator's choice: a mount point) to its folder one name at a time with ``O_NOFOLLOW`` and
    works relative to the folder it opened, so a link planted anywhere below the prefix, before
    the job or while it runs, is refused (PERMISSION_DENIED) instead of followed: a path checked
    once and written later could be swapped for a link in between.
    """

    def __init__(self, uri: str, prefix: str = ""):
        path = PurePosixPath(local_path(uri))
        top = PurePosixPath(local_path(prefix)) if prefix else path
        missing = ()
        while not os.path.isdir(top) and top != top.parent:     # a prefix not made yet: made like the rest
            top, missing = top.parent, (top.name, *missing)
        self.base = os.path.realpath(top)
        self.parts = (*missing, *path.relative_to(PurePosixPath(top, *missing)).parts)
        self.location = uri
        self.root = Path(self.base, *self.parts)
        self.uri = self.root.as_uri()
        self._blobs, self._docs, self._tmp = self.root / "blobs" / "sha256", self.root / "docs", self.root / "tmp"
        for folder in ("docs", "tmp"):
            os.close(self._dir((folder,), create=True))

    def __repr__(self) -> str:
        return f"ConfinedFileStore({self.location!r})"

    def _dir(self, names: tuple[str, ...], create: bool = False) -> int:
        """A descriptor of the folder ``names`` below the location, opened without following a link."""
        fd = os.open(self.base, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for name in (*self.parts, *names):
                if create:
                    try:
                        os.mkdir(name, 0o777, dir_fd=fd)
                    except FileExistsError:
                        pass
                try:
                    inner = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                        self._refuse(name, fd)
                    raise
                os.close(fd)
                fd = inner
        except BaseException:
            os.close(fd)
            raise
        return fd

    def _refuse(self, name: str, parent: int) -> None:
        if stat.S_ISLNK(os.lstat(name, dir_fd=parent).st_mode):
            raise OutputRefused("OUTPUT_NOT_ALLOWED", f"output_uri: {self.location} passes through a symbolic link "
                                f"({name!r}) below the allowed prefix; name a real folder",
                                field="output_uri", uri=self.location)
        raise OutputRefused("OUTPUT_NOT_A_FOLDER", f"output_uri: {self.location} needs a folder where {name!r} is a "
                            f"file", field="output_uri", uri=self.location)

    def _split(self, key: str) -> tuple[tuple[str, ...], str]:
        *folders, name = check_key(key).split("/")
        return ("docs", *folders), name

    def create(self, key: str, data: bytes) -> None:
        """Publish ``data`` at ``key``: a fsynced temporary file linked into its folder, refusing an existing name."""
        folders, name = self._split(key)
        tmp_name = f"upload-{secrets.token_hex(8)}"
        tmp = out = None
        try:
            tmp = self._dir(("tmp",), create=True)
            fd = os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600, dir_fd=tmp)
            try:
                with os.fdopen(fd, "wb", closefd=False) as f:
                    f.write(bytes(data))
                    f.flush()
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                out = self._dir(folders, create=True)
                os.link(tmp_name, name, src_dir_fd=tmp, dst_dir_fd=out, follow_symlinks=False)
            except FileExistsError:
                raise AlreadyExists(Reason.OBJECT_EXISTS, f"{key} already exists", key=key) from None
            finally:
                os.unlink(tmp_name, dir_fd=tmp)
            os.fsync(out)
        except OSError as exc:
            raise _store_down(exc, f"create {key}") from exc
        finally:
            for fd in (tmp, out):
                if fd is not None:
                    os.close(fd)

    def read(self, key: str) -> bytes:
        """The document's bytes (a link in its place is refused, not read)."""
        folders, name = self._split(key)
        folder = None
        try:
            folder = self._dir(folders)
            try:
                fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=folder)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    self._refuse(name, folder)
                raise
            with os.fdopen(fd, "rb") as f:
                return f.read()
        except (FileNotFoundError, IsADirectoryError):
            raise RegistryNotFound(Reason.OBJECT_NOT_FOUND, f"{key} not found", key=key) from None
        except OSError as exc:
            raise _store_down(exc, f"read {key}") from exc
        finally:
            if folder is not None:
                os.close(folder)

    def delete(self, key: str) -> None:
        """Unlink the document (a link in its place is removed, never followed); absent is fine."""
        folders, name = self._split(key)
        try:
            folder = self._dir(folders)
        except FileNotFoundError:
            return
        try:
            os.unlink(name, dir_fd=folder)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _store_down(exc, f"delete {key}") from exc
        finally:
            os.close(folder)
        for depth in range(len(folders) - 1, 0, -1):     # prune folders left empty, as FileStore does
            try:
                parent = self._dir(folders[:depth])
            except OSError:
                return
            try:
                os.rmdir(folders[depth], dir_fd=parent)
            except OSError:
                return
            finally:
                os.close(parent)

    def list_keys(self, prefix: str, start_after: str = "", limit: int | None = None) -> list[str]:
        """As FileStore's, once the documents folder is known not to be a link."""
        try:
            os.close(self._dir(("docs",)))
        except FileNotFoundError:
            return []
        return super().list_keys(prefix, start_after, limit)


def _store_down(exc: OSError, what: str) -> StoreUnavailable:
    return StoreUnavailable(Reason.STORE_UNAVAILABLE, f"output store failed to {what}: {exc.strerror or exc}",
                            errno=exc.errno)


class OutputStores:
    """The stores of output locations, opened once each (an S3 store keeps a client and a pool).

    ``s3``: endpoint, keys and timeouts for ``s3://`` locations (the server's own S3 settings);
    None reads ``RULEWRIGHT_S3_*`` of this process.
    """

    def __init__(self, s3=None):
        self.s3 = s3
        self._stores: dict[str, BlobStore] = {}
        self._lock = threading.Lock()

    def open(self, uri: str, prefix: str = "") -> BlobStore:
        """The store ``uri`` (an already normalized output location) names; a ``file://`` one confined
        below ``prefix``, the allowed prefix it lies under (empty: below the location itself)."""
        with self._lock:
            if uri not in self._stores:
                if uri.startswith("file://"):
                    self._stores[uri] = ConfinedFileStore(uri, prefix)
                else:
                    self._stores[uri] = open_store(uri, s3=self.s3 if uri.startswith("s3://") else None)
            return self._stores[uri]

    def close(self) -> None:
        """Release the stores' connections."""
        with self._lock:
            stores, self._stores = list(self._stores.values()), {}
        for store in stores:
            store.close()



def output_bytes(count: int, shards: int, resolution: int) -> int:
    """The most bytes a dataset job's shards can take: per image a PNG no larger than its raw RGB
    (plus a filter byte per row and the format's headers), a JSON file, and their tar headers and
    padding; per shard the tar's end blocks and record padding."""
    png = 3 * resolution * resolution + resolution + 256 + 5 * (3 * resolution * resolution // 65535 + 1)
    return count * (png + 511 + 3 * 512) + shards * tarfile.RECORDSIZE



def existing_folder(where) -> str | None:
    """The nearest existing folder of a local path or ``file://`` URI (what a write there fills); None for S3."""
    text = str(where)
    if text.startswith("s3://"):
        return None
    path = Path(local_path(text) if text.startswith("file://") else text)
    for folder in (path, *path.parents):
        if folder.is_dir():
            return str(folder)
    return None

