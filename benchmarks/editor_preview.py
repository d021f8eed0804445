"""Time to the first edited picture in the editor: a real browser presses Rewrite on a loaded spec.

``python -m benchmarks.editor_preview [--spec examples/edits/glasses.json] [--runs 1]``

It starts the HTTP side over a fresh registry with the faces model, computes the layer's key
statistics first (as a user who has rewritten before would have them cached), opens the built
editor page (``make web``) in headless Chromium, loads the spec and presses Rewrite. It prints the
seconds from the press to the first progress event, to the first edited picture on the page (a
preview image loaded, or the new version's album image loaded, whichever the page shows first),
and to the final version, with each progress text the page showed (stage and step count).

``--fits`` instead runs the two fits the page asks for (the draft: the user's pastes only, 50
steps, as ``web/src/main.js`` builds it; then the final) in this process and prints each one's
wall and CPU seconds: on a machine shared with other work, CPU seconds over the thread count
estimate the wall time on idle cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

# The first edited picture: a loaded preview image, or a loaded album image of a version other
# than the one the rewrite started from.
FIRST_PICTURE = """parent => {
  const loaded = (i) => i.complete && i.naturalWidth > 0;
  if ([...document.querySelectorAll('#preview-strip img')].some(loaded)) return 'preview';
  const album = [...document.querySelectorAll('#album img')];
  if (album.some((i) => loaded(i) && !i.src.includes(`/versions/${parent}/`))) return 'album';
  return null;
}"""


def measure(page, spec: Path, parent: int, limit: float) -> dict:
    """Load ``spec``, press Rewrite, poll the page until the new version shows; the timings."""
    page.get_by_test_id("spec-file").set_input_files(str(spec))
    page.wait_for_function("document.getElementById('message').dataset.kind === 'ok'")
    texts: list[str] = []
    first_progress = first_picture = done = None
    how = None
    started = time.perf_counter()
    page.get_by_test_id("btn-rewrite").click()
    while time.perf_counter() - started < limit:
        now = time.perf_counter() - started
        status = page.get_by_test_id("rewrite-status").inner_text()
        if not texts or texts[-1] != status:
            texts.append(status)
            print(f"  {now:6.1f} s  {status}", file=sys.stderr, flush=True)
        if first_progress is None and ":" in status and not status.startswith("submitting"):
            first_progress = now
        if first_picture is None:
            how = page.evaluate(FIRST_PICTURE, parent)
            if how:
                first_picture = now
        if status.startswith("done") and first_picture is not None:
            done = done or now
            break
        if status in ("failed", "cancelled", "lost"):
            raise SystemExit(f"rewrite {status}: {page.get_by_test_id('message').inner_text()}")
        time.sleep(0.05)
    return {"first_progress_s": first_progress, "first_picture_s": first_picture, "first_picture": how,
            "done_s": done, "statuses": texts}


# The draft the editor runs first (main.js draftSpec): no search, few steps, strength 1.
DRAFT = {"quality": "draft", "steps": 50, "strength": 1.0, "search": {"targets": 0}}


def fits(spec_path: Path) -> None:
    """Time the editor's draft and final fits (dry runs with previews) in this process."""
    import torch

    from rulewright.service.domain.core import Domain
    from rulewright.service.domain.requests import RewriteRequest
    from rulewright.service.importers.faces import import_faces

    spec = json.loads(spec_path.read_text())
    seeds = [p["seed"] for p in spec["paste"]][:6]
    with tempfile.TemporaryDirectory() as root:
        domain = Domain.open(Path(root), device="cpu")
        domain.bootstrap("faces", import_faces())
        for name, s in (("warm-up (statistics)", {**spec, **DRAFT, "steps": 1}), ("draft", {**spec, **DRAFT}),
                        ("final", {**spec, "quality": "final"})):
            wall, cpu = time.perf_counter(), time.process_time()
            try:
                domain.rewrite(RewriteRequest("faces/1", s, dry_run=True, preview_seeds=seeds))
            except Exception as exc:          # the 1-step warm-up may be refused as no improvement
                print(f"  ({name}: {type(exc).__name__})", file=sys.stderr)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            print(f"{spec_path.stem} {name:22s} wall {wall:6.1f} s  cpu {cpu:6.1f} s  "
                  f"({torch.get_num_threads()} threads)", flush=True)
        domain.close()


def main(argv: list[str] | None = None) -> int:
    """Run the editor against a fresh server and print the time to its first edited picture."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.editor_preview", description=__doc__.splitlines()[0])
    p.add_argument("--spec", default="examples/edits/glasses.json", help="the edit spec the page loads")
    p.add_argument("--runs", type=int, default=1, help="rewrites in a row (each from version 1)")
    p.add_argument("--limit", type=float, default=300.0, help="seconds to wait for one rewrite")
    p.add_argument("--static", default=None, help="serve the editor page from this folder (an older build, to compare)")
    p.add_argument("--fits", action="store_true", help="time the draft and final fits in-process instead")
    p.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = p.parse_args(argv)
    if args.fits:
        fits(Path(args.spec))
        return 0

    from playwright.sync_api import sync_playwright

    from rulewright.service.domain.core import Domain
    from rulewright.service.engine.edit import EditSpec
    from rulewright.service.importers.faces import import_faces
    from rulewright.service.server.web import WebServer

    with tempfile.TemporaryDirectory() as root:
        domain = Domain.open(Path(root), device="cpu")
        domain.bootstrap("faces", import_faces())
        spec = EditSpec.from_json(json.loads(Path(args.spec).read_text()), domain.generator(domain.resolve("faces/1")).model)
        started = time.perf_counter()
        domain.statistics(domain.resolve("faces/1"), spec.layer, spec.stats["samples"], spec.stats["seed_start"],
                          spec.truncation)
        print(f"key statistics of {spec.layer}: {time.perf_counter() - started:.1f} s (before timing)", file=sys.stderr)
        server = WebServer(domain, "127.0.0.1:0", static_dir=args.static).start()
        runs = []
        try:
            with sync_playwright() as pw:
                browser = pw.chromium.launch(executable_path=args.chromium, headless=True,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
                page = browser.new_page(viewport={"width": 1680, "height": 1180})
                page.set_default_timeout(60_000)
                for _ in range(args.runs):
                    page.goto(server.url + "/?model=faces")
                    page.wait_for_function("document.body.dataset.ready === 'true'")
                    page.get_by_test_id("album-img-0").wait_for()
                    runs.append(measure(page, Path(args.spec), 1, args.limit))
                browser.close()
        finally:
            server.stop()
            domain.close()
    for r in runs:
        fmt = lambda v: "-" if v is None else f"{v:.1f} s"  # noqa: E731
        print(f"{Path(args.spec).stem}: first progress {fmt(r['first_progress_s'])}, first edited picture "
              f"{fmt(r['first_picture_s'])} ({r['first_picture']}), final version {fmt(r['done_s'])}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
