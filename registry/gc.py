"""Consistency check and garbage collection of a registry store.

- ``scan(store, verify=True)``: a ``Report`` of every blob no live manifest references (left by a
  writer killed between upload and manifest, or freed by a deletion), every live manifest whose
  blob is missing or corrupt or whose parent is gone, unreadable manifests, abandoned uploads and
  stale deletion markers. Read-only.
- ``collect(store, grace_s, dry_run=False)``: ``scan``, then remove unreferenced blobs, abandoned
  uploads and stale markers older than ``grace_s``. It never touches a manifest: damage is
  reported for a person to decide, never repaired silently.
- ``Report.problems``: what makes ``check``/``gc`` exit non-zero.

Why a grace period: a writer uploads a blob and then writes the manifest that references it, so
for a moment every new blob looks orphaned. Removing only blobs older than the grace period (an
hour by default; re-uploading refreshes a blob's age) keeps in-flight writes safe without locks.
The blob listing is taken before the manifests are read, so a blob whose manifest lands during
the scan is either seen referenced or young.

An import writes ``model.json`` (naming its weights blob) before version 1. A model without
version 1 is an import in progress or one killed midway, which the next start (``--bootstrap``)
or a retry of the import with its request id finishes: its weights blob counts as referenced,
so gc keeps it however old it is, and ``check`` lists the import as incomplete.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time

from rulewright.registry import errors
from rulewright.registry.blobstore import BlobInfo, BlobStore
from rulewright.registry.manifests import Model, Version, loads, parse_time, utc_now
from rulewright.registry.registry import MARKER_LEASE_S

log = logging.getLogger(__name__)

DEFAULT_GRACE_S = 3600.0

_MANIFEST_RE = re.compile(r"^models/([^/]+)/versions/(\d{10})\.json$")
_TOMBSTONE_RE = re.compile(r"^models/([^/]+)/versions/(\d{10})\.deleted\.json$")
_MODEL_RE = re.compile(r"^models/([^/]+)/model\.json$")
_MARKER_RE = re.compile(r"^models/[^/]+/(?:versions/\d{10}\.)?deleting\.[0-9a-f]+\.json$")


@dataclasses.dataclass
class Problem:
    """One inconsistency that needs a person: what, where, and which blob."""

    kind: str  # "missing_blob" | "corrupt_blob" | "unreadable_manifest" | "broken_lineage"
    key: str   # the manifest's key in the store
    detail: str
    sha256: str = ""

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return dataclasses.asdict(self)


@dataclasses.dataclass
class Report:
    """What ``scan`` found and ``collect`` did."""

    store: str
    blobs: int = 0                                                     # blobs stored
    manifests: int = 0                                                 # live version manifests read
    referenced: int = 0                                                # distinct blobs they reference
    orphans: list[BlobInfo] = dataclasses.field(default_factory=list)  # referenced by no live manifest
    removed: list[str] = dataclasses.field(default_factory=list)       # orphans removed (sha256)
    kept: list[str] = dataclasses.field(default_factory=list)          # orphans younger than the grace period
    abandoned_uploads: list[str] = dataclasses.field(default_factory=list)
    stale_markers: list[str] = dataclasses.field(default_factory=list)
    incomplete_imports: list[str] = dataclasses.field(default_factory=list)  # models without version 1
    problems: list[Problem] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """No damaged manifests."""
        return not self.problems

    def to_dict(self) -> dict:
        """JSON-ready form (``--json``)."""
        d = dataclasses.asdict(self)
        d["orphans"] = [dataclasses.asdict(o) for o in self.orphans]
        d["ok"] = self.ok
        return d


def _read_manifest(store: BlobStore, key: str, kind, report: Report):
    """``kind.from_dict`` of the manifest at ``key``; None if it vanished during the scan or is
    unreadable (then reported)."""
    try:
        return kind.from_dict(loads(store.read(key), key), key)
    except errors.NotFound:  # deleted during the scan
        return None
    except errors.DataLoss as exc:
        report.problems.append(Problem("unreadable_manifest", key, exc.message))
        return None


def _live_manifest_keys(store: BlobStore) -> tuple[list[str], list[str], list[str]]:
    """(live version manifests, deletion markers, model.json keys of models without a version 1)."""
    manifests, dead, markers, models, firsts = [], set(), [], {}, set()
    for key in store.list_keys("models/"):
        if m := _MANIFEST_RE.match(key):
            manifests.append((key, (m.group(1), m.group(2))))
            if int(m.group(2)) == 1:
                firsts.add(m.group(1))
        elif m := _TOMBSTONE_RE.match(key):
            dead.add((m.group(1), m.group(2)))
        elif _MARKER_RE.match(key):
            markers.append(key)
        elif m := _MODEL_RE.match(key):
            models[m.group(1)] = key
    pending = [key for name, key in sorted(models.items()) if name not in firsts]
    return [k for k, ident in manifests if ident not in dead], markers, pending


def scan(store: BlobStore, verify: bool = True, grace_s: float = DEFAULT_GRACE_S) -> Report:
    """Find orphans and damage without changing anything.

    Args:
        store: the registry's store.
        verify: also read every referenced blob and check its sha256 (slow on big stores).
        grace_s: age beyond which abandoned uploads are listed.
    """
    report = Report(store=store.uri)
    blobs = {b.sha256: b for b in store.iter_blobs()}  # before the manifests: see module docstring
    report.blobs = len(blobs)
    keys, markers, pending = _live_manifest_keys(store)
    live: dict[tuple[str, int], Version] = {}
    for key in keys:
        version = _read_manifest(store, key, Version, report)
        if version is not None:
            live[(version.model, version.number)] = version
    report.manifests = len(live)
    referenced: set[str] = set()
    verified: dict[str, str] = {}
    for (model, number), version in sorted(live.items()):
        key = f"models/{model}/versions/{number:010d}.json"
        if version.parent is not None and (model, version.parent) not in live:
            report.problems.append(
                Problem("broken_lineage", key, f"parent version {version.parent} is missing or deleted")
            )
        for role, ref in sorted(version.blobs.items()):
            referenced.add(ref.sha256)
            if ref.sha256 not in blobs and not store.has_blob(ref.sha256):
                report.problems.append(Problem("missing_blob", key, f"{role} blob is missing", ref.sha256))
                continue
            if verify:
                if ref.sha256 not in verified:
                    verified[ref.sha256] = _verify(store, ref.sha256)
                if verified[ref.sha256]:
                    report.problems.append(
                        Problem("corrupt_blob", key, f"{role} blob: {verified[ref.sha256]}", ref.sha256)
                    )
    for key in pending:
        model = _read_manifest(store, key, Model, report)
        if model is None:
            continue
        if store.list_keys(f"models/{model.name}/versions/0000000001.json"):
            continue  # version 1 landed during the scan
        report.incomplete_imports.append(model.name)
        if model.weights is not None:
            referenced.add(model.weights.sha256)  # the retry that finishes the import needs it
    report.referenced = len(referenced)
    report.orphans = sorted((b for sha, b in blobs.items() if sha not in referenced), key=lambda b: b.sha256)
    report.abandoned_uploads = store.abandoned_uploads(grace_s)
    report.stale_markers = [k for k in markers if _marker_stale(store, k)]
    return report


def _verify(store: BlobStore, sha: str) -> str:
    """ "" if the blob hashes right, else what is wrong."""
    try:
        store.get_blob(sha)
        return ""
    except errors.DataLoss as exc:
        return exc.message
    except errors.NotFound:
        return "vanished during the check"


def _marker_stale(store: BlobStore, key: str) -> bool:
    try:
        started = parse_time(loads(store.read(key), key)["time"])
    except errors.NotFound:
        return False
    except (errors.DataLoss, KeyError, TypeError, ValueError):
        return True
    return (utc_now() - started).total_seconds() >= MARKER_LEASE_S


def collect(store: BlobStore, grace_s: float = DEFAULT_GRACE_S, dry_run: bool = False, verify: bool = False) -> Report:
    """``scan``, then remove orphans, abandoned uploads and stale markers older than ``grace_s``.

    Args:
        grace_s: only blobs last written more than this many seconds ago are removed.
        dry_run: report what would be removed, remove nothing.
        verify: also hash every referenced blob (as ``check`` does).
    """
    report = scan(store, verify=verify, grace_s=grace_s)
    now = time.time()
    for blob in report.orphans:
        # Re-read the age just before deleting: a writer may have re-uploaded the same content
        # since the listing (which refreshes it) for a manifest it is about to write.
        fresh = store.stat_blob(blob.sha256) if now - blob.modified >= grace_s else blob
        if fresh is None:
            continue
        if now - fresh.modified < grace_s:
            report.kept.append(blob.sha256)
            continue
        if not dry_run:
            store.delete_blob(blob.sha256)
            log.info(
                "orphan blob removed", extra={"event": "gc_blob_removed", "sha256": blob.sha256, "size": blob.size}
            )
        report.removed.append(blob.sha256)
    if not dry_run:
        for name in report.abandoned_uploads:
            store.remove_upload(name)
        for key in report.stale_markers:
            store.delete(key)
    return report
