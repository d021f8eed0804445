"""Models, immutable versions and aliases with history, on any ``BlobStore``.

- ``Registry(store)`` / ``Registry.open(uri)``: the registry over one store.
- Models: ``import_model``, ``get_model``, ``list_models``, ``delete_model``.
- Versions: ``create_version`` (an edit: parent + low-rank delta blob), ``get_version``,
  ``get_lineage``, ``list_versions``, ``delete_version``, ``find_version_by_request_id``,
  ``resolve("faces" | "faces/3" | "faces@production")``.
- Aliases: ``set_alias`` (compare-and-set on the expected version or an etag), ``get_alias``,
  ``list_aliases``, ``rollback_alias``, ``delete_alias``, ``alias_history``, ``alias_at(T)``.
- ``ANY``: "do not check" for ``expected_version``.

Layout of documents in the store (every one written once, by conditional create, never changed)::

    models/{m}/model.json                                  the model
    models/{m}/versions/{n:010d}.json                      version n (its number is its key)
    models/{m}/versions/{n:010d}.deleted.json              tombstone: n is deleted; the number stays taken
    models/{m}/versions/{n:010d}.deleting.{token}.json     a deletion of n in progress
    models/{m}/versions/{p:010d}.child.{n:010d}.json       n claims p as parent (written before n)
    models/{m}/aliases/{a}/{seq:010d}.json                 the alias's history; the latest entry is its value
    models/{m}/requests/{sha256(request id)}.claim.json    a mutation with that request id began (written first)
    models/{m}/requests/{sha256(request id)}.json          request id → version, for retried mutations
    models/{m}/deleting.{token}.json                       a deletion of the whole model in progress

Why these shapes: object stores give us exactly one atomic primitive, create-if-absent. A version
number is allocated by creating its manifest (a loser retries with the next number); an alias
moves by creating the next history entry (a loser gets ABORTED naming the winner's version), so
the history cannot diverge from the value. Deletion never frees a number: it adds a tombstone.

Retries: a mutation with a request id claims it first (the claim records the highest version
number taken then), writes its manifest carrying the request id, and records request id →
version last. A writer killed between any two of these steps leaves either nothing visible or a
manifest that names its request id; a retry that finds a claim but no record looks for that
manifest among the versions numbered after the claim's floor, so it never creates a second
version. Twins (the same request id at once) each settle on the lowest-numbered live manifest
carrying it and withdraw (tombstone) their own if it is not that one.

Deleting a version races with creating a child of it or moving an alias onto it. Both sides
write first and check the other side's mark after (the deleter: its ``deleting`` marker, then
the child links and aliases; the creator: its child link and manifest, or alias entry, then the
markers and tombstone). With a linearizable store at least one of them sees the other, and the
creator that sees a deletion undoes itself (tombstone / reverting alias entry) and gets ABORTED.

No torch here: clients import this module.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import logging
import re
import uuid
from typing import Any, Callable

from rulewright.registry import errors
from rulewright.registry.blobstore import BlobSource, BlobStore
from rulewright.registry.stores import open_store
from rulewright.registry.errors import Reason
from rulewright.registry.manifests import (
    AliasEntry,
    AliasState,
    Model,
    Page,
    Version,
    check_alias_name,
    check_json_object,
    check_model_name,
    check_page_size,
    check_request_id,
    check_version,
    decode_page_token,
    dumps,
    encode_page_token,
    format_time,
    loads,
    parse_etag,
    parse_time,
    utc_now,
)

log = logging.getLogger(__name__)

# Each failed conditional create means another writer got that number; with W concurrent
# writers a create needs at most W tries, so this bound only trips on a pathological store.
_MAX_ALLOCATION_ATTEMPTS = 256
_LIST_BATCH = 1000
# How long a deletion marker blocks concurrent creators (see ``_live_markers``).
MARKER_LEASE_S = 120.0
_MANIFEST_RE = re.compile(r"/(\d{10})\.json$")
_TOMBSTONE_RE = re.compile(r"/(\d{10})\.deleted\.json$")
_CHILD_RE = re.compile(r"/\d{10}\.child\.(\d{10})\.json$")
_REF_RE = re.compile(r"^([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)(?:/(\d+)|@([a-z0-9-]+))?$")


class _Any:
    def __repr__(self) -> str:
        return "ANY"


ANY: Any = _Any()


def _is_safetensors_header(head: bytes) -> bool:
    # 8-byte little-endian header length, then a JSON object: enough to refuse pickles and junk
    # without importing torch or reading the whole file.
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n < (1 << 30) and head[8:9] == b"{"


class Registry:
    """The model registry over one ``BlobStore`` (see the module docstring for the layout)."""

    def __init__(self, store: BlobStore):
        self.store = store
        self._number_hints: dict[str, int] = {}             # model → highest version number seen
        self._alias_hints: dict[tuple[str, str], int] = {}  # (model, alias) → latest seq seen

    @classmethod
    def open(cls, uri: str | None = None, **store_options: Any) -> "Registry":
        """A registry on the store ``uri`` names (see ``open_store``)."""
        return cls(open_store(uri, **store_options))

    def close(self) -> None:
        """Close the store."""
        self.store.close()

    def __enter__(self) -> "Registry":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- keys --------------------------------------------------------------------------------

    @staticmethod
    def _model_key(m: str) -> str:
        return f"models/{m}/model.json"

    @staticmethod
    def _versions_prefix(m: str) -> str:
        return f"models/{m}/versions/"

    @staticmethod
    def _version_key(m: str, n: int) -> str:
        return f"models/{m}/versions/{n:010d}.json"

    @staticmethod
    def _tombstone_key(m: str, n: int) -> str:
        return f"models/{m}/versions/{n:010d}.deleted.json"

    @staticmethod
    def _alias_prefix(m: str, a: str) -> str:
        return f"models/{m}/aliases/{a}/"

    @staticmethod
    def _alias_key(m: str, a: str, seq: int) -> str:
        return f"models/{m}/aliases/{a}/{seq:010d}.json"

    @staticmethod
    def _request_key(m: str, request_id: str) -> str:
        return f"models/{m}/requests/{hashlib.sha256(request_id.encode()).hexdigest()}.json"

    @staticmethod
    def _claim_key(m: str, request_id: str) -> str:
        return f"models/{m}/requests/{hashlib.sha256(request_id.encode()).hexdigest()}.claim.json"

    # ---- models ------------------------------------------------------------------------------

    def import_model(
        self,
        name: str,                      # lowercase DNS label
        *,
        arch: str,                      # architecture ("dcgan", "progan", "stylegan2")
        config: dict,                   # JSON sizes the architecture is built from
        weights: BlobSource,            # base weights as safetensors (bytes or a binary stream)
        author: str = "anonymous",      # the authenticated principal
        description: str = "",          # free text shown in listings
        spec: dict | None = None,       # where the weights came from (replayable import)
        metrics: dict | None = None,    # measured quality of the base model
        request_id: str | None = None,  # a retry with the same id returns the first result
    ) -> Version:
        """Register a model and its version 1 (kind ``import``) holding the base weights.

        Returns:
            Version 1.
        Raises:
            AlreadyExists (MODEL_EXISTS): the name is taken (by another request).
            InvalidArgument: a bad name, config, or weights that are not safetensors.
        """
        name = check_model_name(name)
        if not isinstance(arch, str) or not arch:
            raise errors.InvalidArgument(Reason.INVALID_ARGUMENT, "arch must be a non-empty string", field="arch")
        config = check_json_object(config, "config")
        spec = check_json_object(spec, "spec")
        metrics = check_json_object(metrics, "metrics")
        request_id = check_request_id(request_id)
        self._check_weights(weights)
        if request_id is not None:
            prior = self.find_version_by_request_id(name, request_id)
            if prior is not None:
                return self._same_request(prior, "import", None)
        ref = self.store.put_blob(weights)
        model = Model(name, arch, config, str(description), str(author), utc_now(), request_id, ref)
        try:
            self.store.create(self._model_key(name), dumps(model.to_dict()))
        except errors.AlreadyExists:
            existing = self.get_model(name)
            # The same request crashed after creating the model: finish it instead of refusing.
            if request_id is None or existing.request_id != request_id:
                raise errors.AlreadyExists(Reason.MODEL_EXISTS, f"model {name!r} already exists", model=name) from None
        version = Version(name, 1, None, "import", spec, {"weights": ref}, metrics, str(author), utc_now(), request_id)
        try:
            self.store.create(self._version_key(name, 1), dumps(version.to_dict()))
        except errors.AlreadyExists:
            first = self.get_version(name, 1)
            if request_id is not None and first.request_id == request_id:
                return self._record_request(name, request_id, first)  # killed before its record
            raise errors.AlreadyExists(Reason.MODEL_EXISTS, f"model {name!r} already exists", model=name) from None
        self._number_hints[name] = max(self._number_hints.get(name, 0), 1)
        self._undo_if_deleting(name, version, None)
        log.info(
            "model imported", extra={"event": "model_imported", "model": name, "sha256": ref.sha256, "size": ref.size}
        )
        return self._record_request(name, request_id, version)

    def import_pending(self, name: str) -> bool:
        """Whether model ``name`` exists without its version 1: an import killed midway (retry it)."""
        self.get_model(name)
        try:
            self.store.read(self._version_key(name, 1))
        except errors.NotFound:
            return True
        return False

    def _check_weights(self, weights: BlobSource) -> None:
        if isinstance(weights, (bytes, bytearray, memoryview)):
            head = bytes(weights[:9])
        elif hasattr(weights, "seekable") and weights.seekable():
            pos = weights.tell()
            head = weights.read(9)
            weights.seek(pos)
        else:
            return  # an unseekable stream is checked when it is materialized
        if not _is_safetensors_header(head):
            raise errors.InvalidArgument(Reason.INVALID_ARGUMENT, "weights must be a safetensors file", field="weights")

    def get_model(self, name: str) -> Model:
        """The model ``name``; NOT_FOUND (MODEL_NOT_FOUND) if absent."""
        name = check_model_name(name)
        try:
            data = self.store.read(self._model_key(name))
        except errors.NotFound:
            raise errors.NotFound(Reason.MODEL_NOT_FOUND, f"model {name!r} not found", model=name) from None
        return Model.from_dict(loads(data, f"models/{name}"), f"models/{name}")

    def list_models(self, page_size: int = 0, page_token: str = "") -> Page[Model]:
        """Models in name order, a page at a time (page_size 0 = default; see ``check_page_size``)."""
        size = check_page_size(page_size)
        after = decode_page_token(page_token, "models")
        names = [n for n in self.store.list_children("models/") if n > after]
        items: list[Model] = []
        for i, name in enumerate(names):
            try:
                items.append(self.get_model(name))
            except errors.NotFound:  # a folder whose import or deletion is in flight
                continue
            if len(items) == size:
                more = i + 1 < len(names)
                return Page(items, encode_page_token("models", name) if more else "")
        return Page(items, "")

    def delete_model(self, name: str, *, force: bool = False, author: str = "anonymous") -> None:
        """Delete a model; without ``force`` only one whose versions are all deleted.

        With ``force`` every version, alias and history entry goes too (their blobs are left to
        GC). Raises FailedPrecondition (MODEL_HAS_VERSIONS) naming the live versions otherwise.
        """
        self.get_model(name)
        marker = self._new_marker(f"models/{name}/deleting.{uuid.uuid4().hex}.json", author)
        try:
            live = self._live_numbers(name)
            if live and not force:
                raise errors.FailedPrecondition(
                    Reason.MODEL_HAS_VERSIONS,
                    f"model {name!r} still has versions {_fmt_numbers(live)}; delete them or force",
                    model=name,
                    versions=",".join(map(str, live)),
                )
            # model.json first: from here on a concurrent creator's check sees the model gone even
            # after the marker below is removed.
            self.store.delete(self._model_key(name))
            for key in self.store.list_keys(f"models/{name}/"):
                if key != marker:
                    self.store.delete(key)
        finally:
            self.store.delete(marker)
        self._number_hints.pop(name, None)
        for key in [k for k in self._alias_hints if k[0] == name]:
            self._alias_hints.pop(key, None)
        log.info("model deleted", extra={"event": "model_deleted", "model": name, "author": author, "force": force})

    # ---- versions ----------------------------------------------------------------------------

    def create_version(
        self,
        model: str,
        *,
        parent: int,                    # the version the edit applies to
        delta: BlobSource,              # the low-rank factors (``delta.to_bytes`` output)
        spec: dict,                     # the edit request, replayable on another version
        metrics: dict | None = None,    # measured efficacy / side effects
        author: str = "anonymous",      # the authenticated principal
        request_id: str | None = None,  # a retry with the same id returns the first result
    ) -> Version:
        """Store an edit as a new version numbered after every existing one.

        The number is allocated by conditionally creating the manifest: concurrent writers in
        any number of processes or replicas each get their own number and none is overwritten.

        Raises:
            NotFound: the model or the parent does not exist.
            Aborted (CONCURRENT_DELETE): the parent was being deleted; nothing was created.
            FailedPrecondition (REQUEST_ID_REUSED): the request id named a different request.
        """
        model = check_model_name(model)
        parent = check_version(parent, "parent")
        spec = check_json_object(spec, "spec")
        metrics = check_json_object(metrics, "metrics")
        request_id = check_request_id(request_id)
        if request_id is not None:
            earlier = self._requested(model, request_id)
            if earlier:
                prior = self._same_request(earlier[0], "edit", parent)
                for duplicate in earlier[1:]:  # twins killed before they withdrew theirs
                    self._withdraw_duplicate(model, duplicate, prior.number, request_id)
                return self._record_request(model, request_id, prior)
        self.get_version(model, parent)
        ref = self.store.put_blob(delta)
        floor = self._claim_request(model, request_id)

        def make(n: int) -> Version:
            return Version(model, n, parent, "edit", spec, {"delta": ref}, metrics, str(author), utc_now(), request_id)

        version = self._allocate(model, make, parent)
        self._undo_if_deleting(model, version, parent)
        log.info(
            "version created",
            extra={
                "event": "version_created",
                "model": model,
                "version": version.number,
                "parent": parent,
                "size": ref.size,
            },
        )
        return self._settle_request(model, request_id, version, floor)

    def _allocate(self, model: str, make: Callable[[int], Version], parent: int | None) -> Version:
        n = self._max_number(model) + 1
        for _ in range(_MAX_ALLOCATION_ATTEMPTS):
            version = make(n)
            if parent is not None:
                # The child link goes first so a deleter of the parent that lists links after
                # writing its marker cannot miss a child whose manifest is already visible. A
                # stale link (this number lost, or the writer died) is harmless: deleters check
                # the linked manifest's parent. Never delete links: the winner may share it.
                link = f"models/{model}/versions/{parent:010d}.child.{n:010d}.json"
                try:
                    self.store.create(link, b"{}")
                except errors.AlreadyExists:
                    pass
            try:
                self.store.create(self._version_key(model, n), dumps(version.to_dict()))
            except errors.AlreadyExists:
                n = max(n + 1, self._max_number(model) + 1)
                continue
            self._number_hints[model] = max(self._number_hints.get(model, 0), n)
            return version
        raise errors.Aborted(
            Reason.VERSION_ALLOCATION_CONFLICT,
            f"could not allocate a version number of {model!r} in {_MAX_ALLOCATION_ATTEMPTS} tries; retry",
            model=model,
        )

    def _max_number(self, model: str) -> int:
        """The highest version number taken (live or deleted), listing only past the cached hint."""
        prefix = self._versions_prefix(model)
        hint = self._number_hints.get(model, 0)
        keys = self.store.list_keys(prefix, start_after=f"{prefix}{hint:010d}" if hint else "")
        if hint and self._version_key(model, hint) not in keys:
            keys = self.store.list_keys(prefix)  # the hint is stale (model deleted and re-created)
            hint = 0
        numbers = [int(m.group(1)) for k in keys if (m := _MANIFEST_RE.search(k))]
        top = max(numbers, default=hint)
        self._number_hints[model] = top
        return top

    def _same_request(self, prior: Version, kind: str, parent: int | None) -> Version:
        if prior.kind != kind or prior.parent != parent:
            raise errors.FailedPrecondition(
                Reason.REQUEST_ID_REUSED,
                f"request_id {prior.request_id!r} was used for {prior.name} ({prior.kind} of parent {prior.parent})",
                version=prior.number,
            )
        return prior

    def _record_request(self, model: str, request_id: str | None, version: Version) -> Version:
        """Bind ``request_id`` to ``version``; if a twin request won the race, undo ours and return theirs."""
        if request_id is None:
            return version
        key = self._request_key(model, request_id)
        try:
            self.store.create(key, dumps({"request_id": request_id, "version": version.number}))
            return version
        except errors.AlreadyExists:
            pass
        winner = int(loads(self.store.read(key), key)["version"])
        if winner == version.number:
            return version
        self._tombstone(model, version.number, version.author, f"duplicate of version {winner} (request {request_id})")
        return self.get_version(model, winner)

    def _claim_request(self, model: str, request_id: str | None) -> int:
        """Claim ``request_id`` before allocating; the floor above which its manifest will be numbered."""
        if request_id is None:
            return 0
        key = self._claim_key(model, request_id)
        floor = self._max_number(model)
        body = {"request_id": request_id, "after": floor, "time": format_time(utc_now())}
        try:
            self.store.create(key, dumps(body))
            return floor
        except errors.AlreadyExists:
            return self._claim_floor(model, request_id, default=floor)

    def _claim_floor(self, model: str, request_id: str, default: int | None = None) -> int | None:
        """The claim's floor (the highest number taken when it was written); ``default`` without a claim."""
        key = self._claim_key(model, request_id)
        try:
            claim = loads(self.store.read(key), key)
            if claim.get("request_id") == request_id:
                return int(claim["after"])
        except errors.NotFound:
            return default
        except (KeyError, TypeError, ValueError):
            pass
        return 0  # unreadable: look at every version rather than miss one

    def _request_versions(self, model: str, request_id: str, after: int, below: int | None = None) -> list[Version]:
        """Live versions numbered in (after, below) whose manifest carries ``request_id``, lowest first."""
        start = self._version_key(model, after) if after else ""
        out = []
        for n in self._scan_live(model, start)[0]:
            if below is not None and n >= below:
                break
            try:
                version = self.get_version(model, n)
            except errors.NotFound:  # deleted since the listing
                continue
            if version.request_id == request_id:
                out.append(version)
        return out

    def _requested(self, model: str, request_id: str) -> list[Version]:
        """The live versions made for ``request_id``: the recorded one, else those found after its claim."""
        key = self._request_key(model, request_id)
        try:
            record = loads(self.store.read(key), key)
        except errors.NotFound:
            record = None
        if record is not None:
            if record.get("request_id") != request_id:
                return []
            try:
                return [self.get_version(model, int(record["version"]))]
            except errors.NotFound:
                return []
        floor = self._claim_floor(model, request_id)
        if floor is None:  # never claimed: no attempt got as far as allocating a number
            return []
        return self._request_versions(model, request_id, floor)

    def _settle_request(self, model: str, request_id: str | None, version: Version, floor: int) -> Version:
        """After publishing ``version``: keep the lowest live twin for ``request_id`` and record it."""
        if request_id is None:
            return version
        # Every number below ours was taken before ours was created, so a twin that got a lower
        # one is visible here; the twin with the higher number withdraws.
        twins = self._request_versions(model, request_id, floor, below=version.number)
        if twins:
            self._withdraw_duplicate(model, version, twins[0].number, request_id)
            return self._record_request(model, request_id, twins[0])
        return self._record_request(model, request_id, version)

    def _withdraw_duplicate(self, model: str, version: Version, winner: int, request_id: str) -> None:
        self._tombstone(model, version.number, version.author, f"duplicate of version {winner} (request {request_id})")
        log.info(
            "duplicate version withdrawn",
            extra={"event": "version_duplicate_withdrawn", "model": model, "version": version.number, "kept": winner},
        )

    def find_version_by_request_id(self, model: str, request_id: str) -> Version | None:
        """The live version an earlier mutation with ``request_id`` created, or None.

        Found by its record, or (when the writer was killed before recording it) by the request
        id its manifest carries, among the versions created after the request's claim.
        """
        model = check_model_name(model)
        request_id = check_request_id(request_id)
        found = self._requested(model, request_id)
        return found[0] if found else None

    def get_version(self, model: str, number: int) -> Version:
        """Version ``number`` of ``model``; NOT_FOUND (VERSION_NOT_FOUND) if absent or deleted."""
        model = check_model_name(model)
        number = check_version(number)
        try:
            data = self.store.read(self._version_key(model, number))
            deleted = self._is_deleted(model, number)
        except errors.NotFound:
            deleted = None
        if deleted is not False:
            self.get_model(model)  # a missing model is the better message
            state = "was deleted" if deleted else "does not exist"
            raise errors.NotFound(
                Reason.VERSION_NOT_FOUND, f"version {number} of {model!r} {state}", model=model, version=number
            ) from None
        what = f"models/{model}/versions/{number}"
        version = Version.from_dict(loads(data, what), what)
        if version.model != model or version.number != number:
            raise errors.DataLoss(Reason.MANIFEST_CORRUPT, f"{what} holds {version.name}", object=what)
        return version

    def _is_deleted(self, model: str, number: int) -> bool:
        try:
            self.store.read(self._tombstone_key(model, number))
            return True
        except errors.NotFound:
            return False

    def get_lineage(self, model: str, number: int) -> list[Version]:
        """The versions from the import down to ``number`` (root first): what materialization applies."""
        chain: list[Version] = []
        seen: set[int] = set()
        current: int | None = number
        while current is not None:
            if current in seen:
                raise errors.DataLoss(Reason.MANIFEST_CORRUPT, f"lineage of {model}/{number} has a cycle at {current}")
            seen.add(current)
            try:
                version = self.get_version(model, current)
            except errors.NotFound:
                if current == number:
                    raise
                raise errors.DataLoss(
                    Reason.MANIFEST_CORRUPT,
                    f"lineage of {model}/{number} is broken: ancestor {current} is missing",
                    model=model,
                    version=number,
                    ancestor=current,
                ) from None
            chain.append(version)
            current = version.parent
        if chain[-1].kind != "import":
            raise errors.DataLoss(Reason.MANIFEST_CORRUPT, f"lineage of {model}/{number} does not start at an import")
        chain.reverse()
        return chain

    def list_versions(self, model: str, page_size: int = 0, page_token: str = "") -> Page[Version]:
        """Live versions in number order, a page at a time (page_size 0 = default)."""
        model = check_model_name(model)
        size = check_page_size(page_size)
        scope = f"versions:{model}"
        after = decode_page_token(page_token, scope)
        self.get_model(model)
        start = self._version_key(model, int(after)) if after else ""
        numbers, more = self._scan_live(model, start, size + 1)
        if len(numbers) > size:
            numbers, more = numbers[:size], True
        items = []
        for n in numbers:
            try:
                items.append(self.get_version(model, n))
            except errors.NotFound:  # deleted since the listing
                continue
        return Page(items, encode_page_token(scope, str(numbers[-1])) if more and numbers else "")

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

    def delete_version(self, model: str, number: int, *, author: str = "anonymous", reason: str = "") -> None:
        """Delete a version no alias points to and no version builds on (its number stays taken).

        Raises:
            FailedPrecondition (VERSION_HAS_CHILDREN / VERSION_HAS_ALIASES) naming the blockers.
        """
        self.get_version(model, number)
        marker = self._new_marker(f"models/{model}/versions/{number:010d}.deleting.{uuid.uuid4().hex}.json", author)
        try:
            children = self._children(model, number)
            if children:
                raise errors.FailedPrecondition(
                    Reason.VERSION_HAS_CHILDREN,
                    f"version {number} of {model!r} has child versions {_fmt_numbers(children)}",
                    model=model,
                    version=number,
                    children=",".join(map(str, children)),
                )
            aliases = [a.alias for a in self.list_aliases(model) if a.version == number]
            if aliases:
                raise errors.FailedPrecondition(
                    Reason.VERSION_HAS_ALIASES,
                    f"version {number} of {model!r} is the target of aliases {', '.join(aliases)}",
                    model=model,
                    version=number,
                    aliases=",".join(aliases),
                )
            self._tombstone(model, number, author, reason)
        finally:
            self.store.delete(marker)
        log.info(
            "version deleted", extra={"event": "version_deleted", "model": model, "version": number, "author": author}
        )

    def _children(self, model: str, number: int) -> list[int]:
        out = []
        for key in self.store.list_keys(f"models/{model}/versions/{number:010d}.child."):
            m = _CHILD_RE.search(key)
            if not m:
                continue
            try:
                if self.get_version(model, int(m.group(1))).parent == number:
                    out.append(int(m.group(1)))
            except errors.NotFound:  # a stale link: that number went to another writer
                continue
        return sorted(out)

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

    def resolve(self, ref: str) -> Version:
        """The one version a reference names: ``faces/3``, ``faces@production``, or ``faces`` (the newest)."""
        m = _REF_RE.match(ref) if isinstance(ref, str) else None
        if not m:
            raise errors.InvalidArgument(
                Reason.INVALID_REFERENCE, f"not a model reference (name, name/N or name@alias): {ref!r}", field="model"
            )
        name, number, alias = m.groups()
        if number is not None:
            return self.get_version(name, int(number))
        if alias is not None:
            state = self.get_alias(name, alias)
            if state.version is None:
                raise errors.NotFound(
                    Reason.ALIAS_NOT_FOUND, f"alias {alias!r} of {name!r} is unset", model=name, alias=alias
                )
            return self.get_version(name, state.version)
        self.get_model(name)
        live = self._live_numbers(name)
        if not live:
            raise errors.NotFound(Reason.VERSION_NOT_FOUND, f"model {name!r} has no versions", model=name)
        return self.get_version(name, live[-1])

    # ---- aliases -----------------------------------------------------------------------------

    def set_alias(
        self,
        model: str,
        alias: str,
        version: int,
        *,
        expected_version: int | None | _Any = ANY,  # the version the alias points to now (None: unset/new)
        etag: str | None = None,                    # or the etag of its current state
        author: str = "anonymous",
        reason: str = "",
    ) -> AliasState:
        """Point ``alias`` at ``version`` if it still points where the caller expects.

        State one of ``expected_version`` (None for a new alias) or ``etag`` (which also catches
        A→B→A moves). Appends an entry to the alias's history.

        Raises:
            Aborted (ALIAS_CONFLICT): the alias points elsewhere; metadata ``current_version``, ``etag``.
            NotFound: the model or version does not exist.
            InvalidArgument: neither expectation stated.
        """
        model = check_model_name(model)
        alias = check_alias_name(alias)
        version = check_version(version)
        if expected_version is ANY and etag is None:
            raise errors.InvalidArgument(
                Reason.INVALID_ARGUMENT,
                "state expected_version (None for a new alias) or etag",
                field="expected_version",
            )
        self.get_version(model, version)
        return self._move_alias(model, alias, version, expected_version, etag, author, reason)

    def delete_alias(
        self,
        model: str,
        alias: str,
        *,
        expected_version: int | None | _Any = ANY,
        etag: str | None = None,
        author: str = "anonymous",
        reason: str = "",
    ) -> AliasState:
        """Unset ``alias`` (compare-and-set like ``set_alias``); its history stays answerable."""
        model = check_model_name(model)
        alias = check_alias_name(alias)
        state = self.get_alias(model, alias)
        if state.version is None:
            raise errors.NotFound(
                Reason.ALIAS_NOT_FOUND, f"alias {alias!r} of {model!r} is already unset", model=model, alias=alias
            )
        if expected_version is ANY and etag is None:
            raise errors.InvalidArgument(
                Reason.INVALID_ARGUMENT, "state expected_version or etag", field="expected_version"
            )
        return self._move_alias(model, alias, None, expected_version, etag, author, reason)

    def rollback_alias(
        self, model: str, alias: str, *, etag: str | None = None, author: str = "anonymous", reason: str = ""
    ) -> AliasState:
        """Move ``alias`` back to where its latest move came from (recorded as a new move).

        Rolling back twice moves it forward again, like ``cd -``. With ``etag`` the rollback
        applies only to that state; without, to the state just read.
        """
        model = check_model_name(model)
        alias = check_alias_name(alias)
        current = self.get_alias(model, alias)
        target = current.entry.from_version
        if target is None:
            raise errors.FailedPrecondition(
                Reason.NO_EARLIER_VERSION,
                f"alias {alias!r} of {model!r} has no earlier version to roll back to",
                model=model,
                alias=alias,
            )
        self.get_version(model, target)
        return self._move_alias(
            model, alias, target, ANY, etag or current.etag, author, reason or f"rollback to version {target}"
        )

    def _move_alias(
        self, model: str, alias: str, to: int | None, expected_version: Any, etag: str | None, author: str, reason: str
    ) -> AliasState:
        current = self._latest_alias_entry(model, alias)
        self._check_expectation(model, alias, current, expected_version, etag)
        now = utc_now()
        if current is not None and current.time > now:
            now = current.time  # keep history times monotone across skewed clocks
        entry = AliasEntry(
            model,
            alias,
            (current.seq if current else 0) + 1,
            current.to_version if current else None,
            to,
            str(author),
            now,
            str(reason),
        )
        try:
            self.store.create(self._alias_key(model, alias, entry.seq), dumps(entry.to_dict()))
        except errors.AlreadyExists:
            raise self._conflict(
                model, alias, self._latest_alias_entry(model, alias), "another writer moved it first"
            ) from None
        self._alias_hints[(model, alias)] = entry.seq
        if to is not None and self._deletion_pending(model, to):
            self._revert_alias(entry)
            raise errors.Aborted(
                Reason.CONCURRENT_DELETE,
                f"version {to} of {model!r} is being deleted; alias {alias!r} was moved back",
                model=model,
                alias=alias,
                version=to,
            )
        log.info(
            "alias moved",
            extra={
                "event": "alias_moved",
                "model": model,
                "alias": alias,
                "from": entry.from_version,
                "to": to,
                "seq": entry.seq,
                "author": author,
            },
        )
        return AliasState.of(entry)

    def _revert_alias(self, entry: AliasEntry) -> None:
        back = AliasEntry(
            entry.model,
            entry.alias,
            entry.seq + 1,
            entry.to_version,
            entry.from_version,
            entry.author,
            max(utc_now(), entry.time),
            f"reverted: version {entry.to_version} deleted concurrently",
        )
        try:
            self.store.create(self._alias_key(entry.model, entry.alias, back.seq), dumps(back.to_dict()))
        except errors.AlreadyExists:
            pass  # someone moved it on already; it no longer points at the victim

    def _check_expectation(
        self, model: str, alias: str, current: AliasEntry | None, expected_version: Any, etag: str | None
    ) -> None:
        have_seq = current.seq if current else 0
        have_version = current.to_version if current else None
        if etag is not None and parse_etag(etag) != have_seq:
            raise self._conflict(model, alias, current, f"etag {etag} is stale")
        if expected_version is not ANY and expected_version != have_version:
            raise self._conflict(model, alias, current, f"expected version {expected_version}")

    @staticmethod
    def _conflict(model: str, alias: str, current: AliasEntry | None, why: str) -> errors.Aborted:
        version = current.to_version if current else None
        etag = current.etag if current else ""
        where = "is unset" if version is None else f"points to version {version}"
        return errors.Aborted(
            Reason.ALIAS_CONFLICT,
            f"alias {alias!r} of {model!r} {where} (etag {etag or 'none'}): {why}",
            model=model,
            alias=alias,
            current_version=version,
            etag=etag,
        )

    def _latest_alias_entry(self, model: str, alias: str) -> AliasEntry | None:
        prefix = self._alias_prefix(model, alias)
        hint = self._alias_hints.get((model, alias), 0)
        keys: list[str] = []
        if hint > 1:
            # Entries are never removed, so only those from the hint on need listing.
            keys = self.store.list_keys(prefix, start_after=self._alias_key(model, alias, hint - 1))
            if not keys or keys[0] != self._alias_key(model, alias, hint):
                keys = []
        if not keys:
            keys = self.store.list_keys(prefix)
        if not keys:
            return None
        entry = self._read_alias_entry(keys[-1])
        self._alias_hints[(model, alias)] = entry.seq
        return entry

    def _read_alias_entry(self, key: str) -> AliasEntry:
        return AliasEntry.from_dict(loads(self.store.read(key), key), key)

    def get_alias(self, model: str, alias: str) -> AliasState:
        """The alias's current value and etag; NOT_FOUND (ALIAS_NOT_FOUND) if it was never set."""
        model = check_model_name(model)
        alias = check_alias_name(alias)
        entry = self._latest_alias_entry(model, alias)
        if entry is None:
            self.get_model(model)
            raise errors.NotFound(
                Reason.ALIAS_NOT_FOUND, f"alias {alias!r} of {model!r} not found", model=model, alias=alias
            )
        return AliasState.of(entry)

    def list_aliases(self, model: str) -> list[AliasState]:
        """Every alias of ``model`` that is set, by name."""
        model = check_model_name(model)
        out = []
        for alias in self.store.list_children(f"models/{model}/aliases/"):
            entry = self._latest_alias_entry(model, alias)
            if entry is not None and entry.to_version is not None:
                out.append(AliasState.of(entry))
        return out

    def alias_history(self, model: str, alias: str, page_size: int = 0, page_token: str = "") -> Page[AliasEntry]:
        """Every move of ``alias``, oldest first, a page at a time."""
        model = check_model_name(model)
        alias = check_alias_name(alias)
        size = check_page_size(page_size)
        scope = f"history:{model}:{alias}"
        after = decode_page_token(page_token, scope)
        keys = self.store.list_keys(
            self._alias_prefix(model, alias),
            start_after=self._alias_key(model, alias, int(after)) if after else "",
            limit=size + 1,
        )
        if not keys and not after:
            self.get_alias(model, alias)  # NOT_FOUND with the right reason
        entries = [self._read_alias_entry(k) for k in keys[:size]]
        more = len(keys) > size
        return Page(entries, encode_page_token(scope, str(entries[-1].seq)) if more else "")

    def alias_at(self, model: str, alias: str, when: dt.datetime) -> int | None:
        """The version ``alias`` pointed to at time ``when`` (None: unset or not yet created then).

        History times never decrease, so a binary search reads O(log n) entries.
        """
        model = check_model_name(model)
        alias = check_alias_name(alias)
        if when.tzinfo is None:
            raise errors.InvalidArgument(Reason.INVALID_ARGUMENT, "when must be timezone-aware", field="when")
        keys = self.store.list_keys(self._alias_prefix(model, alias))
        if not keys:
            self.get_alias(model, alias)
        lo, hi, found = 0, len(keys) - 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            entry = self._read_alias_entry(keys[mid])
            if entry.time <= when:
                found, lo = entry, mid + 1
            else:
                hi = mid - 1
        return found.to_version if found else None


def _fmt_numbers(numbers: list[int], limit: int = 10) -> str:
    shown = ", ".join(map(str, numbers[:limit]))
    return shown + (f" and {len(numbers) - limit} more" if len(numbers) > limit else "")
