"""Aliases: compare-and-set names for versions, with an append-only history.

``set_alias``, ``delete_alias``, ``rollback_alias``, ``get_alias``, ``list_aliases``,
``alias_history``, ``alias_at``; ``ANY`` means "do not check" for ``expected_version``.
``Aliases`` is one of the resources ``Registry`` composes over the shared ``Documents``.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from rulewright.registry import errors
from rulewright.registry.documents import Documents
from rulewright.registry.errors import Reason
from rulewright.registry.manifests import (
    AliasEntry, AliasState, Page, check_alias_name, check_model_name, check_page_size, check_version,
    decode_page_token, dumps, encode_page_token, loads, parse_etag, utc_now
)

log = logging.getLogger(__name__)


class _Any:
    def __repr__(self) -> str:
        return "ANY"


ANY: Any = _Any()


class Aliases(Documents):
    """Move, read, list and look back through aliases."""

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
            raise errors.invalid(Reason.INVALID_ARGUMENT, "expected_version",
                                 "state expected_version (None for a new alias) or etag")
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
            raise errors.invalid(Reason.INVALID_ARGUMENT, "expected_version", "state expected_version or etag")
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
            raise errors.Aborted(Reason.CONCURRENT_DELETE,
                                 f"version {to} of {model!r} is being deleted; alias {alias!r} was moved back",
                                 model=model, alias=alias, version=to)
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
        return errors.Aborted(Reason.ALIAS_CONFLICT,
                              f"alias {alias!r} of {model!r} {where} (etag {etag or 'none'}): {why}", model=model, alias=alias, current_version=version, etag=etag)

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
            raise errors.invalid(Reason.INVALID_ARGUMENT, "when", "must be timezone-aware")
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
