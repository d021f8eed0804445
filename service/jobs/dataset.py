"""Dataset jobs: images of one version for a range of seeds, as WebDataset shards in the object store.

- ``DatasetJobRequest``: what a caller asks for (model reference, seeds, truncation, image format,
  shard size, idempotency key); ``check(limits)`` refuses bad input before any work.
- ``DatasetJobs(domain, executor)``: ``create``, ``get``, ``list``, ``cancel``, ``wait``,
  ``delete``; ``resume()`` picks up the unfinished jobs in the store (a restarted server);
  ``close()`` stops this process's runners without cancelling their jobs.
- ``JobStatus``: a job as the store records it: spec, state, progress, and the manifest once done.
- ``Executor``: the seam where shards run. ``LocalExecutor`` (the embedded default) is a bounded
  ``concurrent.futures`` thread pool in the server; a distributed backend (Ray tasks) implements
  the same ``run_shards`` and reuses ``shard_tar`` and ``publish_shard`` (``ray_jobs.RayExecutor``).
- ``shard_tar``, ``publish_shard``: one shard's bytes and its commit, shared by every executor;
  ``render_pngs``: a shard's images from a generator an executor holds itself (Sample's bytes).
- ``output_location(uri)``, ``OutputStores``: a caller-named output location (``s3://bucket/prefix``
  or ``file:///path``), checked against the operator's allow-list, and the stores opened for it;
  ``ConfinedFileStore``: a ``file://`` location's store, which follows no symbolic link below the
  allowed prefix on any call (a link there is PERMISSION_DENIED, before the job or while it runs).
- ``output_bytes(count, shards, resolution)``: the most a job's shards can take, checked at create
  against ``Limits.max_job_output_bytes`` and the free space of the filesystem it writes to; a
  server runs at most ``Limits.max_running_jobs`` jobs of a kind (RESOURCE_EXHAUSTED beyond).

Store layout (documents under ``jobs/datasets/{id}/``), append-only because the store's only
mutation is a conditional create:

- ``job.json``: the spec, with the reference already resolved to one immutable version.
- ``shard-{i:06d}.tar``: shard ``i``; ``{key}.png`` and ``{key}.json`` per sample, key ``%09d`` of
  the seed (the WebDataset convention: files sharing a key form one sample).
- ``done/{i:06d}.json``: shard ``i``'s commit record (samples, sha256, size), written only after
  the tar was published and read back with the expected sha256.
- ``cancelled.json``, ``failed.json``: terminal markers (a cancel wins over a failure: whatever a
  shard raises on its way out of a cancel is not recorded); ``manifest.json``: the finished job.

A job with an output location (``JobSpec.output_uri``) claims it when it is created: ``job.json``
in the output store, written with the store's conditional create (a link on a filesystem, a
conditional PutObject on S3) right after the job's own ``job.json``, so of two jobs naming one
location exactly one gets it; the other is refused (FAILED_PRECONDITION, OUTPUT_IN_USE) and its
record removed before it did any work. Deleting the job releases the location.

It keeps the registry layout for its own records
(``job.json``, ``done/``, the markers and a copy of the manifest, so get, list and resume work as
for any job), but publishes its shards and its manifest into the store the location names, at
that store's document keys ``shard-{i:06d}.tar`` and ``manifest.json`` (the registry layout puts
documents under ``docs/``: ``{output_uri}/docs/shard-000000.tar``). The output location is part of
the spec, so a resumed or retried shard goes to the same place, and a commit record is still
written only after the shard was read back from the output store with the expected sha256.

Why it is safe to retry or resume anything: a shard's bytes depend only on (version, seeds,
truncation) (the sampling is deterministic, the PNG encoder and the tar headers too), and the
store's ``create`` publishes the whole document or nothing (a temporary file linked into place,
or one conditional PutObject). A retried shard meets its earlier self (ALREADY_EXISTS) and is
verified instead of written; the job's progress is the set of commit records in the store, so a
new server resumes from it and never writes a shard twice.
"""

from __future__ import annotations

import abc
import concurrent.futures as cf
import contextlib
import dataclasses
import datetime as dt
import errno
import hashlib
import io
import json
import logging
import os
import re
import secrets
import shutil
import stat
import tarfile
import threading
import time
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator
from urllib.parse import unquote, urlparse

from rulewright.registry.blobstore import BlobStore, check_key, sha256_hex
from rulewright.registry.errors import (AlreadyExists, DataLoss, NotFound as RegistryNotFound, Reason,
                                       Unavailable as StoreUnavailable)
from rulewright.registry.filestore import FileStore
from rulewright.registry.manifests import Version
from rulewright.registry.stores import open_store

from rulewright.service.engine.errors import Cancelled, InvalidArgument
from rulewright.service.engine.progress import Progress
from rulewright.service.engine.sampling import png_bytes, sample, to_uint8
from rulewright.service.errors import Code, Error
from rulewright.service.domain.limits import Limits
from rulewright.service.domain.requests import MAX_SEED, SampleRequest

log = logging.getLogger(__name__)

