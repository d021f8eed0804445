"""docs/editor.png: the editor after an edit, for the README.

Starts the real HTTP side over a throwaway Domain with the faces model, opens the page in
Debian's Chromium (headless, Playwright), loads examples/edits/glasses.json, rewrites (rank 2,
120 steps: a clean, local edit in about half a minute on a CPU), opens the first pasted face and
saves a screenshot.

    .venv/bin/python web/scripts/editor_screenshot.py [--out docs/editor.png]

Needs the built page (npm run build --prefix web), chromium and playwright, as the tests do.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(REPO / "docs" / "editor.png"))
    parser.add_argument("--rank", type=int, default=2)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--chromium", default=os.environ.get("RULEWRIGHT_CHROMIUM", "/usr/bin/chromium"))
    args = parser.parse_args()

    from playwright.sync_api import sync_playwright

    from rulewright.service.domain.core import Domain
    from rulewright.service.importers.faces import import_faces
    from rulewright.service.server.web import WebServer

    cache = Path(os.environ.get("RULEWRIGHT_CACHE_DIR", REPO / ".cache" / "rulewright"))
    with tempfile.TemporaryDirectory() as tmp:
        domain = Domain.open(tmp, device="cpu")
        domain.bootstrap("faces", import_faces(cache))
        server = WebServer(domain, "127.0.0.1:0").start()
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=args.chromium, headless=True,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
                page = browser.new_page(viewport={"width": 1680, "height": 1180})
                page.set_default_timeout(300_000)
                page.goto(server.url + "/")
                page.wait_for_function("document.body.dataset.ready === 'true'")
                page.get_by_test_id("spec-file").set_input_files(str(REPO / "examples" / "edits" / "glasses.json"))
                page.get_by_test_id("rank-input").fill(str(args.rank))
                page.get_by_test_id("steps-input").fill(str(args.steps))
                page.get_by_test_id("btn-rewrite").click()
                page.wait_for_function("document.getElementById('rewrite-status').textContent.startsWith('done')")
                page.get_by_test_id("album-tile-1").click()
                page.wait_for_function(
                    "[...document.querySelectorAll('img')].every(i => !i.getAttribute('src') || "
                    "(i.complete && i.naturalWidth > 0)) && [...document.querySelectorAll('canvas.thumb')]"
                    ".every(c => c.dataset.loaded)")
                page.wait_for_timeout(300)
                page.screenshot(path=args.out, full_page=True)
                browser.close()
        finally:
            server.stop()
            domain.close()
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
