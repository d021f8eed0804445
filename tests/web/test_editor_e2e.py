"""End-to-end browser tests of the editor page: Playwright drives Debian's Chromium,
headless, against the real HTTP server over a Domain with the faces model.

One screenshot per step goes to ``out/editor-e2e/NN-name.png``. With
``RULEWRIGHT_UPDATE_SCREENSHOT=1`` the test also writes ``docs/editor.png`` (the README's
picture of the editor after an edit).

Needs: the built page (``npm run build --prefix web``, which ``make test`` runs), Chromium
(``/usr/bin/chromium``, or ``$RULEWRIGHT_CHROMIUM``) and the ``playwright`` package; a missing
one fails under CI and skips elsewhere (``tests.support.missing``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from rulewright.service.engine.edit import QUALITY
from tests.support import missing

REPO = Path(__file__).resolve().parents[2]
WEBUI = REPO / "service" / "server" / "webui"
SHOTS = REPO / "out" / "editor-e2e"
DOCS_SHOT = REPO / "docs" / "editor.png"
GLASSES = REPO / "examples" / "edits" / "glasses.json"
STEPS = 30                     # rewrite steps in the tests: seconds on a CPU
TIMEOUT_MS = 120_000           # the first rewrite also computes the layer's key statistics

pytestmark = pytest.mark.timeout(600)


# ---- fixtures -------------------------------------------------------------------------------------

def _chromium() -> str:
    for candidate in (os.environ.get("RULEWRIGHT_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).exists():
            return candidate
    missing("chromium (apt-get install chromium)")


@pytest.fixture(scope="module")
def built_page() -> Path:
    if shutil.which("node") is None or shutil.which("npm") is None:
        missing("node and npm (to build the editor page)")
    for name in ("index.html", "assets/app.js", "assets/app.css"):
        if not (WEBUI / name).is_file():
            missing(f"the built editor page ({WEBUI / name}; npm ci --prefix web && npm run build --prefix web)")
    return WEBUI


@pytest.fixture(scope="module")
def domain(tmp_path_factory, faces_path):
    from rulewright.service.domain.core import Domain

    domain = Domain.open(tmp_path_factory.mktemp("editor-e2e"), device="cpu")
    domain.bootstrap("faces", faces_path)
    yield domain
    domain.close()


@pytest.fixture(scope="module")
def base_url(domain, built_page) -> str:
    """The real HTTP side (service/server/web/) on a free loopback port."""
    from rulewright.service.server import web

    server = web.WebServer(domain, "127.0.0.1:0").start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing("playwright (pip install playwright; browsers are not downloaded, Debian's chromium is used)")
    executable = _chromium()
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=executable, headless=True,
                                     args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        yield browser
        browser.close()


@pytest.fixture
def page(browser, base_url):
    context = browser.new_context(viewport={"width": 1680, "height": 1180}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(30_000)
    errors: list[str] = []
    foreign: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    # offline: the page asks nothing of any host but its own server (no CDN, no fonts)
    page.on("request", lambda r: None if r.url.startswith((base_url + "/", "blob:", "data:")) else foreign.append(r.url))
    page.goto(base_url + "/")
    page.wait_for_function("document.body.dataset.ready === 'true'")
    assert page.evaluate("getComputedStyle(document.querySelector('.layout')).display") == "grid", "app.css not applied"
    yield page
    context.close()
    assert not errors, f"uncaught errors in the page: {errors}"
    assert not foreign, f"the page fetched from other hosts: {foreign}"


class Shots:
    """Step-numbered screenshots under out/editor-e2e/."""

    def __init__(self, page, prefix: str):
        SHOTS.mkdir(parents=True, exist_ok=True)
        self.page, self.prefix, self.n = page, prefix, 0

    def __call__(self, name: str) -> Path:
        self.n += 1
        settle(self.page)
        path = SHOTS / f"{self.prefix}{self.n:02d}-{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path


# ---- page helpers ---------------------------------------------------------------------------------

SCALE = 6   # the work image is shown 6× (main.js STAGE_SCALE)


def tid(page, testid: str):
    return page.get_by_test_id(testid)


def wait_image(page, testid: str) -> None:
    page.wait_for_function(
        "id => { const i = document.querySelector(`[data-testid=\"${id}\"]`); "
        "return i && i.complete && i.naturalWidth > 0; }", arg=testid, timeout=TIMEOUT_MS)


def settle(page) -> None:
    """Wait until every album image, heatmap and tray thumbnail has loaded (before a screenshot)."""
    page.wait_for_function(
        "[...document.querySelectorAll('#album img, #dissect-units img, #work-image')]"
        ".every(i => !i.getAttribute('src') || (i.complete && (i.naturalWidth > 0 || i.classList.contains('broken'))))"
        " && [...document.querySelectorAll('.thumb')].every(c => c.dataset.loaded || c.dataset.pending"
        " || c.classList.contains('broken'))",
        timeout=TIMEOUT_MS)


def pixels(page, testid: str) -> list[int]:
    wait_image(page, testid)
    return page.evaluate(
        "id => { const i = document.querySelector(`[data-testid=\"${id}\"]`); const c = document.createElement('canvas');"
        " c.width = i.naturalWidth; c.height = i.naturalHeight; const x = c.getContext('2d'); x.drawImage(i, 0, 0);"
        " return Array.from(x.getImageData(0, 0, c.width, c.height).data); }", testid)


def work_on(page, seed: int) -> None:
    tid(page, f"album-tile-{seed}").click()
    page.wait_for_function("s => document.getElementById('work-seed').dataset.seed === String(s)", arg=seed)
    wait_image(page, "work-image")


def canvas_point(page, x: float, y: float) -> tuple[float, float]:
    box = tid(page, "work-canvas").bounding_box()
    return box["x"] + x * SCALE, box["y"] + y * SCALE


def stroke(page, points: list[tuple[float, float]]) -> None:
    """A mouse drag through ``points`` (image pixels) on the work canvas."""
    page.mouse.move(*canvas_point(page, *points[0]))
    page.mouse.down()
    for p in points[1:]:
        page.mouse.move(*canvas_point(page, *p), steps=8)
    page.mouse.up()


def drag_box(page, x0, y0, x1, y1) -> None:
    tid(page, "tool-box").click()
    stroke(page, [(x0, y0), (x1, y1)])


def message(page) -> str:
    box = tid(page, "message")
    box.wait_for(state="visible")
    return box.inner_text()


def expect_message(page, *parts: str, kind: str | None = None) -> str:
    """Wait until the message area shows every one of ``parts``; returns its text."""
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    text = ""
    while time.monotonic() < deadline:
        text = message(page)
        if all(p in text for p in parts) and (kind is None or tid(page, "message").get_attribute("data-kind") == kind):
            return text
        time.sleep(0.1)
    raise AssertionError(f"message {text!r} lacks {parts} (kind {kind})")


def run_rewrite(page, steps: int = STEPS) -> dict:
    """Press Rewrite and follow it to 100 %; (seen progress values in order, status texts, whether
    a draft preview showed, the new version)."""
    tid(page, "steps-input").fill(str(steps))
    seen: list[int] = []
    statuses: list[str] = []
    draft_seen = False
    tid(page, "btn-rewrite").click()
    deadline = time.monotonic() + 2 * TIMEOUT_MS / 1000      # two fits: the draft, then the final
    while time.monotonic() < deadline:
        seen.append(int(page.evaluate("document.getElementById('rewrite-progress').value")))
        status = tid(page, "rewrite-status").inner_text()
        if not statuses or statuses[-1] != status:
            statuses.append(status)
        draft_seen = draft_seen or page.evaluate(
            "document.getElementById('preview-strip').dataset.kind === 'draft'"
            " && [...document.querySelectorAll('#previews img.edited')].some(i => i.complete && i.naturalWidth > 0)")
        if status.startswith("done"):
            break
        if status in ("failed", "cancelled", "lost"):
            raise AssertionError(f"rewrite {status}: {message(page)}")
        time.sleep(0.05)
    else:
        raise AssertionError(f"rewrite did not finish: {tid(page, 'rewrite-status').inner_text()}")
    assert tid(page, "rewrite-percent").inner_text() == "100%"
    version = int(tid(page, "rewrite-status").inner_text().split("v")[1].split()[0])
    tid(page, f"version-{version}").wait_for()
    page.wait_for_function("v => document.getElementById('version-select').value === String(v)", arg=version)
    return {"seen": seen, "statuses": statuses, "draft_seen": draft_seen, "version": version,
            "loss": tid(page, "rewrite-loss").inner_text()}


# ---- the whole workflow ---------------------------------------------------------------------------

def test_editor_end_to_end(page, domain):
    """Album → copy mask → paste → two context regions → rewrite to 100 % → new version → toggle
    original/edited → roll back → dissect and ablate; a screenshot of each step."""
    shot = Shots(page, "")

    # 1. the album
    tid(page, "album-tile-0").wait_for()
    for seed in (0, 1, 23):
        wait_image(page, f"album-img-{seed}")
    assert page.locator("[data-testid^='album-tile-']").count() == 24
    assert "faces" in tid(page, "model-select").inner_text()
    assert tid(page, "version-select").input_value() == "1"
    shot("album")

    # 2. a copy mask: brush over the glasses of seed 35 (on the album's second page)
    tid(page, "album-next").click()
    tid(page, "album-tile-35").wait_for()
    work_on(page, 35)
    tid(page, "tool-brush").click()
    tid(page, "brush-radius").fill("4")
    for y in (26, 30, 34):
        stroke(page, [(11, y), (32, y), (53, y)])
    tid(page, "btn-copy").click()
    expect_message(page, "Copied a region of seed 35", kind="ok")
    tid(page, "copy-thumb").wait_for()
    shot("copy-mask")

    # 3. paste it onto seed 1 and drag it up by 2 pixels
    tid(page, "album-prev").click()
    work_on(page, 1)
    tid(page, "btn-paste").click()
    expect_message(page, "Pasted onto seed 1", kind="ok")
    assert "active" in tid(page, "tool-move").get_attribute("class")
    stroke(page, [(32, 30), (32, 29), (32, 28)])
    item = tid(page, "paste-item-0")
    assert "seed 1 (+0, -2)" in item.inner_text()
    shot("paste")

    # 4. two context regions: the eyes of seeds 9 and 23 (boxes)
    for seed, box in ((9, (8, 20, 56, 36)), (23, (8, 22, 56, 38))):
        work_on(page, seed)
        drag_box(page, *box)
        tid(page, "btn-add-context").click()
    tid(page, "context-item-1").wait_for()
    assert page.locator("[data-testid^='context-item-']").count() == 2
    shot("context")

    # 5. context matches on the album, then Search reorders it by response
    tid(page, "toggle-matches").check()
    expect_message(page, "Context response over 24 images", kind="ok")
    assert page.locator("[data-testid^='album-match-']").count() > 0
    shot("context-matches")
    tid(page, "btn-search").click()
    expect_message(page, "Album ordered by context response", kind="ok")
    scores = [float(s) for s in page.locator(".tile .score").all_inner_texts()]
    assert scores and scores == sorted(scores, reverse=True)
    shot("search")
    tid(page, "btn-search-clear").click()
    tid(page, "toggle-matches").uncheck()

    # 6. rewrite (layer main.6, rank 8, 30 steps): progress and live loss up to 100 %
    assert "main.6 (8×8→16×16, 256→128 ch)" in tid(page, "layer-select").locator("option:checked").inner_text()
    tid(page, "rank-input").fill("2")
    run = run_rewrite(page)
    assert run["version"] == 2
    assert any(0 < v < 100 for v in run["seen"]), run["seen"]
    assert run["seen"] == sorted(run["seen"]), "one bar for draft and final: it never goes back"
    assert run["loss"].startswith("loss ")
    # a draft preview (a dry run on the user's pastes) showed first, then the final's previews
    assert run["draft_seen"], run["statuses"]
    assert any(s.startswith("draft — optimize: ") and s.endswith(f"/{STEPS}") for s in run["statuses"]), run["statuses"]
    assert any(s.startswith("final — optimize: ") for s in run["statuses"]), run["statuses"]
    assert tid(page, "preview-strip").get_attribute("data-kind") == "final"
    wait_image(page, "preview-img-1")                       # the paste target, edited by the new version
    shot("rewrite-done")
    # the targets its context search found, folded below the Rewrite controls: none of their
    # thumbnails is requested until the tray is opened
    found = QUALITY["final"]["search_targets"]              # the default rewrite's found targets
    assert tid(page, "found-count").inner_text() == f"({found})"
    assert not tid(page, "found-item-0").is_visible()
    assert page.locator("#found-tray .thumb[data-pending]").count() == found
    assert tid(page, "btn-rewrite").bounding_box()["y"] < tid(page, "found-block").bounding_box()["y"]
    tid(page, "found-count").click()
    page.wait_for_function("document.querySelector('[data-testid=found-thumb-0]').dataset.loaded === 'true'")
    assert page.locator("#found-tray .thumb[data-pending]").count() > 0, "thumbnails out of view wait"
    tid(page, "found-remove-0").click()
    assert tid(page, "found-count").inner_text() == f"({found - 1})"
    assert page.locator("[data-testid^=found-item-]").count() == found - 1

    # 7. the new version in the panel: lineage, author, spec summary
    v2 = tid(page, "version-2")
    assert "lineage v1 → v2" in v2.inner_text()
    assert "rewrite main.6 · rank 2 · 30 steps" in tid(page, "version-spec-2").inner_text()
    assert "paste 1" in tid(page, "version-spec-2").inner_text()
    assert "context 2 region(s)" in tid(page, "version-spec-2").inner_text()
    assert domain.registry.resolve("faces/2").parent == 1
    work_on(page, 1)
    shot("new-version")
    if os.environ.get("RULEWRIGHT_UPDATE_SCREENSHOT"):
        settle(page)
        page.screenshot(path=str(DOCS_SHOT), full_page=True)

    # 8. toggle original / edited: the pasted face's pixels change
    edited = pixels(page, "album-img-1")
    tid(page, "toggle-original").click()
    page.wait_for_function("document.querySelector('[data-testid=album-img-1]').src.includes('/versions/1/')")
    original = pixels(page, "album-img-1")
    assert original != edited
    assert tid(page, "album-showing").inner_text() == "original (v1)"
    shot("original")
    tid(page, "toggle-original").click()
    page.wait_for_function("document.querySelector('[data-testid=album-img-1]').src.includes('/versions/2/')")
    assert pixels(page, "album-img-1") == edited
    shot("edited")

    # 9. promote v2 to production, then roll back to v1
    tid(page, "version-promote-2").click()
    expect_message(page, "production now points at v2", kind="ok")
    assert tid(page, "alias-version-production").inner_text() == "→ v2"
    shot("promoted")
    tid(page, "alias-rollback-production").click()
    expect_message(page, "production rolled back to v1", kind="ok")
    assert tid(page, "alias-version-production").inner_text() == "→ v1"
    assert domain.registry.resolve("faces@production").number == 1
    history = tid(page, "alias-production").inner_text()
    assert "v2 → v1" in history and "v1 → v2" in history
    shot("rolled-back")

    # 10. dissect a region (the eyes of seed 1) and ablate its top unit
    work_on(page, 1)
    drag_box(page, 8, 20, 56, 36)
    tid(page, "btn-dissect").click()
    first = page.locator("[data-testid^='dissect-unit-']").first
    first.wait_for(timeout=TIMEOUT_MS)
    assert page.locator("[data-testid^='dissect-unit-']").count() == 8
    unit = int(first.get_attribute("data-testid").rsplit("-", 1)[1])
    wait_image(page, f"dissect-map-{unit}")
    shot("dissect")
    before = pixels(page, "album-img-1")
    tid(page, f"dissect-check-{unit}").check()
    tid(page, "btn-ablate").click()
    page.wait_for_function(f"document.querySelector('[data-testid=album-img-1]').src.includes('ablate={unit}')")
    after = pixels(page, "album-img-1")
    assert after != before
    assert f"unit(s) {unit} of main.6" in tid(page, "ablation-info").inner_text()
    shot("ablate")
    tid(page, "btn-ablate-clear").click()
    page.wait_for_function("!document.querySelector('[data-testid=album-img-1]').src.includes('ablate=')")

    # 11. save the edit spec as JSON (the examples/edits format) and load one back
    with page.expect_download() as download:
        tid(page, "btn-save-spec").click()
    saved = json.loads(Path(download.value.path()).read_text())
    assert saved["model"] == "faces" and saved["layer"] == "main.6" and saved["steps"] == STEPS
    assert saved["copy"]["seed"] == 35 and saved["copy"]["mask"]["encoding"] == "zlib-base64-u8"
    assert [p["seed"] for p in saved["paste"]] == [1] and [c["seed"] for c in saved["context"]] == [9, 23]
    from rulewright.service.engine.edit import EditSpec

    checked = EditSpec.from_json(saved, domain.generator(domain.resolve("faces/1")).model)
    assert checked.copy.mask.shape == (64, 64) and int(checked.copy.mask.max()) == 255
    tid(page, "spec-file").set_input_files(str(GLASSES))
    expect_message(page, 'Loaded "glasses"', "6 paste", kind="ok")
    assert page.locator("[data-testid^='paste-item-']").count() == 6
    shot("spec-loaded")


# ---- bad input ------------------------------------------------------------------------------------

def test_bad_input_shows_clear_messages(page, domain):
    """Empty mask, paste before copy, invalid fields, a version deleted meanwhile: a clear message
    each time, and the page keeps working."""
    shot = Shots(page, "bad-")
    tid(page, "album-tile-0").wait_for()

    # no region at all, then a region painted and erased again: the mask is empty
    work_on(page, 4)
    tid(page, "btn-copy").click()
    expect_message(page, "The mask is empty", kind="error")
    tid(page, "tool-brush").click()
    stroke(page, [(20, 20), (40, 20)])
    tid(page, "tool-erase").click()
    tid(page, "brush-radius").fill("12")
    stroke(page, [(14, 20), (46, 20)])
    tid(page, "btn-add-context").click()
    expect_message(page, "The mask is empty", kind="error")
    shot("empty-mask")

    # paste before any copy
    tid(page, "btn-paste").click()
    expect_message(page, "Paste needs a copied region first", kind="error")
    assert page.locator("[data-testid^='paste-item-']").count() == 0
    shot("paste-before-copy")

    # a rewrite with nothing pasted, and a server-side field violation (a loaded spec's bad lr)
    tid(page, "btn-rewrite").click()
    expect_message(page, "A rewrite needs a copied region", kind="error")
    bad = json.loads(GLASSES.read_text())
    bad["lr"] = 99.0
    tid(page, "spec-file").set_input_files(files=[{"name": "bad.json", "mimeType": "application/json",
                                                   "buffer": json.dumps(bad).encode()}])
    expect_message(page, 'Loaded "glasses"', kind="ok")
    tid(page, "steps-input").fill("5")
    tid(page, "btn-rewrite").click()
    text = expect_message(page, "INVALID_ARGUMENT", "lr", kind="error")
    assert "must lie in" in text
    shot("field-violation")

    # a version deleted meanwhile: make one, open it, delete it behind the page's back, act on it
    spec = json.loads(GLASSES.read_text())
    spec["steps"] = 20                      # fewer leave the fit at no edit, which is refused
    from rulewright.service.domain.requests import RewriteRequest

    number = domain.rewrite(RewriteRequest("faces/1", spec, author="tests")).version.number
    tid(page, "btn-refresh").click()
    tid(page, f"version-open-{number}").click()
    page.wait_for_function("v => document.getElementById('version-select').value === String(v)", arg=number)
    wait_image(page, "album-img-1")
    domain.registry.delete_version("faces", number, author="tests", reason="deleted meanwhile")
    tid(page, "btn-rewrite").click()
    text = expect_message(page, "NOT_FOUND", f"Version {number} of faces no longer exists", kind="error")
    shot("version-deleted")
    assert page.locator(f"[data-testid='version-{number}']").count() == 0
    assert tid(page, "version-select").input_value() != str(number)

    # the page keeps working: the album renders, a new region copies and pastes
    wait_image(page, "album-img-1")
    work_on(page, 2)
    drag_box(page, 8, 22, 56, 38)
    tid(page, "btn-copy").click()
    expect_message(page, "Copied a region of seed 2", kind="ok")
    work_on(page, 3)
    tid(page, "btn-paste").click()
    expect_message(page, "Pasted onto seed 3", kind="ok")
    shot("still-working")


def test_cancel_rewrite(page, domain):
    """Cancel stops a running rewrite: a clear message, no new version, and the page can rewrite again."""
    shot = Shots(page, "cancel-")
    before = {v.number for v in domain.registry.list_versions("faces", 1000, "").items}
    tid(page, "spec-file").set_input_files(str(GLASSES))
    expect_message(page, 'Loaded "glasses"', kind="ok")
    tid(page, "steps-input").fill("20000")
    tid(page, "btn-rewrite").click()
    page.wait_for_function("document.getElementById('rewrite-status').dataset.stage === 'optimize'"
                           " && document.getElementById('rewrite-progress').value > 0", timeout=TIMEOUT_MS)
    assert tid(page, "btn-rewrite").is_disabled()
    tid(page, "btn-cancel").click()
    expect_message(page, "Rewrite cancelled: no version was created")
    assert tid(page, "rewrite-status").inner_text() == "cancelled"
    assert not tid(page, "btn-rewrite").is_disabled()
    shot("cancelled")
    assert {v.number for v in domain.registry.list_versions("faces", 1000, "").items} == before


# ---- the strength curve ---------------------------------------------------------------------------

CURVE = {"points": [{"strength": s, "detected": d, "side_effect": e, "box_edge": b}
                    for s, d, e, b in ((0.25, 0.01, 0.005, 0.31), (0.5, 0.08, 0.010, 0.33), (1.0, 0.43, 0.020, 0.40),
                                       (1.5, 0.62, 0.031, 0.52), (2.0, 0.65, 0.046, 0.61))],
         "chosen": 1.0, "rule": "the largest strength whose side effect stays under fine-tuning's"}


def _canvas_column(page, x: float) -> list[list[int]]:
    """The RGBA pixels of the strength curve's column ``x`` (canvas pixels)."""
    return page.evaluate(
        "x => { const c = document.getElementById('strength-curve'); const d = c.getContext('2d')"
        ".getImageData(Math.round(x), 0, 1, c.height).data; const out = [];"
        " for (let i = 0; i < d.length; i += 4) out.push([d[i], d[i + 1], d[i + 2], d[i + 3]]); return out; }", x)