PREFIX = "jobs/datasets/"
IMAGE_FORMATS = ("png",)
DEFAULT_SHARD_SIZE = 1000
MAX_SHARD_SIZE = 10_000              # a shard is built in memory: 10^4 faces PNGs is about 1 GB
MAX_DATASET_IMAGES = 10_000_000      # one job; more is several jobs (shards are per job)
WAIT_POLL_S = 0.2                    # how often ``wait`` looks at the store
CANCEL_POLL_S = 0.5                  # how often a runner asks the store whether its job was cancelled
CLAIM = "job.json"                   # in an output location: the job it belongs to (one conditional create)
_JOB_ID = re.compile(r"^[0-9a-f]{8,64}$")

RUNNING, SUCCEEDED, CANCELLED, FAILED = "running", "succeeded", "cancelled", "failed"


class JobNotFound(Error):
    """No job by that id in the store (→ NOT_FOUND)."""

    code = Code.NOT_FOUND
    reason = "JOB_NOT_FOUND"


class JobNotFinished(Error):
    """Deleting a job that still runs (→ FAILED_PRECONDITION)."""

    code = Code.FAILED_PRECONDITION
    reason = "JOB_NOT_FINISHED"


class OutputNotAllowed(Error):
    """An output location outside every prefix the operator allowed (→ PERMISSION_DENIED)."""

    code = Code.PERMISSION_DENIED
    reason = "OUTPUT_NOT_ALLOWED"


class OutputNotEmpty(Error):
    """A new job's output location already holds documents (→ FAILED_PRECONDITION)."""

    code = Code.FAILED_PRECONDITION
    reason = "OUTPUT_NOT_EMPTY"


class OutputInUse(Error):
    """The output location is claimed by another job (→ FAILED_PRECONDITION): the location is not in
    the state a new job needs (free), which is not the job itself already existing (ALREADY_EXISTS)."""

    code = Code.FAILED_PRECONDITION
    reason = "OUTPUT_IN_USE"


class OutputNotFolder(Error):
    """Something other than a folder stands where the output location needs one (→ FAILED_PRECONDITION)."""

    code = Code.FAILED_PRECONDITION
    reason = "OUTPUT_NOT_A_FOLDER"


class TooManyJobs(Error):
    """This server already runs as many jobs of the kind as ``max_running_jobs`` allows (→ RESOURCE_EXHAUSTED)."""

    code = Code.RESOURCE_EXHAUSTED
    reason = "TOO_MANY_JOBS"


class OutputSpace(Error):
    """The filesystem a job writes to has less room than the job's worst-case output (→ RESOURCE_EXHAUSTED)."""

    code = Code.RESOURCE_EXHAUSTED
    reason = "OUTPUT_SPACE"


class OutputConflict(Error):
    """The output location holds another job's manifest (→ ABORTED)."""

    code = Code.ABORTED
    reason = "OUTPUT_CONFLICT"


# ---- output locations --------------------------------------------------------------------------

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
    so ``s3://b/data`` does not allow ``s3://b/database``); else OutputNotAllowed."""
    parts = _location_parts(uri, field)
    for prefix in allowed:
        p = _location_parts(prefix, "job_output_prefixes")
        if parts[:len(p)] == p:
            return output_location(prefix, "job_output_prefixes")
    raise OutputNotAllowed(f"{field}: {uri!r} is not under an output prefix this server allows; ask its operator "
                           f"to add it to job_output_prefixes", field=field, uri=uri)


def check_output_allowed(uri: str, allowed: Iterable[str], field: str = "output_uri") -> str:
    """The normalized ``uri`` if it lies at or under one of the ``allowed`` prefixes; else OutputNotAllowed."""
    allowed_prefix(uri, allowed, field)
    return output_location(uri, field)


def _local_path(uri: str) -> str:
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
        path = PurePosixPath(_local_path(uri))
        top = PurePosixPath(_local_path(prefix)) if prefix else path
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
            raise OutputNotAllowed(f"output_uri: {self.location} passes through a symbolic link ({name!r}) below "
                                   f"the allowed prefix; name a real folder", field="output_uri", uri=self.location)
        raise OutputNotFolder(f"output_uri: {self.location} needs a folder where {name!r} is a file",
                              field="output_uri", uri=self.location)

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


# ---- request and status ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class DatasetJobRequest:
    """Images of ``model`` for seeds ``seed_start`` .. ``seed_start + count - 1`` as WebDataset shards."""

    model: str                                   # faces, faces@production or faces/3
    seed_start: int
    count: int
    truncation: float = 1.0
    image_format: str = "png"
    shard_size: int = DEFAULT_SHARD_SIZE
    request_id: str = ""                         # a retry with the same id returns the first call's job
    author: str = "anonymous"
    output_uri: str = ""                         # where shards and manifest go; empty: the registry's store

    def check(self, limits: Limits | None = None) -> None:
        """Seeds, truncation, image format, shard size and request id against their bounds."""
        if not isinstance(self.model, str) or not self.model:
            raise InvalidArgument("model", "give a model reference (faces, faces@production, faces/3)")
        if isinstance(self.count, bool) or not isinstance(self.count, int) or not 1 <= self.count <= MAX_DATASET_IMAGES:
            raise InvalidArgument("seeds.count", f"must be an integer from 1 to {MAX_DATASET_IMAGES}, got {self.count!r}")
        if (isinstance(self.seed_start, bool) or not isinstance(self.seed_start, int) or self.seed_start < 0
                or self.seed_start + self.count - 1 > MAX_SEED):
            raise InvalidArgument("seeds.start", f"the seeds must lie in [0, 2**63), got start {self.seed_start!r}")
        t = self.truncation
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 <= t <= 1.0:
            raise InvalidArgument("truncation", f"must lie in [0, 1], got {t!r}")
        if self.image_format not in IMAGE_FORMATS:
            raise InvalidArgument("image_format", f"must be one of {', '.join(IMAGE_FORMATS)}, got {self.image_format!r}")
        s = self.shard_size
        if isinstance(s, bool) or not isinstance(s, int) or not 1 <= s <= MAX_SHARD_SIZE:
            raise InvalidArgument("shard_size", f"must be an integer from 1 to {MAX_SHARD_SIZE}, got {s!r}")
        if not isinstance(self.request_id, str) or len(self.request_id) > 128:
            raise InvalidArgument("request_id", "must be a string of at most 128 characters")
        if self.output_uri:
            output_location(self.output_uri)


