"""Jobs kept in the object store: the ``JobKind`` that dataset and statistics jobs share.

- ``StoredJobs(domain, executor)``: ``create`` (a kind's request → a spec → ``_create``), ``get``,
  ``list``, ``cancel``, ``wait``, ``join``, ``delete``; ``resume()`` picks up the unfinished jobs in
  the store (a restarted server); ``close()`` stops this process's runners without cancelling
  their jobs. A kind says what its spec is (``spec_type``: prefix, shard bytes), what a finished
  job's manifest holds (``_finish``) and, if it writes elsewhere, how it claims and releases that
  place (``_claim``, ``_release``). Its shards run on the ``Executor`` it is given.
- ``JobStatus``: a job as the store records it: spec, state, progress, and the manifest once done.

Store layout (documents under ``{prefix}{id}/``), append-only because the store's only mutation is
a conditional create: ``job.json`` (the spec, its reference resolved to one immutable version);
the kind's shards; ``done/{i:06d}.json``, shard ``i``'s commit record (``shards.publish_shard``);
``cancelled.json``, ``failed.json``: terminal markers (a cancel wins over a failure: whatever a
shard raises on its way out of a cancel is not recorded); ``manifest.json``: the finished job.
A job's progress is the set of its commit records, so a new server resumes from them and never
writes a shard twice.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import re
import threading
import time
from typing import Callable, Iterator

from rulewright.registry.blobstore import BlobStore
from rulewright.registry.errors import AlreadyExists, NotFound as RegistryNotFound

from rulewright.service.engine.errors import Cancelled
from rulewright.service.engine.progress import Progress
from rulewright.service.errors import Code, Error
from rulewright.service.jobs.errors import JobNotFinished, JobNotFound, TooManyJobs
from rulewright.service.jobs.protocol import CANCELLED, FAILED, RUNNING, SUCCEEDED, Runner
from rulewright.service.jobs.shards import Executor, LocalExecutor, SeedShards, now

log = logging.getLogger(__name__)

WAIT_POLL_S = 0.2                    # how often ``wait`` looks at the store
CANCEL_POLL_S = 0.5                  # how often a runner asks the store whether its job was cancelled
MARKERS = ("manifest.json", "cancelled.json", "failed.json")
_JOB_ID = re.compile(r"^[0-9a-f]{8,64}$")


@dataclasses.dataclass
class JobStatus:
    """A job as the store records it."""

    spec: SeedShards
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


def store_uri(store: BlobStore, key: str) -> str:
    """Where document ``key`` of ``store`` can be read without this API; the key if nowhere."""
    try:
        return store.document_uri(key)
    except NotImplementedError:
        return key


class StoredJobs:
    """Jobs of one kind over a domain's registry store, their shards run by an ``Executor``."""

    noun = "job"                      # in messages, log events and progress
    resource = "jobs"                 # a job's name in manifests: ``{resource}/{id}``
    spec_type: type = SeedShards      # what ``job.json`` holds

    def __init__(self, domain, executor: Executor | None = None, max_workers: int = 2):
        self.domain = domain
        self.store: BlobStore = domain.registry.store
        self.executor = executor if executor is not None else LocalExecutor(domain, max_workers)
        self.executor.attach()
        self.runner = Runner(f"{self.noun}-job")
        self._lock = threading.Lock()
        self._cancelled_ids: set[str] = set()
        self._cancel_checked: dict[str, float] = {}
        self._admitting = 0               # creates between their admission and their runner's start

    @property
    def prefix(self) -> str:
        """Where this kind's jobs live in the store."""
        return self.spec_type.prefix

    def _doc(self, job_id: str, name: str) -> str:
        return f"{self.prefix}{job_id}/{name}"

    def _record(self, job_id: str, index: int) -> str:
        return self._doc(job_id, f"done/{index:06d}.json")

    def _uri(self, key: str) -> str:
        return store_uri(self.store, key)

    # -- the kind's hooks

    def _claim(self, spec) -> None:
        """Make the place the job writes to its own (nothing: the registry's store is every job's)."""

    def _release(self, status: JobStatus) -> None:
        """Remove what a deleted job left outside the registry's store (nothing by default)."""

    def _finish(self, spec) -> None:
        """Write the finished job's manifest (every shard is recorded)."""
        raise NotImplementedError

    def manifest_uri(self, spec) -> str:
        """Where a finished job's manifest can be read."""
        return self._uri(self._doc(spec.id, "manifest.json"))

    # -- create and run

    def _create(self, spec) -> JobStatus:
        """Record ``spec`` as ``job.json``, claim its output and start it, within ``max_running_jobs``; a
        job already recorded under its id (a replayed request id) is started if need be and returned."""
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
            running = len(self.runner) + self._admitting
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

    def _start(self, spec) -> bool:
        if spec.id in self.runner or self._terminal(spec.id):
            return False
        return self.runner.start(spec.id, lambda stop: self._run(spec, stop)) is not None

    def _run(self, spec, stop: threading.Event) -> None:
        def stopped() -> bool:
            return stop.is_set() or self._cancelled(spec.id)
        try:
            self._claim(spec)           # a job created before claims existed, or whose create died after job.json
            done = self._run_all(spec, Progress(lambda e: self._shard_event(spec, e), stopped))
            if done == spec.shards and not stopped():
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

    def _run_all(self, spec, progress: Progress) -> int:
        """The shards not yet recorded, run on the executor, progress reported as each is recorded;
        how many are recorded now."""
        done = self._done_indices(spec.id)
        todo = [i for i in range(spec.shards) if i not in done]
        samples = sum(len(spec.shard_seeds(i)) for i in done)
        for record in self._run_shards(spec, todo, progress):
            done.add(record["index"])
            samples += record["samples"]
            progress.report(self.noun, len(done), spec.shards, samples_done=samples, samples_total=spec.count)
        return len(done)

    def _shard_event(self, spec, e) -> None:
        log.info(f"{self.noun} shard", extra={"event": f"{self.noun}_shard", "job": spec.id,
                                              "shards_done": e.done, "shards_total": e.total, **e.info})

    def _run_shards(self, spec, indices: list[int], progress: Progress) -> Iterator[dict]:
        """Shards ``indices`` of ``spec`` run, yielding each commit record as it completes."""
        return self.executor.run_shards(spec, indices, progress)

    def _records(self, spec) -> list[dict]:
        """Every shard's commit record, in order."""
        return [json.loads(self.store.read(self._record(spec.id, i))) for i in range(spec.shards)]

    def _lineage(self, spec) -> list[dict]:
        """The version and its ancestors, import first, each with how it was made (its spec)."""
        chain, number = [], spec.number
        while number is not None:
            v = self.domain.registry.get_version(spec.model, number)
            chain.append({"version": v.name, "kind": v.kind, "parent": v.parent, "spec": v.spec,
                          "created": v.created_at.isoformat()})
            number = v.parent
        return chain[::-1]

    def _write_manifest(self, spec, manifest: dict, **logged) -> bytes:
        """``manifest.json`` of the job, once (another replica that finished the same job wrote the same);
        ``logged``: more fields for the log event."""
        data = json.dumps(manifest, indent=1, sort_keys=True).encode()
        try:
            self.store.create(self._doc(spec.id, "manifest.json"), data)
        except AlreadyExists:
            pass
        log.info(f"{self.noun} job done", extra={"event": f"{self.noun}_job_done", "job": spec.id,
                                                 "shards": spec.shards, **logged})
        return data

    def _fail(self, spec, exc: BaseException) -> None:
        code = exc.code.value if isinstance(exc, Error) else Code.INTERNAL.value
        reason = exc.reason if isinstance(exc, Error) else "INTERNAL"
        message = exc.message if isinstance(exc, Error) else "internal error; see the server log"
        log.error(f"{self.noun} job failed", exc_info=not isinstance(exc, Error),
                  extra={"event": f"{self.noun}_job_failed", "job": spec.id, "reason": reason})
        try:
            self.store.create(self._doc(spec.id, "failed.json"),
                              json.dumps({"code": code, "reason": reason, "message": message, "at": now()}).encode())
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
            now_s = time.monotonic()
            if not fresh and now_s - self._cancel_checked.get(job_id, -CANCEL_POLL_S) < CANCEL_POLL_S:
                return False
            self._cancel_checked[job_id] = now_s
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

    def _names(self, job_id: str) -> set[str]:
        """The names of the job's documents (below its folder)."""
        return {k[len(self._doc(job_id, "")):] for k in self.store.list_keys(self._doc(job_id, ""))}

    def _terminal(self, job_id: str) -> bool:
        return bool(self._names(job_id) & set(MARKERS))

    def _spec(self, job_id: str):
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
        names = self._names(job_id)
        done = sorted(int(n[len("done/"):-len(".json")]) for n in names if n.startswith("done/"))
        status = JobStatus(spec, RUNNING, len(done), sum(len(spec.shard_seeds(i)) for i in done), spec.created)
        if done:
            status.updated = json.loads(self.store.read(self._record(job_id, done[-1]))).get("written", spec.created)
        if "manifest.json" in names:
            status.state = SUCCEEDED
            status.manifest = json.loads(self.store.read(self._doc(job_id, "manifest.json")))
            status.manifest_uri = self.manifest_uri(spec)
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

    # -- cancel, wait, delete

    def cancel(self, job_id: str) -> JobStatus:
        """Stop the job between shards (in every process that runs it); a finished job stays as it is."""
        status = self.get(job_id)
        if not status.done:
            try:
                self.store.create(self._doc(job_id, "cancelled.json"), json.dumps({"at": now()}).encode())
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
        return self.runner.join(job_id, timeout_s)

    def delete(self, job_id: str) -> None:
        """Remove a finished job: its shards, records, markers and manifest; FAILED_PRECONDITION while it runs."""
        status = self.get(job_id)
        if not status.done or not self.join(job_id, 0.0):
            raise JobNotFinished(f"{self.noun} job {job_id} still runs; cancel it first", field="name", job=job_id)
        self._release(status)
        for key in sorted(self.store.list_keys(self._doc(job_id, "")), key=lambda k: k.endswith("job.json")):
            self.store.delete(key)     # job.json last: a half-deleted job stays visible and deletable

    # -- shutdown

    def close(self, timeout_s: float = 30.0) -> None:
        """Stop this process's runners between shards (their jobs stay resumable) and release the executor."""
        self.runner.close(timeout_s)
        self.executor.release()
