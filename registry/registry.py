"""Models, immutable versions and aliases with history, on any ``BlobStore``.

- ``Registry(store)`` / ``Registry.open(uri)``: the registry over one store.
- Models: ``import_model``, ``get_model``, ``list_models``, ``delete_model``.
- Versions: ``create_version`` (an edit: parent + low-rank delta blob), ``rescale_version`` (an
  edit's delta blob at another strength, shared, not copied), ``get_version``,
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

Each resource lives in its own module (``models``, ``versions``, ``aliases``) over the shared
``documents`` (keys, tombstones, deletion markers); ``Registry`` composes them.

No torch here: clients import this module.
"""

from __future__ import annotations

import re
from typing import Any

from rulewright.registry import errors
from rulewright.registry.aliases import ANY, Aliases
from rulewright.registry.documents import MARKER_LEASE_S
from rulewright.registry.errors import Reason
from rulewright.registry.manifests import Version
from rulewright.registry.models import Models
from rulewright.registry.stores import open_store
from rulewright.registry.versions import Versions

__all__ = ["ANY", "MARKER_LEASE_S", "Registry"]

_REF_RE = re.compile(r"^([a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)(?:/(\d+)|@([a-z0-9-]+))?$")


class Registry(Models, Versions, Aliases):
    """The model registry over one ``BlobStore`` (see the module docstring for the layout)."""

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

    def resolve(self, ref: str) -> Version:
        """The one version a reference names: ``faces/3``, ``faces@production``, or ``faces`` (the newest; the
        domain reads a bare name as its default alias before it asks)."""
        m = _REF_RE.match(ref) if isinstance(ref, str) else None
        if not m:
            raise errors.invalid(Reason.INVALID_REFERENCE, "model",
                                 f"not a model reference (name, name/N or name@alias): {ref!r}")
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

