"""How well the strength curve's renders-only share agrees with each edit's trained detector.

``python -m benchmarks.strength_agreement [--edits glasses,mask] [--heldout 100] [--json out/agreement.json]``
``python -m benchmarks.strength_agreement --defaults``: the default rewrite of each edit (the strength
its curve picks): its time, the curve's time, the strength, and the detector on the held-out faces.

For every shipped edit it runs the default (final-quality) rewrite with its strength fixed at 1,
then renders the benchmark's held-out faces (from ``edit_quality.HELDOUT_START``) at the curve's
strengths and compares, face by face, the detector's call (P(edited) ≥ 0.5; the detector of
``benchmarks.edit_quality``, cached under ``out/detectors/``) with the curve's call (the edit
closed at least a given share of the face's distance to its ideal inside the box), for several
such shares. It prints both detected shares per strength, the faces on which the calls agree,
the strength each share's rule would pick, and the time the curve itself takes inside a rewrite.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from benchmarks import detectors
from benchmarks.edit_quality import HELDOUT_START
from rulewright.service.engine.delta import with_strength
from rulewright.service.engine.device import configure_determinism
from rulewright.service.engine.edit import EditSpec, render_edited, Edit
from rulewright.service.engine.evaluate import heldout_metrics, ideal_images, paste_geometry
from rulewright.service.engine.goals import _box_mask
from rulewright.service.engine.loading import load_generator
from rulewright.service.engine.rewrite import rewrite
from rulewright.service.engine.sampling import latents
from rulewright.service.engine.stats import key_moment
from rulewright.service.engine.strength import CURVE_STRENGTHS, closed_share, measure_curve
from rulewright.service.importers.faces import import_faces

SHARES = (0.0, 0.1, 0.25, 0.4, 0.5)


def fitted(model, path: Path, choose: bool) -> tuple[EditSpec, object, float, object, float]:
    """(spec, edit, rewrite seconds, its curve, curve seconds) of a shipped edit, statistics cached;
    ``choose``: the strength its curve picks (the default), else the spec's."""
    base = json.loads(path.read_text())
    spec = EditSpec.from_json(base, model)
    s = spec.stats
    C = key_moment(model, spec.layer, range(s["seed_start"], s["seed_start"] + s["samples"])).moment()
    started = time.perf_counter()
    edit = rewrite(model, base if choose else spec, moment=C)
    seconds = time.perf_counter() - started
    started = time.perf_counter()
    curve = measure_curve(model, EditSpec.from_json(edit.spec, model), edit.deltas)
    return spec, edit, seconds, curve, time.perf_counter() - started


def measure_edit(model, path: Path, seeds: list[int], batch: int = 50) -> dict:
    """Per strength and face: the detector's probability and the share of the gap to the ideal closed."""
    spec, edit, rewrite_seconds, _, curve_seconds = fitted(model, path, choose=False)
    user = EditSpec.from_json({**edit.spec, "found": []}, model)
    detector, info = detectors.load_or_train(model, user)
    geometry = paste_geometry(model, user)
    box = _box_mask(geometry["image_box"])
    rows = {s: {"probability": [], "closed": []} for s in CURVE_STRENGTHS}
    for start in range(0, len(seeds), batch):
        z = latents(seeds[start:start + batch], model.z_dim)
        with torch.no_grad():
            original = model(z, spec.truncation)
            ideal = ideal_images(model, user, z, geometry)
            for strength in CURVE_STRENGTHS:
                scaled = Edit(edit.layer, with_strength(edit.deltas, strength), edit.spec, {})
                edited = render_edited(model, [scaled], z, spec.truncation)
                rows[strength]["probability"] += detector.probability(edited).tolist()
                rows[strength]["closed"] += closed_share(original, edited, ideal, box).tolist()
    return {"rows": {str(k): v for k, v in rows.items()}, "rewrite_seconds": rewrite_seconds,
            "curve_seconds": curve_seconds, "detector_accuracy": info["check_accuracy"],
            "curve": edit.metrics["strength_curve"]}


