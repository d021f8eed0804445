"""The registry reads and deletions every transport shares, as ``Domain`` methods (``Catalog``).

``Domain`` mixes this in, so no transport reaches its registry: its store, models a page at a
time with their aliases and newest version (``ModelSummary``), versions with their lineages
(``VersionSummary``), aliases and their history, and the two deletions. Names are checked and
errors raised by the registry, as for every other call. ``lineages(registry, versions)``: each
version's lineage, every ancestor read once.

It also makes the one version that needs no engine work: ``rescale`` (an edited version's own
edit at another strength, its delta blob shared, no fit).
"""

from __future__ import annotations

from typing import Sequence

from rulewright.registry.manifests import AliasEntry, AliasState, Page, Version
from rulewright.registry.registry import Registry
from rulewright.service.domain.requests import ModelSummary, RescaleRequest, VersionSummary
from rulewright.service.engine.errors import InvalidArgument


class Catalog:
    """Listings, lookups and deletions of models, versions and aliases, and rescales; needs
    ``self.registry`` and the ``Domain``'s ``resolve``, ``describe_model`` and ``lineages``."""

    @property
    def store(self):
        """The registry's store: what health probes, logs name and remote workers open (its ``uri``)."""
        return self.registry.store

    def list_models(self, page_size: int = 0, page_token: str = "") -> Page[ModelSummary]:
        """Models in name order, a page at a time, each with its aliases and newest version."""
        page = self.registry.list_models(page_size, page_token)
        return Page([self.describe_model(m) for m in page.items], page.next_page_token)

    def has_models(self) -> bool:
        """Whether the registry holds any model (what a server that bootstraps none serves)."""
        return bool(self.registry.list_models(page_size=1).items)

    def delete_model(self, model: str, force: bool = False, author: str = "anonymous") -> None:
        """Delete a model; without ``force`` only one whose versions are all deleted."""
        self.registry.delete_model(model, force=force, author=author)

    def list_versions(self, model: str, page_size: int = 0, page_token: str = "") -> Page[VersionSummary]:
        """Live versions in number order, a page at a time, each with its lineage."""
        page = self.registry.list_versions(model, page_size, page_token)
        chains = self.lineages(page.items)
        return Page([VersionSummary(v, chain) for v, chain in zip(page.items, chains)], page.next_page_token)

    def get_version(self, model: str, number: int) -> VersionSummary:
        """One version with its lineage."""
        version = self.registry.get_version(model, number)
        return VersionSummary(version, self.lineages([version])[0])

    def delete_version(self, model: str, number: int, reason: str = "", author: str = "anonymous") -> None:
        """Delete a version no alias points to and no version builds on."""
        self.registry.delete_version(model, number, reason=reason, author=author)

    def list_aliases(self, model: str) -> list[AliasState]:
        """Every alias of ``model`` that is set, by name."""
        return self.registry.list_aliases(model)

    def alias_history(self, model: str, alias: str, page_size: int = 0, page_token: str = "") -> Page[AliasEntry]:
        """Every move of ``alias``, oldest first, a page at a time."""
        return self.registry.alias_history(model, alias, page_size, page_token)

    def rescale(self, request: RescaleRequest) -> Version:
        """A new version with ``request.model``'s own edit at ``request.strength``, in constant time.

        The new version applies the source's delta blob (no copy, no fit) at the new strength;
        its parent is the source's parent and it records the source (``rescaled_from``). The
        strength is checked before anything is read; an import (no edit) is INVALID_ARGUMENT
        naming ``strength``.
        """
        request.check()
        source = self.resolve(request.model)
        if source.kind != "edit":
            raise InvalidArgument("strength", f"{source.name} is an import: it has no edit to give a strength")
        return self.registry.rescale_version(source.model, source.number, strength=float(request.strength),
                                             description=request.description, author=request.author,
                                             request_id=request.request_id)

def lineages(registry: Registry, versions: Sequence[Version]) -> list[list[int]]:
    """The lineage (root first) of each version. Versions are immutable and name their parent, so
    one parent map serves the whole list: only ancestors outside it are read from the store, once."""
    parents: dict[tuple[str, int], int | None] = {(v.model, v.number): v.parent for v in versions}

    def lineage(model: str, number: int) -> list[int]:
        chain, current = [], number
        while current is not None:
            if current in chain:
                return [x.number for x in registry.get_lineage(model, number)]   # let it name the damage
            chain.append(current)
            if (model, current) not in parents:
                for ancestor in registry.get_lineage(model, current):
                    parents[(model, ancestor.number)] = ancestor.parent
            current = parents[(model, current)]
        return chain[::-1]

    return [lineage(v.model, v.number) for v in versions]