class SeedShards:
    """What every job spec shares: a version, and ``count`` seeds from ``seed_start`` cut into
    shards of ``shard_size`` (dataclass fields of the spec that derives from it)."""

    model: str
    number: int
    seed_start: int
    count: int
    shard_size: int

    @property
    def version_name(self) -> str:
        """``models/{model}/versions/{number}``."""
        return f"models/{self.model}/versions/{self.number}"

    @property
    def seeds(self) -> range:
        """Every seed of the job."""
        return range(self.seed_start, self.seed_start + self.count)

    @property
    def shards(self) -> int:
        """How many shards the job has."""
        return -(-self.count // self.shard_size)

    def shard_seeds(self, index: int) -> range:
        """The seeds of shard ``index``."""
        start = self.seed_start + index * self.shard_size
        return range(start, min(start + self.shard_size, self.seed_start + self.count))

    def to_json(self) -> bytes:
        """The stored form."""
        return json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes):
        """Inverse of ``to_json``."""
        return cls(**json.loads(data))


@dataclasses.dataclass(frozen=True)
class JobSpec(SeedShards):
    """A created job: the request with its reference resolved to one version (``job.json``)."""

    id: str
    model: str
    number: int
    seed_start: int
    count: int
    truncation: float
    image_format: str
    shard_size: int
    created: str                                 # ISO 8601, UTC
    author: str = "anonymous"
    request_id: str = ""
    output_uri: str = ""                         # normalized output location; empty: the registry's store
    output_prefix: str = ""                      # the allowed prefix it lies under (links below it are refused)


@dataclasses.dataclass
class JobStatus:
    """A job as the store records it."""

    spec: JobSpec
    state: str                                   # RUNNING, SUCCEEDED, CANCELLED or FAILED
    shards_done: int
    images_done: int
    updated: str                                 # ISO 8601 of the last record seen (the creation if none)
    manifest: dict | None = None                 # once SUCCEEDED
    manifest_uri: str = ""
    error: dict | None = None                    # once FAILED: code, reason, message

    @property
    def done(self) -> bool:
        """Whether the job has stopped for good (succeeded, cancelled or failed)."""
        return self.state != RUNNING


def _key(job_id: str, name: str) -> str:
    return f"{PREFIX}{job_id}/{name}"


def shard_name(index: int) -> str:
    """The file name of shard ``index``."""
    return f"shard-{index:06d}.tar"


def _record_key(job_id: str, index: int) -> str:
    return _key(job_id, f"done/{index:06d}.json")


def _uri(store: BlobStore, key: str) -> str:
    """Where document ``key`` of ``store`` can be read without this API; the key if nowhere."""
    try:
        return store.document_uri(key)
    except NotImplementedError:
        return key


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")


