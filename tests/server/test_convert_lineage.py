"""Listing versions reads each ancestor manifest once, not each version's whole chain again."""

from __future__ import annotations

import datetime
from rulewright.registry.manifests import Version
from rulewright.service.domain.core import lineages
from rulewright.service.server import convert


def _v(number: int, parent: int | None):
    return Version(model="m", number=number, parent=parent, kind="import" if parent is None else "edit",
                   spec={}, metrics={}, author="a", created_at=datetime.datetime(2026, 1, 1, tzinfo=datetime.timezone.utc),
                   blobs={}, request_id=None)


class CountingRegistry:
    """Stands in for the registry: a chain 1 <- 2 <- ... <- 9, counting lineage reads."""

    def __init__(self):
        self.versions = {n: _v(n, n - 1 if n > 1 else None) for n in range(1, 10)}
        self.reads = 0

    def get_lineage(self, model, number):
        chain, current = [], number
        while current is not None:
            self.reads += 1
            chain.append(self.versions[current])
            current = self.versions[current].parent
        return chain[::-1]


def test_a_page_of_versions_needs_no_lineage_reads_for_ancestors_on_the_page():
    registry = CountingRegistry()
    page = [registry.versions[n] for n in range(1, 10)]
    out = convert.version_pbs(page, lineages(registry, page))
    assert [list(m.lineage) for m in out] == [list(range(1, n + 1)) for n in range(1, 10)]
    assert registry.reads == 0


def test_ancestors_off_the_page_are_read_once():
    registry = CountingRegistry()
    page = [registry.versions[n] for n in range(6, 10)]         # the page starts at version 6
    out = convert.version_pbs(page, lineages(registry, page))
    assert list(out[-1].lineage) == list(range(1, 10))
    assert registry.reads == 5                                   # versions 5..1, once
