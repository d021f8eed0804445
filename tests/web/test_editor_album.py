"""The editor's album in Chromium: a click lands on the tile under the pointer even when the press
itself re-renders the album (a typed page size or start seed is applied when its box loses focus,
which the press on the tile causes). Fixtures and helpers as in test_editor_e2e.py."""

from __future__ import annotations

import pytest

from tests.web.test_editor_e2e import base_url, browser, built_page, domain, page, tid  # noqa: F401 (fixtures)

pytestmark = pytest.mark.timeout(300)


def _work_seed(page) -> str | None:
    return page.evaluate("document.getElementById('work-seed').dataset.seed ?? null")


def _album(page) -> list[str]:
    return page.evaluate("[...document.querySelectorAll('#album figure')].map(f => f.dataset.seed)")


def test_a_typed_page_size_does_not_swallow_the_click_on_a_tile(page):
    tid(page, "album-tile-0").wait_for()
    assert len(_album(page)) == 24 and _work_seed(page) is None
    tid(page, "album-size").fill("8")           # applied on change, i.e. when the press below takes the focus
    tid(page, "album-tile-3").click()
    assert _album(page) == [str(s) for s in range(8)]
    assert _work_seed(page) == "3"
    assert "work" in tid(page, "album-tile-3").get_attribute("class")


def test_a_typed_start_seed_does_not_swallow_the_click_on_a_tile_that_stays(page):
    tid(page, "album-tile-0").wait_for()
    tid(page, "album-start").fill("4")
    tid(page, "album-tile-9").click()
    assert _album(page) == [str(s) for s in range(4, 28)]
    assert _work_seed(page) == "9"