def output_bytes(count: int, shards: int, resolution: int) -> int:
    """The most bytes a dataset job's shards can take: per image a PNG no larger than its raw RGB
    (plus a filter byte per row and the format's headers), a JSON file, and their tar headers and
    padding; per shard the tar's end blocks and record padding."""
    png = 3 * resolution * resolution + resolution + 256 + 5 * (3 * resolution * resolution // 65535 + 1)
    return count * (png + 511 + 3 * 512) + shards * tarfile.RECORDSIZE


def _in_use(spec: JobSpec, holder: str) -> OutputInUse:
    return OutputInUse(f"output_uri: {spec.output_uri} belongs to {holder}; name another location (or delete "
                       f"that job)", field="output_uri", uri=spec.output_uri, job=holder.split("/")[-1])


def _existing_folder(where) -> str | None:
    """The nearest existing folder of a local path or ``file://`` URI (what a write there fills); None for S3."""
    text = str(where)
    if text.startswith("s3://"):
        return None
    path = Path(_local_path(text) if text.startswith("file://") else text)
    for folder in (path, *path.parents):
        if folder.is_dir():
            return str(folder)
    return None


# ---- one shard ---------------------------------------------------------------------------------

def shard_tar(spec: JobSpec, seeds: range, pngs: Iterable[bytes]) -> bytes:
    """The WebDataset tar of one shard: ``{key}.png`` and ``{key}.json`` per seed, deterministic bytes.

    Headers carry no time, owner or order that depends on the run, so a retry writes the same bytes.
    """
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for seed, png in zip(seeds, pngs, strict=True):
            key = f"{seed:09d}"
            meta = json.dumps({"seed": seed, "version": spec.version_name, "truncation": spec.truncation},
                              sort_keys=True).encode()
            for name, data in ((f"{key}.png", png), (f"{key}.json", meta)):
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def publish_shard(store: BlobStore, spec: JobSpec, index: int, data: bytes, *, prefix: str = PREFIX,
                  name: str | None = None, out: BlobStore | None = None) -> dict:
    """Commit shard ``index``: publish its bytes, read them back, verify sha256, then write its record.

    ``prefix`` and ``name`` place another kind of job's shard (``jobs/statistics/``, ``.safetensors``).
    ``out``: the store of the job's output location, which gets the shard at key ``name`` (the
    record still goes to ``store``, with the job's other records); None: ``store`` gets both.

    ``create`` shows all of the tar or none of it; a shard an earlier attempt (a killed worker, a
    previous server) already published is verified, not rewritten. Only verified shards get a
    record, and only records count as progress. DATA_LOSS if the stored bytes differ.
    """
    sha = sha256_hex(data)
    name = name or shard_name(index)
    target = out if out is not None else store
    key = name if out is not None else f"{prefix}{spec.id}/{name}"
    record_key = f"{prefix}{spec.id}/done/{index:06d}.json"
    try:
        target.create(key, data)
    except AlreadyExists:
        log.info("shard already published", extra={"event": "shard_exists", "job": spec.id, "shard": index})
    stored = hashlib.sha256(target.read(key)).hexdigest()
    if stored != sha:
        raise DataLoss(Reason.BLOB_CORRUPT, f"shard {key} holds bytes hashing to {stored}, expected {sha}",
                       key=key, sha256=sha, actual=stored)
    seeds = spec.shard_seeds(index)
    record = {"index": index, "name": name, "key": key, "samples": len(seeds),
              "first_seed": seeds.start, "sha256": sha, "size_bytes": len(data), "written": _now()}
    try:
        store.create(record_key, json.dumps(record, sort_keys=True).encode())
    except AlreadyExists:
        prior = json.loads(store.read(record_key))
        if prior["sha256"] != sha:
            raise DataLoss(Reason.BLOB_CORRUPT, f"shard {key} was recorded with sha256 {prior['sha256']}, "
                                                f"now {sha}", key=key) from None
        record = prior
    return record


# ---- executors ---------------------------------------------------------------------------------

def render_pngs(model, seeds: range, truncation: float, batch_size: int, progress: Progress) -> list[bytes]:
    """PNGs of ``seeds`` drawn straight from a generator, byte-identical to what ``Domain.sample`` gives.

    For executors that hold a generator of their own (a Ray worker): ``sampling.sample`` pads every
    forward pass to a fixed bucket, so the images do not depend on ``batch_size`` or on what Sample
    batched them with, and ``png_bytes`` is the encoder Sample uses.
    """
    out: list[bytes] = []
    for start in range(seeds.start, seeds.stop, batch_size):
        progress.check(f"seeds from {start}")
        chunk = list(range(start, min(start + batch_size, seeds.stop)))
        images = sample(model, seeds=chunk, truncation=truncation, batch_size=batch_size)
        out += [png_bytes(img) for img in to_uint8(images).numpy()]
    return out


class Executor(abc.ABC):
    """Where a job's shards run; ``run_shards`` yields each shard's commit record as it completes."""

    @abc.abstractmethod
    def run_shards(self, spec: JobSpec, indices: list[int], progress: Progress) -> Iterator[dict]:
        """Run shards ``indices`` of ``spec``; stop starting new ones once ``progress`` is stopped."""

    def close(self) -> None:
        """Release workers."""


class LocalExecutor(Executor):
    """The embedded default: shards on a bounded ``concurrent.futures`` thread pool in the server.

    Threads rather than processes: the version stays resident once, torch and zlib release the
    GIL, and the images come from ``Domain.sample`` itself, the path Sample takes.
    """

    def __init__(self, domain, max_workers: int = 2, outputs: OutputStores | None = None):
        self.domain = domain
        self.max_workers = max_workers
        # The stores of output locations, opened with the server's S3 settings (DatasetJobs shares them).
        self.outputs = outputs if outputs is not None else OutputStores(getattr(domain, "s3_config", None))
        self._pool = cf.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="dataset-shard")

    def render(self, spec: JobSpec, seeds: range, progress: Progress) -> list[bytes]:
        """PNGs of ``seeds``, drawn through ``Domain.sample`` in passes of at most one Sample request."""
        step = max(1, min(self.domain.max_batch, self.domain.limits.max_images))
        ref = f"{spec.model}/{spec.number}"
        out: list[bytes] = []
        for start in range(seeds.start, seeds.stop, step):
            chunk = list(range(start, min(start + step, seeds.stop)))
            result = self.domain.sample(SampleRequest(model=ref, seeds=chunk, truncation=spec.truncation), progress)
            out += [png_bytes(img) for img in result.images.cpu().numpy()]
        return out

    def _shard(self, spec: JobSpec, index: int, progress: Progress) -> dict:
        progress.check(f"shard {index}")
        seeds = spec.shard_seeds(index)
        data = shard_tar(spec, seeds, self.render(spec, seeds, progress))
        out = self.outputs.open(spec.output_uri, spec.output_prefix) if spec.output_uri else None
        return publish_shard(self.domain.registry.store, spec, index, data, out=out)

    def run_shards(self, spec: JobSpec, indices: list[int], progress: Progress) -> Iterator[dict]:
        """At most ``max_workers`` of this job's shards in flight; none started once stopped."""
        todo = list(indices)
        running: set[cf.Future] = set()
        try:
            while todo or running:
                while todo and len(running) < self.max_workers and not progress.stopped():
                    running.add(self._pool.submit(self._shard, spec, todo.pop(0), progress))
                if not running:
                    return
                finished, running = cf.wait(running, return_when=cf.FIRST_COMPLETED)
                for f in finished:
                    yield f.result()
        finally:
            for f in running:          # an error or a stop: the rest may finish (whole) or not start
                f.cancel()
            cf.wait(running)

    def close(self) -> None:
        """Stop the pool (queued shards are dropped; a running one finishes whole)."""
        self._pool.shutdown(wait=True, cancel_futures=True)


