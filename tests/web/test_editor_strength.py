"""The editor's "View at strength" slider in Chromium against the real HTTP side: an edited
version's album follows the slider (debounced) with the server's images at that strength, no
version is made, and an import shows no slider. Tiny random DCGAN; version 2 is a random edit
stored directly (no fit). Needs what ``test_editor_e2e`` needs (the built page, Chromium,
playwright)."""

from __future__ import annotations

import pytest

from rulewright.service.domain.requests import SampleRequest, png_bytes
from rulewright.service.engine.delta import to_bytes
from tests.builders import random_deltas, tiny_domain
from tests.web.conftest import request
from tests.web.test_editor_e2e import browser, built_page  # noqa: F401 -- fixtures shared with the e2e tests

pytestmark = pytest.mark.timeout(300)

SEED = 0
ALBUM_IMG = f"[data-testid=album-img-{SEED}]"


@pytest.fixture(scope="module")
def edited(tmp_path_factory, built_page):  # noqa: F811 -- the imported fixture
    """(base URL, domain, number of the edited version)."""
    from rulewright.service.server import web

    domain = tiny_domain(tmp_path_factory.mktemp("editor-strength"))
    base = domain.generator(domain.resolve("tiny/1")).model
    edit = domain.registry.create_version("tiny", parent=1, spec={"strength": 0.7},
                                          delta=to_bytes(random_deltas(base, seed=2, strength=0.7)))
    server = web.WebServer(domain, "127.0.0.1:0").start()
    yield server.url, domain, edit.number
    server.stop()
    domain.close()


def album_png(page) -> bytes:
    """The bytes of the album image the page shows for SEED, as the page fetched them."""
    data = page.evaluate("""async (sel) => {
        const r = await fetch(document.querySelector(sel).src);
        return Array.from(new Uint8Array(await r.arrayBuffer()));
    }""", ALBUM_IMG)
    return bytes(data)


def test_the_strength_slider_redraws_the_album_at_that_strength_without_a_fit(browser, edited):  # noqa: F811
    url, domain, n = edited
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    asked: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("request", lambda r: asked.append(r.url) if f"/images/{SEED}.png?strength=" in r.url else None)
    try:
        page.goto(url + "/?model=tiny")
        page.wait_for_function("document.body.dataset.ready === 'true'")
        assert page.locator("[data-testid=view-strength-row]").is_hidden()          # v1 is an import
        page.select_option("[data-testid=version-select]", str(n))
        page.wait_for_selector("[data-testid=view-strength-row]", state="visible")
        slider = page.locator("[data-testid=view-strength]")
        assert float(slider.input_value()) == 0.7
        own = album_png(page)
        assert own == png_bytes(domain.sample(SampleRequest(f"tiny/{n}", seeds=[SEED])).images[0].numpy())

        # Twelve moves at once, as a drag makes them: one redraw, at the strength the slider rests on.
        slider.evaluate("""(el) => {
            for (let i = 1; i <= 12; i++) {
                el.value = String(0.7 + 0.1 * i);
                el.dispatchEvent(new Event("input", { bubbles: true }));
            }
        }""")
        rest = float(slider.input_value())
        page.wait_for_function(f"document.querySelector('{ALBUM_IMG}').src.includes('strength=')")
        page.wait_for_function(f"document.querySelector('{ALBUM_IMG}').complete")
        assert [u.split("strength=")[1] for u in asked] == [str(rest)]              # debounced: one request
        assert page.locator("[data-testid=view-strength-value]").get_attribute("data-value") == str(rest)
        shown = album_png(page)
        assert shown == png_bytes(domain.sample(SampleRequest(f"tiny/{n}", seeds=[SEED], strength=rest))
                                  .images[0].numpy())
        assert shown != own
        assert page.evaluate(f"document.querySelector('{ALBUM_IMG}').naturalWidth") == 32
        assert [v.number for v in domain.registry.list_versions("tiny").items] == [1, n]   # no fit, no version

        page.click("[data-testid=view-strength-reset]")
        page.wait_for_function(f"!document.querySelector('{ALBUM_IMG}').src.includes('strength=')")
        assert album_png(page) == own
        assert not errors, errors
    finally:
        context.close()


def test_the_image_route_takes_a_strength_and_names_it_when_refused(edited):
    url, domain, n = edited
    path = f"/api/models/tiny/versions/{n}/images/{SEED}.png"
    at = request(url, "GET", path + "?strength=1.5")
    assert at.status == 200 and at.headers["X-Rulewright-Strength"] == "1.5"
    assert at.data == png_bytes(domain.sample(SampleRequest(f"tiny/{n}", seeds=[SEED], strength=1.5)).images[0].numpy())
    assert request(url, "GET", path).headers["X-Rulewright-Strength"] == "0.7"
    for query, words in (("?strength=high", "must be a number"), ("?strength=12", "-10 to 10"),
                         ("?strength=nan", "-10 to 10")):
        refused = request(url, "GET", path + query)
        assert refused.status == 400 and words in refused.violations()["strength"], refused
    refused = request(url, "GET", f"/api/models/tiny/versions/1/images/{SEED}.png?strength=0.5")
    assert refused.status == 400 and "import" in refused.violations()["strength"]


def test_a_version_card_says_what_a_rescaled_version_is(browser, edited):  # noqa: F811
    """Its description, its strength and the version whose edit it rescales, without a fit."""
    from rulewright.service.domain.requests import RescaleRequest

    url, domain, n = edited
    milder = domain.rescale(RescaleRequest(f"tiny/{n}", 0.3, description="milder"))
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(30_000)
    try:
        page.goto(url + "/?model=tiny")
        page.wait_for_function("document.body.dataset.ready === 'true'")
        card = page.locator(f"[data-testid=version-origin-{milder.number}]")
        assert card.inner_text() == f"“milder” · strength 0.3 · v{n}'s edit rescaled, no fit"
        assert page.locator(f"[data-testid=version-origin-{n}]").inner_text() == "strength 0.7"
        assert page.locator("[data-testid=version-origin-1]").count() == 0          # an import: nothing to add
    finally:
        context.close()
