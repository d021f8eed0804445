"""The fit's levers, one at a time, on one edit: detected share, efficacy, side effect, box edge, time.

``python -m benchmarks.fit_levers --edit glasses --variants default,draft [--heldout 100]``

Each variant is the edit's spec with a few fields overridden (``VARIANTS``, or ``--variant
name='{json}'``), fitted once with the same statistics and swept along strength. It measures on the
held-out faces of ``benchmarks.edit_quality`` with the edit's detector (benchmarks/detectors.py),
and writes a picture per variant, ``{out}/{edit}-{variant}.png``: rows original, ideal, then the
variant at each strength, on the first 12 held-out faces.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image

from benchmarks import detectors, pareto
from benchmarks.edit_quality import HELDOUT_START
from rulewright.service.engine.delta import with_strength
from rulewright.service.engine.detector import model_fingerprint
from rulewright.service.engine.device import configure_determinism
from rulewright.service.engine.edit import EditSpec, render_edited
from rulewright.service.engine.evaluate import ideal_images
from rulewright.service.engine.loading import load_generator
from rulewright.service.engine.rewrite import rewrite
from rulewright.service.engine.sampling import grid, latents
from rulewright.service.engine.stats import key_moment
from rulewright.service.importers.faces import import_faces

VARIANTS: dict[str, dict] = {
    "default": {},                                   # the final quality
    "draft": {"quality": "draft"},
    "steps200": {"steps": 200},
    "found64_steps200": {"search": {"targets": 64}, "steps": 200},
    "found64_batch16": {"search": {"targets": 64}, "steps": 200, "fit": {"batch": 16}},
    "found64_batch16_feather2": {"search": {"targets": 64}, "steps": 200, "fit": {"batch": 16, "feather": 2.0}},
    "found64_batch16_edges1": {"search": {"targets": 64}, "steps": 200, "fit": {"batch": 16, "edges": 1.0}},
    "found64_batch16_rank8": {"search": {"targets": 64}, "steps": 200, "rank": 8, "fit": {"batch": 16}},
    "found128_batch16_300": {"search": {"targets": 128}, "steps": 300, "fit": {"batch": 16}},
}


def _override(base: dict, over: dict) -> dict:
    spec = json.loads(json.dumps(base))
    for k, v in over.items():
        spec[k] = {**spec.get(k, {}), **v} if isinstance(v, dict) else v
    return spec


def main(argv: list[str] | None = None) -> int:
    """Fit every variant, print its figures along strength, and write its pictures."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.fit_levers", description=__doc__.splitlines()[0])
    p.add_argument("--edit", default="glasses", help="an edit of examples/edits/ (its name)")
    p.add_argument("--variants", default="default,draft", help=f"comma-separated, of {', '.join(VARIANTS)}")
    p.add_argument("--variant", action="append", default=[], help="name='{json overrides}' (repeatable)")
    p.add_argument("--heldout", type=int, default=100, help="held-out faces measured")
    p.add_argument("--strengths", default="0.6,1,1.5", help="comma-separated strengths of each fit")
    p.add_argument("--out", default="out/levers", help="folder of the pictures")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    extra = dict(v.split("=", 1) for v in args.variant)
    table = {**VARIANTS, **{k: json.loads(v) for k, v in extra.items()}}
    names = [n for n in args.variants.split(",") if n] + list(extra)
    strengths = [float(s) for s in args.strengths.split(",") if s]

    torch.manual_seed(0)
    configure_determinism()
    model = load_generator(import_faces())
    base = json.loads((Path("examples/edits") / f"{args.edit}.json").read_text())
    default = EditSpec.from_json(base, model)
    s = default.stats
    C = key_moment(model, default.layer, range(s["seed_start"], s["seed_start"] + s["samples"])).moment()
    user = dataclasses.replace(default, found=[])
    detector, info = detectors.load_or_train(model, user, fingerprint=model_fingerprint(model))
    print(detectors.describe(info), flush=True)
    seeds = list(range(HELDOUT_START, HELDOUT_START + args.heldout))
    held = pareto.Heldout(model, user, seeds, C, detect=detector.probability)
    show = latents(seeds[:12], model.z_dim)
    with torch.no_grad():
        top = [model(show, default.truncation), ideal_images(model, user, show)]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = {"references": held.references(), "detector": info}
    for name in names:
        spec = EditSpec.from_json(_override(base, table[name]), model)
        started = time.perf_counter()
        edit = rewrite(model, spec, moment=C)
        seconds = time.perf_counter() - started
        rows, points = list(top), []
        for strength in strengths:
            e = dataclasses.replace(edit, deltas=with_strength(edit.deltas, strength))
            render = lambda z, e=e: render_edited(model, [e], z, spec.truncation)  # noqa: E731
            points.append({"strength": strength, **held.measure(render)})
            rows.append(render(show))
        results[name] = {"overrides": table[name], "seconds": seconds, "points": points}
        for pt in points:
            print(f"{args.edit:10s} {name:28s} {seconds:6.1f} s  strength {pt['strength']:4g}: detected "
                  f"{100 * pt['detected']:5.1f}%  p {pt['probability']:.3f}  efficacy {100 * pt['efficacy']:5.1f}%  "
                  f"side {pt['side_effect']:.4f}  edge {pt['box_edge']:5.2f}", flush=True)
        picture = grid(torch.cat([r.cpu() for r in rows]), columns=len(show)).numpy()
        path = out / f"{args.edit}-{name}.png"
        Image.fromarray(picture).resize((picture.shape[1] * 2, picture.shape[0] * 2), Image.NEAREST).save(path)
        print(f"  picture (rows: original, ideal, strengths {args.strengths}): {path}", file=sys.stderr, flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