# ---- jobs --------------------------------------------------------------------------------------

class DatasetJobs:
    """Dataset jobs over a domain's registry store, run by an ``Executor``.

    Other kinds of job (``stat_jobs.StatisticsJobs``) reuse the store layout, commit records,
    cancel/resume and LRO reads by overriding ``prefix``, ``noun``, ``spec_type``, ``_run_shards``
    and ``_finish``.
    """

    prefix = PREFIX                   # where this kind's jobs live in the store
    noun = "dataset"                  # in messages, log events and progress
    spec_type = JobSpec               # what ``job.json`` holds

    def _doc(self, job_id: str, name: str) -> str:
        return f"{self.prefix}{job_id}/{name}"

    def _record(self, job_id: str, index: int) -> str:
        return self._doc(job_id, f"done/{index:06d}.json")

    def __init__(self, domain, executor: Executor | None = None, max_workers: int = 2,
                 output_prefixes: Iterable[str] = ()):
        self.domain = domain
        self.store: BlobStore = domain.registry.store
        self.executor = executor if executor is not None else LocalExecutor(domain, max_workers)
        # What a caller may name as output_uri: the server writes there with its own credentials.
        self.output_prefixes = tuple(output_location(p, "job_output_prefixes") for p in output_prefixes)
        self.outputs: OutputStores = (getattr(self.executor, "outputs", None)
                                      or OutputStores(getattr(domain, "s3_config", None)))
        self._runners: dict[str, tuple[threading.Thread, threading.Event]] = {}
        self._lock = threading.Lock()
        self._closed = False
        self._cancelled_ids: set[str] = set()
        self._cancel_checked: dict[str, float] = {}
        self._admitting = 0               # creates between their admission and their runner's start

    # -- create and run

    def create(self, request: DatasetJobRequest) -> JobStatus:
        """Resolve the reference, record the job in the store and start it; a known ``request_id``
        returns its job as it stands."""
        request.check(self.domain.limits)
        prefix = allowed_prefix(request.output_uri, self.output_prefixes) if request.output_uri else ""
        output = output_location(request.output_uri) if request.output_uri else ""
        version: Version = self.domain.resolve(request.model)
        res = self.domain.generator(version)
        try:
            res.model.check_truncation(request.truncation)
        except ValueError as exc:
            raise InvalidArgument("truncation", str(exc)) from None
        job_id = (hashlib.sha256(request.request_id.encode()).hexdigest()[:24] if request.request_id
                  else f"{time.time_ns() // 1_000_000:013x}{secrets.token_hex(6)}")
        spec = JobSpec(job_id, version.model, version.number, request.seed_start, request.count,
                       float(request.truncation), request.image_format, request.shard_size, _now(), request.author,
                       request.request_id, output, prefix)
        if not self.store.list_keys(self._doc(job_id, "job.json"), limit=1):      # a new job, not a retry
            self._check_output_size(spec, res.model.resolution)
            if output:
                self._check_output_free(spec)
        return self._create(spec)

    def _check_output_size(self, spec: JobSpec, resolution: int) -> None:
        """Refuse a job whose worst-case output is over ``max_job_output_bytes``, or over the free
        space of the filesystem it writes to (the registry's folder or its output location)."""
        need = output_bytes(spec.count, spec.shards, resolution)
        limit = getattr(self.domain.limits, "max_job_output_bytes", 0)
        if limit and need > limit:
            raise InvalidArgument("seeds.count", f"{spec.count:,} images of {resolution}x{resolution} make up to "
                                                 f"{need / 2**30:.2f} GiB of shards, over the {limit / 2**30:g} GiB "
                                                 f"one job may write (server setting max_job_output_gb)")
        folder = _existing_folder(spec.output_uri or self.store.uri)
        if folder is None:
            return                      # S3: no free space to ask about
        free = shutil.disk_usage(folder).free
        if need > free:
            raise OutputSpace(f"{spec.count:,} images of {resolution}x{resolution} make up to {need / 2**30:.2f} GiB "
                              f"of shards, but {folder} has {free / 2**30:.2f} GiB free; free space or ask for fewer "
                              f"images", field="seeds.count", needed_bytes=need, free_bytes=free)

    def _check_output_free(self, spec: JobSpec) -> None:
        """Refuse a new job's output location that another job claimed, or that holds other documents:
        another job's shards there would meet this job's (same names, other bytes) only after the work."""
        out = self.output_store(spec)
        holder = self._claimant(out)
        if holder:
            raise _in_use(spec, holder)
        if out.list_keys("", limit=1):
            raise OutputNotEmpty(f"output_uri: {spec.output_uri} already holds documents; name an empty prefix (or "
                                 f"delete the job that wrote there)", field="output_uri", uri=spec.output_uri)

    @staticmethod
    def _claimant(out: BlobStore) -> str:
        """The job (``datasetJobs/{id}``) whose claim the output store holds; empty if none."""
        try:
            return json.loads(out.read(CLAIM)).get("job", "")
        except RegistryNotFound:
            return ""

    def _claim(self, spec) -> None:
        """Make the job's output location its own with one conditional create in the output store,
        so that of two jobs naming it exactly one gets it, on a filesystem as on S3; a job that holds
        it already (a retry, a resumed job) keeps it. OutputInUse if another job holds it."""
        out = self.output_store(spec)
        if out is None:
            return
        mine = f"datasetJobs/{spec.id}"
        try:
            out.create(CLAIM, json.dumps({"job": mine, "created": spec.created}, sort_keys=True).encode())
            return
        except AlreadyExists:
            holder = self._claimant(out)
        if holder != mine:
            raise _in_use(spec, holder)

    def output_store(self, spec) -> BlobStore | None:
        """The store of the job's output location; None when it writes into the registry's store."""
        uri = getattr(spec, "output_uri", "")
        return self.outputs.open(uri, spec.output_prefix) if uri else None

    def _create(self, spec) -> JobStatus:
        """Record ``spec`` as ``job.json``, claim its output location and start it, within
        ``max_running_jobs``; a job already recorded under its id (a replayed request id) is started
        if need be and returned as it stands."""
        job_id = spec.id
        if not self.store.list_keys(self._doc(job_id, "job.json"), limit=1):
            with self._admission():
                try:
                    self.store.create(self._doc(job_id, "job.json"), spec.to_json())
                except AlreadyExists:
                    pass                # the same request id, created at this moment by another call
                else:
                    try:
                        self._claim(spec)
                    except BaseException:
                        self.store.delete(self._doc(job_id, "job.json"))       # refused: it never was a job
                        raise
                    log.info(f"{self.noun} job created", extra={"event": f"{self.noun}_job_created", "job": job_id,
                                                               "version": spec.version_name, "samples": spec.count,
                                                               "shards": spec.shards})
                    self._start(spec)
                    return self.get(job_id)
        log.info(f"{self.noun} job replayed", extra={"event": f"{self.noun}_job_replayed", "job": job_id})
        self._start(self._spec(job_id))
        return self.get(job_id)

    @contextlib.contextmanager
    def _admission(self) -> Iterator[None]:
        """A slot among the ``max_running_jobs`` jobs of this kind this process runs (held until the
        job's runner is registered), or TooManyJobs before anything is recorded."""
        limit = getattr(self.domain.limits, "max_running_jobs", 0)
        with self._lock:
            running = len(self._runners) + self._admitting
            if limit and running >= limit:
                raise TooManyJobs(f"this server runs {running} {self.noun} jobs, its bound (server setting "
                                  f"max_running_jobs); retry once one has finished, or cancel one",
                                  running=running, limit=limit)
            self._admitting += 1
        try:
            yield
        finally:
            with self._lock:
                self._admitting -= 1

    def resume(self) -> list[str]:
        """Start every unfinished job in the store that this process does not run; their ids."""
        started = []
        for job_id in self.store.list_children(self.prefix):
            try:
                status = self.get(job_id)
            except (Error, ValueError, KeyError, TypeError) as exc:
                log.warning(f"{self.noun} job unreadable", extra={"event": f"{self.noun}_job_unreadable",
                                                                  "job": job_id, "error": str(exc)})
                continue
            if not status.done and self._start(status.spec):
                log.info(f"{self.noun} job resumed", extra={"event": f"{self.noun}_job_resumed", "job": job_id,
                                                           "shards_done": status.shards_done})
                started.append(job_id)
        return started

    def _start(self, spec: JobSpec) -> bool:
        with self._lock:
            if self._closed or spec.id in self._runners or self._terminal(spec.id):
                return False
            stop = threading.Event()
            thread = threading.Thread(target=self._run, args=(spec, stop), name=f"{self.noun}-job-{spec.id}", daemon=True)
            self._runners[spec.id] = (thread, stop)
        thread.start()
        return True

    def _run(self, spec: JobSpec, stop: threading.Event) -> None:
        def stopped() -> bool:
            return stop.is_set() or self._cancelled(spec.id)

        def event(e) -> None:
            log.info(f"{self.noun} shard", extra={"event": f"{self.noun}_shard", "job": spec.id,
                                                  "shards_done": e.done, "shards_total": e.total, **e.info})
        progress = Progress(event, stopped)
        try:
            self._claim(spec)           # a job created before claims existed, or whose create died after job.json
            done = self._done_indices(spec.id)
            todo = [i for i in range(spec.shards) if i not in done]
            images = sum(len(spec.shard_seeds(i)) for i in done)
            for record in self._run_shards(spec, todo, progress):
                done.add(record["index"])
                images += record["samples"]
                progress.report(self.noun, len(done), spec.shards, samples_done=images, samples_total=spec.count)
            if len(done) == spec.shards and not stopped():
                self._finish(spec)
        except Cancelled:
            pass
        except Exception as exc:  # noqa: BLE001 -- recorded in the job, which the caller reads
            if stop.is_set():
                return                  # the server is stopping: the next one resumes the job
            if self._cancelled_safe(spec.id):
                # What a shard raises once its job was cancelled (a queue it left, a pool shutting
                # down) is how it stopped, not why: the job ends CANCELLED.
                log.info(f"{self.noun} job stopped by its cancel", extra={
                    "event": f"{self.noun}_job_cancel_error", "job": spec.id, "error": type(exc).__name__})
                return
            self._fail(spec, exc)
        finally:
            with self._lock:
                self._runners.pop(spec.id, None)

    def _run_shards(self, spec, indices: list[int], progress: Progress) -> Iterator[dict]:
        """Shards ``indices`` of ``spec`` run, yielding each commit record as it completes."""
        return self.executor.run_shards(spec, indices, progress)

    def _finish(self, spec: JobSpec) -> None:
        records = [json.loads(self.store.read(self._record(spec.id, i))) for i in range(spec.shards)]
        manifest = {
            "job": f"datasetJobs/{spec.id}", "version": spec.version_name, "model": spec.model,
            "number": spec.number, "lineage": self._lineage(spec), "created": spec.created,
            "seeds": {"start": spec.seed_start, "count": spec.count}, "truncation": spec.truncation,
            "image_format": spec.image_format, "shard_size": spec.shard_size, "samples": spec.count,
            "shards": [{**{k: r[k] for k in ("name", "key", "samples", "first_seed", "sha256", "size_bytes")},
                        "uri": self.shard_uri(spec, r["name"])} for r in records],
            "output_uri": spec.output_uri,
        }
        data = json.dumps(manifest, indent=1, sort_keys=True).encode()
        out = self.output_store(spec)
        if out is not None:            # the caller's copy first: a succeeded job always has it
            try:
                out.create("manifest.json", data)
            except AlreadyExists:
                prior = json.loads(out.read("manifest.json"))
                if prior.get("job") != manifest["job"]:
                    raise OutputConflict(f"{spec.output_uri} holds the manifest of {prior.get('job')}, not of "
                                         f"{manifest['job']}", field="output_uri", job=spec.id) from None
        try:
            self.store.create(self._doc(spec.id, "manifest.json"), data)
        except AlreadyExists:
            pass                        # another replica finished the same job; the shards are the same
        log.info("dataset job done", extra={"event": "dataset_job_done", "job": spec.id, "shards": spec.shards})

    def _lineage(self, spec: JobSpec) -> list[dict]:
        """The version and its ancestors, import first, each with how it was made (its spec)."""
        chain, number = [], spec.number
        while number is not None:
            v = self.domain.registry.get_version(spec.model, number)
            chain.append({"version": v.name, "kind": v.kind, "parent": v.parent, "spec": v.spec,
                          "created": v.created_at.isoformat()})
            number = v.parent
        return chain[::-1]

    def _fail(self, spec: JobSpec, exc: BaseException) -> None:
        code = exc.code.value if isinstance(exc, Error) else Code.INTERNAL.value
        reason = exc.reason if isinstance(exc, Error) else "INTERNAL"
        message = exc.message if isinstance(exc, Error) else "internal error; see the server log"
        log.error(f"{self.noun} job failed", exc_info=not isinstance(exc, Error),
                  extra={"event": f"{self.noun}_job_failed", "job": spec.id, "reason": reason})
        try:
            self.store.create(self._doc(spec.id, "failed.json"),
                              json.dumps({"code": code, "reason": reason, "message": message, "at": _now()}).encode())
        except AlreadyExists:
            pass
        except Exception:  # noqa: BLE001 -- the store itself failed: the job stays resumable
            log.exception("could not record the failure", extra={"event": f"{self.noun}_job_fail_unrecorded",
                                                                 "job": spec.id})

    # -- read

    def _cancelled(self, job_id: str, fresh: bool = False) -> bool:
        """Whether the job was cancelled, here or by another replica (the store asked at most every
        ``CANCEL_POLL_S``, since sampling polls this often, unless ``fresh``)."""
        with self._lock:
            if job_id in self._cancelled_ids:
                return True
            now = time.monotonic()
            if not fresh and now - self._cancel_checked.get(job_id, -CANCEL_POLL_S) < CANCEL_POLL_S:
                return False
            self._cancel_checked[job_id] = now
        if self.store.list_keys(self._doc(job_id, "cancelled.json"), limit=1):
            with self._lock:
                self._cancelled_ids.add(job_id)
            return True
        return False

    def _cancelled_safe(self, job_id: str) -> bool:
        """``_cancelled`` asked of the store now; False if the store cannot say (the failure is recorded then)."""
        try:
            return self._cancelled(job_id, fresh=True)
        except Exception:  # noqa: BLE001 -- the store is down: record the failure the runner met
            return False

    def _terminal(self, job_id: str) -> bool:
        names = {k[len(self._doc(job_id, "")):] for k in self.store.list_keys(self._doc(job_id, ""))}
        return bool(names & {"manifest.json", "cancelled.json", "failed.json"})

    def _spec(self, job_id: str) -> JobSpec:
        if not isinstance(job_id, str) or not _JOB_ID.match(job_id):
            raise JobNotFound(f"no {self.noun} job {job_id!r}", field="name", job=job_id)
        try:
            return self.spec_type.from_json(self.store.read(self._doc(job_id, "job.json")))
        except RegistryNotFound:
            raise JobNotFound(f"no {self.noun} job {job_id!r}", field="name", job=job_id) from None

    def _done_indices(self, job_id: str) -> set[int]:
        return {int(k.rsplit("/", 1)[-1].split(".")[0]) for k in self.store.list_keys(self._doc(job_id, "done/"))}

    def get(self, job_id: str) -> JobStatus:
        """The job's spec, state and progress as the store has them; ``JobNotFound`` if absent."""
        spec = self._spec(job_id)
        keys = self.store.list_keys(self._doc(job_id, ""))
        names = {k[len(self._doc(job_id, "")):] for k in keys}
        done = sorted(int(n[len("done/"):-len(".json")]) for n in names if n.startswith("done/"))
        images = sum(len(spec.shard_seeds(i)) for i in done)
        status = JobStatus(spec, RUNNING, len(done), images, spec.created)
        if done:
            status.updated = json.loads(self.store.read(self._record(job_id, done[-1]))).get("written", spec.created)
        if "manifest.json" in names:
            status.state = SUCCEEDED
            status.manifest = json.loads(self.store.read(self._doc(job_id, "manifest.json")))
            out = self.output_store(spec)
            status.manifest_uri = (_uri(out, "manifest.json") if out is not None
                                   else self._uri(self._doc(job_id, "manifest.json")))
        elif "cancelled.json" in names:
            status.state = CANCELLED    # before a failure: a runner may have failed on its way out of a cancel
        elif "failed.json" in names:
            status.state, status.error = FAILED, json.loads(self.store.read(self._doc(job_id, "failed.json")))
        return status

    def list(self, page_size: int = 50, page_token: str = "") -> tuple[list[JobStatus], str]:
        """Jobs by id (creation order for ids this module made), a page at a time; the next page's token."""
        page_size = page_size if 0 < page_size <= 1000 else 50
        ids = [i for i in self.store.list_children(self.prefix) if i > page_token]
        page = ids[:page_size]
        out = []
        for job_id in page:
            try:
                out.append(self.get(job_id))
            except JobNotFound:
                continue                # deleted meanwhile
        return out, (page[-1] if len(ids) > page_size else "")

    def shard_uri(self, spec: JobSpec, name: str) -> str:
        """Where shard ``name`` of a job can be read (``file://`` or ``s3://``): in its output location
        if it names one, else in the registry's store."""
        out = self.output_store(spec)
        return _uri(out, name) if out is not None else self._uri(self._doc(spec.id, name))

    def _uri(self, key: str) -> str:
        return _uri(self.store, key)

    # -- cancel, wait, delete

    def cancel(self, job_id: str) -> JobStatus:
        """Stop the job between shards (in every process that runs it); a finished job stays as it is."""
        status = self.get(job_id)
        if not status.done:
            try:
                self.store.create(self._doc(job_id, "cancelled.json"), json.dumps({"at": _now()}).encode())
            except AlreadyExists:
                pass
            with self._lock:
                self._cancelled_ids.add(job_id)
            log.info(f"{self.noun} job cancelled", extra={"event": f"{self.noun}_job_cancelled", "job": job_id})
        return self.get(job_id)

    def wait(self, job_id: str, timeout_s: float, should_stop: Callable[[], bool] | None = None) -> JobStatus:
        """The job once it is done, or as it stands after ``timeout_s`` (or once ``should_stop()``)."""
        deadline = time.monotonic() + max(0.0, timeout_s)
        status = self.get(job_id)
        while not status.done and time.monotonic() < deadline and not (should_stop and should_stop()):
            time.sleep(min(WAIT_POLL_S, max(0.0, deadline - time.monotonic())))
            status = self.get(job_id)
        if status.state == CANCELLED:
            self.join(job_id, max(0.0, deadline - time.monotonic()))
        return status

    def join(self, job_id: str, timeout_s: float = 30.0) -> bool:
        """Wait until this process no longer runs the job; whether it stopped in time."""
        with self._lock:
            runner = self._runners.get(job_id)
        if runner is not None:
            runner[0].join(timeout_s)
            return not runner[0].is_alive()
        return True

    def delete(self, job_id: str) -> None:
        """Remove a finished job: its shards, records, markers and manifest; FAILED_PRECONDITION while it runs."""
        status = self.get(job_id)
        if not status.done or not self.join(job_id, 0.0):
            raise JobNotFinished(f"{self.noun} job {job_id} still runs; cancel it first", field="name", job=job_id)
        out = self.output_store(status.spec)
        if out is not None:
            # Only what this job verified as its own: recorded shards, and the manifest once it succeeded.
            names = [json.loads(self.store.read(k))["name"] for k in self.store.list_keys(self._doc(job_id, "done/"))]
            for name in names + (["manifest.json"] if status.state == SUCCEEDED else []):
                out.delete(name)
            if self._claimant(out) == f"datasetJobs/{job_id}":
                out.delete(CLAIM)      # last: the location is free once nothing of the job is left in it
        for key in sorted(self.store.list_keys(self._doc(job_id, "")), key=lambda k: k.endswith("job.json")):
            self.store.delete(key)     # job.json last: a half-deleted job stays visible and deletable

    # -- shutdown

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop this process's runners between shards (their jobs stay resumable) and the executor."""
        with self._lock:
            self._closed = True
            runners = list(self._runners.values())
        for _, stop in runners:
            stop.set()
        for thread, _ in runners:
            thread.join(timeout_s)
        self.executor.close()
        self.outputs.close()
