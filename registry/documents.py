"""The store's documents under a registry: their keys, tombstones and deletion markers.

``Documents`` is the base every resource of ``Registry`` (models, versions, aliases) builds on:
the store, the listing hints, the key of every document (see ``registry.registry`` for the
layout), and the marks deletion leaves (tombstones, ``deleting`` markers) that creators check.
"""

from __future__ import annotations

import hashlib
import logging
import re

from rulewright.registry import errors
from rulewright.registry.blobstore import BlobStore
from rulewright.registry.errors import Reason
from rulewright.registry.manifests import Version, dumps, format_time, loads, parse_time, utc_now

log = logging.getLogger(__name__)

_LIST_BATCH = 1000
# How long a deletion marker blocks concurrent creators (see ``_live_markers``).
MARKER_LEASE_S = 120.0
_MANIFEST_RE = re.compile(r"/(\d{10})\.json$")
_TOMBSTONE_RE = re.compile(r"/(\d{10})\.deleted\.json$")


class Documents:
    """The store and the keys of its documents; the marks deletions leave and creators check."""

    def __init__(self, store: BlobStore):
        self.store = store
        self._number_hints: dict[str, int] = {}             # model → highest version number seen
        self._alias_hints: dict[tuple[str, str], int] = {}  # (model, alias) → latest seq seen

    # ---- keys --------------------------------------------------------------------------------

    @staticmethod
    def _model_key(m: str) -> str:
        return f"models/{m}/model.json"

    @staticmethod
    def _versions_prefix(m: str) -> str:
        return f"models/{m}/versions/"

    @classmethod
    def _version_key(cls, m: str, n: int, suffix: str = ".json") -> str:
        return f"{cls._versions_prefix(m)}{n:010d}{suffix}"

    @classmethod
    def _tombstone_key(cls, m: str, n: int) -> str:
        return cls._version_key(m, n, ".deleted.json")

    @staticmethod
    def _alias_prefix(m: str, a: str) -> str:
        return f"models/{m}/aliases/{a}/"

    @classmethod
    def _alias_key(cls, m: str, a: str, seq: int) -> str:
        return f"{cls._alias_prefix(m, a)}{seq:010d}.json"

    @staticmethod
    def _request_key(m: str, request_id: str, suffix: str = ".json") -> str:
        return f"models/{m}/requests/{hashlib.sha256(request_id.encode()).hexdigest()}{suffix}"

    @classmethod
    def _claim_key(cls, m: str, request_id: str) -> str:
        return cls._request_key(m, request_id, ".claim.json")

    # ---- deletion marks ----------------------------------------------------------------------

    def _is_deleted(self, model: str, number: int) -> bool:
        try:
            self.store.read(self._tombstone_key(model, number))
            return True
        except errors.NotFound:
            return False

    def _scan_live(self, model: str, start_after: str = "", want: int | None = None) -> tuple[list[int], bool]:
        """Live version numbers after ``start_after``; stops once ``want`` are found (→ more=True)."""
        prefix = self._versions_prefix(model)
        dead: set[int] = set()
        live: list[int] = []
        cursor = start_after
        while True:
            keys = self.store.list_keys(prefix, start_after=cursor, limit=_LIST_BATCH)
            for key in keys:
                # "n.deleted.json" sorts before "n.json", so a tombstone is always seen first.
                if m := _TOMBSTONE_RE.search(key):
                    dead.add(int(m.group(1)))
                elif (m := _MANIFEST_RE.search(key)) and int(m.group(1)) not in dead:
                    live.append(int(m.group(1)))
                    if want is not None and len(live) >= want:
                        return live, True
            if len(keys) < _LIST_BATCH:
                return live, False
            cursor = keys[-1]

    def _live_numbers(self, model: str) -> list[int]:
        return self._scan_live(model)[0]

    def _tombstone(self, model: str, number: int, author: str, reason: str) -> None:
        body = {"number": number, "author": str(author), "reason": str(reason), "deleted_at": format_time(utc_now())}
        try:
            self.store.create(self._tombstone_key(model, number), dumps(body))
        except errors.AlreadyExists:
            pass  # deleted twice: the first tombstone stands

    def _deletion_pending(self, model: str, version: int | None) -> bool:
        """Whether the model, or ``version`` of it, is being (or has been) deleted."""
        if self._live_markers(f"models/{model}/deleting."):
            return True
        try:
            self.store.read(self._model_key(model))
        except errors.NotFound:
            return True
        if version is not None:
            if self._is_deleted(model, version):
                return True
            if self._live_markers(f"models/{model}/versions/{version:010d}.deleting."):
                return True
        return False

    def _live_markers(self, prefix: str) -> list[str]:
        """Deletion markers under ``prefix`` younger than ``MARKER_LEASE_S``.

        A deleter that died leaves its marker behind; past the lease it no longer blocks anyone
        (and ``gc`` removes it). A deletion takes seconds, so the lease is generous.
        """
        now = utc_now()
        live = []
        for key in self.store.list_keys(prefix):
            try:
                started = parse_time(loads(self.store.read(key), key)["time"])
            except (errors.NotFound, errors.DataLoss, KeyError, TypeError, ValueError):
                continue  # removed meanwhile, or not a marker we wrote
            if (now - started).total_seconds() < MARKER_LEASE_S:
                live.append(key)
        return live

    def _new_marker(self, key: str, author: str) -> str:
        self.store.create(key, dumps({"author": str(author), "time": format_time(utc_now())}))
        return key

    def _undo_if_deleting(self, model: str, version: Version, parent: int | None) -> None:
        """After publishing ``version``: if its parent or model is being deleted, withdraw it (ABORTED)."""
        if not self._deletion_pending(model, parent):
            return
        self._tombstone(model, version.number, version.author, "parent or model deleted concurrently")
        raise errors.Aborted(
            Reason.CONCURRENT_DELETE,
            f"{'version ' + str(parent) if parent else 'model'} of {model!r} is being deleted; "
            f"version {version.number} was withdrawn",
            model=model,
            parent=parent,
        )


def fmt_numbers(numbers: list[int], limit: int = 10) -> str:
    shown = ", ".join(map(str, numbers[:limit]))
    return shown + (f" and {len(numbers) - limit} more" if len(numbers) > limit else "")