def test_strength_curve(page, domain):
    """A version whose metrics hold a strength curve shows it beside Strength, marking the chosen
    strength and the field's; a click on the curve sets the field; a version without one shows none."""
    from rulewright.service.engine.delta import to_bytes
    from tests.builders import random_deltas

    shot = Shots(page, "curve-")
    model = domain.generator(domain.resolve("faces/1")).model
    with_curve = domain.registry.create_version(
        "faces", parent=1, delta=to_bytes(random_deltas(model, seed=7, strength=0.2)), spec={"name": "curve"},
        metrics={"strength_curve": CURVE, "seconds": 1.0}).number
    tid(page, "btn-refresh").click()
    tid(page, f"version-open-{with_curve}").click()
    page.wait_for_function("v => document.getElementById('version-select').value === String(v)", arg=with_curve)
    canvas = tid(page, "strength-curve")
    canvas.wait_for(state="visible")
    assert canvas.get_attribute("data-points") == "5" and canvas.get_attribute("data-chosen") == "1"
    info = tid(page, "strength-curve-info").inner_text()
    assert "chosen 1 (the largest strength whose side effect" in info
    assert "at 1: detected 43%, side effect 0.0200" in info           # blank field: the chosen strength
    assert canvas.get_attribute("data-slider") == ""

    tid(page, "strength-input").fill("1.5")
    page.wait_for_function("document.getElementById('strength-curve').dataset.slider === '1.5'")
    chosen_x, slider_x = float(canvas.get_attribute("data-chosen-x")), float(canvas.get_attribute("data-slider-x"))
    assert slider_x > chosen_x + 10
    assert "at 1.5: detected 62%, side effect 0.0310" in tid(page, "strength-curve-info").inner_text()
    marker = _canvas_column(page, slider_x)
    assert sum(1 for r, g, b, a in marker if a and r > 200 and g > 180 and b < 120) > 50, "the field's strength marker"
    shot("marked")

    # a click on the curve sets the field to the strength under it (to 0.05)
    box = canvas.bounding_box()
    page.mouse.click(box["x"] + chosen_x * box["width"] / 300, box["y"] + box["height"] / 2)
    page.wait_for_function("document.getElementById('strength-input').value === '1'")
    assert canvas.get_attribute("data-slider") == "1"

    tid(page, "version-open-1").click()
    page.wait_for_function("document.getElementById('version-select').value === '1'")
    assert tid(page, "strength-curve-box").is_hidden()
    shot("no-curve")


def test_the_page_declares_an_icon_the_server_serves(page, base_url):
    """No 404 for the tab's icon on every load: the page names one, and it is there."""
    href = page.evaluate("document.querySelector('link[rel=icon]')?.href")
    assert href == base_url + "/favicon.ico"
    icon = page.request.get(href)
    assert icon.status == 200 and icon.headers["content-type"].startswith("image/svg+xml")