def summarize(results: dict) -> None:
    """Per edit and strength: detector share, each renders-only share, and face-level agreement."""
    for name, r in results.items():
        print(f"\n{name} (detector accuracy {100 * r['detector_accuracy']:.1f}%, rewrite {r['rewrite_seconds']:.1f} s, "
              f"curve {r['curve_seconds']:.2f} s)")
        print(f"  {'strength':>8s} {'detector':>8s}  " + "  ".join(f"closed≥{c:<4} agree" for c in SHARES))
        for strength, row in r["rows"].items():
            det = [p >= 0.5 for p in row["probability"]]
            cells = []
            for c in SHARES:
                ours = [x >= c if c > 0 else x > 0 for x in row["closed"]]
                agree = sum(a == b for a, b in zip(det, ours)) / len(det)
                cells.append(f"{100 * sum(ours) / len(ours):6.1f}% {100 * agree:5.1f}%")
            print(f"  {strength:>8s} {100 * sum(det) / len(det):7.1f}%  " + "  ".join(cells))
    print("\nover every edit and strength: mean |share difference| and face agreement per threshold")
    for c in SHARES:
        diffs, agrees = [], []
        for r in results.values():
            for row in r["rows"].values():
                det = [p >= 0.5 for p in row["probability"]]
                ours = [x >= c if c > 0 else x > 0 for x in row["closed"]]
                diffs.append(abs(sum(det) - sum(ours)) / len(det))
                agrees.append(sum(a == b for a, b in zip(det, ours)) / len(det))
        print(f"  closed ≥ {c:<4}: |share − detector| {100 * sum(diffs) / len(diffs):5.1f} points, "
              f"faces agreeing {100 * sum(agrees) / len(agrees):5.1f}%")


def defaults(model, names: list[str], seeds: list[int]) -> None:
    """Each edit's default rewrite (a JSON spec naming no strength), timed, and its detected share."""
    print(f"default rewrites ({torch.get_num_threads()} threads, statistics cached), {len(seeds)} held-out faces:")
    for name in names:
        spec, edit, seconds, curve, curve_seconds = fitted(model, Path("examples/edits") / f"{name}.json", choose=True)
        user = EditSpec.from_json({**edit.spec, "found": []}, model)
        detector, _ = detectors.load_or_train(model, user)
        held = heldout_metrics(model, user, seeds, lambda z: render_edited(model, [edit], z, spec.truncation),
                               detect=detector.probability)
        print(f"  {name:11s} strength {edit.spec['strength']:4.2f}  rewrite {seconds:5.1f} s (curve {curve_seconds:.2f} s)  "
              f"detected {100 * held['detected']:5.1f}%  side effect {held['side_effect']:.4f}  "
              f"box edge {held['box_edge']:.2f}  curve: " + " ".join(
                  f"{p.strength:g}:{100 * p.detected:.0f}%/{p.side_effect:.3f}/{p.box_edge:.2f}" for p in curve.points),
              flush=True)


def main(argv: list[str] | None = None) -> int:
    """Measure the agreement on every shipped edit and print it (and JSON with --json)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.strength_agreement", description=__doc__.splitlines()[0])
    p.add_argument("--edits", default="glasses,mask,headband,green_hair", help="comma-separated shipped edit names")
    p.add_argument("--heldout", type=int, default=100, help="held-out faces per edit")
    p.add_argument("--json", default=None, help="write per-face figures here (and read them back with --replot)")
    p.add_argument("--replot", default=None, help="print the summary of a JSON this wrote")
    p.add_argument("--defaults", action="store_true", help="time each edit's default rewrite and measure its strength")
    args = p.parse_args(argv)
    if args.replot:
        summarize(json.loads(Path(args.replot).read_text()))
        return 0
    torch.manual_seed(0)
    configure_determinism()
    model = load_generator(import_faces())
    seeds = list(range(HELDOUT_START, HELDOUT_START + args.heldout))
    if args.defaults:
        defaults(model, [n for n in args.edits.split(",") if n], seeds)
        return 0
    results = {}
    for name in [n for n in args.edits.split(",") if n]:
        print(f"  {name} ...", file=sys.stderr, flush=True)
        results[name] = measure_edit(model, Path("examples/edits") / f"{name}.json", seeds)
        if args.json:
            Path(args.json).write_text(json.dumps(results))
    summarize(results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
