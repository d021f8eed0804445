"""Versions: immutable, numbered by conditional create; request ids make retries return the first result.

``create_version``, ``rescale_version`` (another version's delta at a new strength),
``get_version``, ``get_lineage``, ``list_versions``, ``delete_version``,
``find_version_by_request_id``; ``Versions`` is one of the resources ``Registry`` composes over
the shared ``Documents`` (the module docstring of ``registry.registry`` tells why the steps are
ordered as they are).
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import Callable

from rulewright.registry import errors
from rulewright.registry.blobstore import BlobSource
from rulewright.registry.documents import _MANIFEST_RE, Documents, fmt_numbers
from rulewright.registry.errors import Reason
from rulewright.registry.manifests import (
    Page, Version, check_json_object, check_model_name, check_page_size, check_request_id, check_version,
    decode_page_token, dumps, encode_page_token, format_time, loads, utc_now
)

log = logging.getLogger(__name__)

# Each failed conditional create means another writer got that number; with W concurrent
# writers a create needs at most W tries, so this bound only trips on a pathological store.
_MAX_ALLOCATION_ATTEMPTS = 256
_CHILD_RE = re.compile(r"/\d{10}\.child\.(\d{10})\.json$")


class Versions(Documents):
    """Create, read, list and delete versions; find the version a request id made."""

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
        adapter: dict | None = None,    # an edit imported from an adapter file: where it came from
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
        adapter = check_json_object(adapter, "adapter") if adapter is not None else None
        request_id = check_request_id(request_id)
        prior = self._earlier(model, request_id, parent)
        if prior is not None:
            return prior
        self.get_version(model, parent)
        ref = self.store.put_blob(delta)
        return self._publish_edit(model, parent, request_id, lambda n: Version(
            model, n, parent, "edit", spec, {"delta": ref}, metrics, str(author), utc_now(), request_id,
            adapter=adapter))

    def rescale_version(
        self,
        model: str,
        source: int,                    # the edited version whose delta the new one applies
        *,
        strength: float,                # the new version's strength (the domain checks its bounds)
        description: str | None = None,  # the new spec's description; None: the source's
        author: str = "anonymous",
        request_id: str | None = None,  # a retry with the same id returns the first result
    ) -> Version:
        """An edit that applies ``source``'s delta blob at ``strength``: no new blob, no fit.

        Its parent is the source's parent; it records the source (``rescaled_from``), the
        strength, and the source's spec and strength curve (its other metrics were measured at
        the source's strength). INVALID_ARGUMENT (``strength``) for an import, which has no edit.
        """
        model = check_model_name(model)
        src = self.get_version(model, check_version(source, "name"))
        if src.kind != "edit":
            raise errors.invalid(Reason.INVALID_ARGUMENT, "strength",
                                 f"{src.name} is an import: it has no edit to give a strength")
        request_id = check_request_id(request_id)
        spec = dict(src.spec, strength=float(strength))
        if description is not None:
            spec["description"] = str(description)
        spec = check_json_object(spec, "spec")
        metrics = {k: v for k, v in src.metrics.items() if k == "strength_curve"}
        prior = self._earlier(model, request_id, src.parent)
        if prior is not None:
            return prior
        return self._publish_edit(model, src.parent, request_id, lambda n: Version(
            model, n, src.parent, "edit", spec, dict(src.blobs), metrics, str(author), utc_now(), request_id,
            strength=float(strength), rescaled_from=src.number))

    def _earlier(self, model: str, request_id: str | None, parent: int) -> Version | None:
        """The edit an earlier attempt with ``request_id`` created (its twins withdrawn), or None."""
        earlier = self._requested(model, request_id) if request_id is not None else []
        if not earlier:
            return None
        prior = self._same_request(earlier[0], "edit", parent)
        for duplicate in earlier[1:]:  # twins killed before they withdrew theirs
            self._withdraw_duplicate(model, duplicate, prior.number, request_id)
        return self._record_request(model, request_id, prior)

    def _publish_edit(self, model: str, parent: int, request_id: str | None, make: Callable[[int], Version]) -> Version:
        """Allocate a number for the edit ``make(n)`` builds, publish it and settle its request id."""
        floor = self._claim_request(model, request_id)
        version = self._allocate(model, make, parent)
        self._undo_if_deleting(model, version, parent)
        log.info(
            "version created",
            extra={
                "event": "version_created",
                "model": model,
                "version": version.number,
                "parent": parent,
                "size": version.stored_bytes,
                "rescaled_from": version.rescaled_from,
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
                raise errors.DataLoss(Reason.MANIFEST_CORRUPT,
                                      f"lineage of {model}/{number} is broken: ancestor {current} is missing",
                                      model=model, version=number, ancestor=current) from None
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
                    f"version {number} of {model!r} has child versions {fmt_numbers(children)}",
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
