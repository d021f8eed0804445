"""Pictures and curves of every shipped edit at its default, for the editing documentation.

``python -m benchmarks.edit_gallery [--edits glasses,mask] [--heldout 200] [--out docs/editing]``
``python -m benchmarks.edit_gallery --override '{"fit": {"feather": 1}, "strength": 1.25}' --out out/gallery-f1``
(another default, tried on every edit the same way)

For each edit of ``examples/edits/`` it fits the default rewrite once (the statistics and the
edit's detector cached as in ``benchmarks.edit_quality``), sweeps its strength on held-out faces
(the same seeds, figures and detector as ``benchmarks.edit_quality --pareto``) and writes:

- ``{out}/{edit}.png``: held-out faces that took no part in the edit (the first ones; for an
  erase, those whose features respond most to the context: the ones with something to erase);
  rows: original, ideal (the copy pasted into each face's own features and rendered, or for an
  erase the units zeroed), the edit at its default strength, and at 1.5× that;
- ``{out}/{edit}-curves.png``: detected share and side effect against strength (left), pixel
  efficacy and box edge against strength (right), the default strength marked;
- ``{out}/{edit}.json``: every figure, the detector's seeds and accuracy, and the fit's seconds.

The fitted edits are kept under ``out/gallery-fits/`` (by the spec's and the model's hash), so
``--replot`` or a second run redraws pictures and curves without fitting again.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
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
from rulewright.service.engine.rewrite import chooses_strength, rewrite
from rulewright.service.engine.strength import RULE, StrengthCurve, choose_strength
from rulewright.service.engine.sampling import grid, latents
from rulewright.service.engine.stats import key_moment
from rulewright.service.importers.faces import import_faces

STRENGTHS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
SHOW = 10             # held-out faces in each picture
SCALE = 2             # picture pixels per image pixel
FITS = Path("out/gallery-fits")
# Fine-tuning every weight (500 steps) on the same edits, faces and detectors: the reference line.
PARETO = Path("benchmarks/results-pareto-detector-cpu-2026-12-06.json")


def finetune_reference(name: str) -> dict | None:
    """Fine-tune-all's default point (500 steps) for edit ``name`` from the recorded --pareto run."""
    if not PARETO.exists():
        return None
    curves = json.loads(PARETO.read_text()).get(name, {}).get("curves", {})
    return next((p for p in curves.get("finetune", []) if p["knob"] == "500 steps"), None)


def _render(model, edit, strength: float, truncation: float):
    e = dataclasses.replace(edit, deltas=with_strength(edit.deltas, strength))
    return lambda z: render_edited(model, [e], z, truncation)


def _override(base: dict, over: dict) -> dict:
    spec = json.loads(json.dumps(base))
    for k, v in over.items():
        spec[k] = {**spec.get(k, {}), **v} if isinstance(v, dict) else v
    return spec


def gallery_edit(model, path: Path, seeds: list[int], out: Path, fingerprint: str, override: dict | None = None) -> dict:
    """Fit one edit's default (with ``override``), measure it along strength, write its picture and curves."""
    base = _override(json.loads(path.read_text()), override or {})
    default = EditSpec.from_json(base, model)
    s = default.stats
    C = key_moment(model, default.layer, range(s["seed_start"], s["seed_start"] + s["samples"])).moment()
    user = dataclasses.replace(default, found=[])
    detector, info = detectors.load_or_train(model, user, fingerprint=fingerprint)
    print(f"  {path.stem}: {detectors.describe(info)}", file=sys.stderr, flush=True)
    held = pareto.Heldout(model, user, seeds, C, detect=detector.probability)
    choose = chooses_strength(base)             # as a Rewrite would: a spec naming no strength takes its curve's
    key = hashlib.sha256(f"{json.dumps(base, sort_keys=True)}|{fingerprint}|{choose}".encode()).hexdigest()[:16]
    cached = FITS / f"{path.stem}-{key}.pt"
    if cached.exists():
        edit, seconds = torch.load(cached, weights_only=False)
    else:
        started = time.perf_counter()
        edit = rewrite(model, default, moment=C, choose_strength=choose)
        seconds = time.perf_counter() - started
        FITS.mkdir(parents=True, exist_ok=True)
        torch.save((edit, seconds), cached)
    if choose:       # the rule applied to the recorded curve (a cached fit may predate a change of rule)
        curve = StrengthCurve.from_json(edit.metrics["strength_curve"])
        curve = dataclasses.replace(curve, chosen=choose_strength(curve.points), rule=RULE.name)
        edit.metrics["strength_curve"] = curve.to_json()
        default = dataclasses.replace(default, strength=curve.chosen)
    strengths = sorted({*STRENGTHS, default.strength})
    points = []
    for strength in strengths:
        point = {"strength": strength, **held.measure(_render(model, edit, strength, default.truncation))}
        points.append(point)
        print(f"  {path.stem} strength {strength:g}: detected {100 * point['detected']:.1f}%, efficacy "
              f"{100 * point['efficacy']:.1f}%, side {point['side_effect']:.4f}, edge {point['box_edge']:.2f}",
              file=sys.stderr, flush=True)
    shown = [seeds[i] for i in held.on.flip(0)[:SHOW].tolist()] if default.op == "erase" else seeds[:SHOW]
    show = latents(shown, model.z_dim)
    with torch.no_grad():
        rows = [model(show, default.truncation), ideal_images(model, user, show),
                _render(model, edit, default.strength, default.truncation)(show),
                _render(model, edit, 1.5 * default.strength, default.truncation)(show)]
    picture = grid(torch.cat([r.detach().cpu() for r in rows]), columns=SHOW).numpy()
    Image.fromarray(picture).resize((picture.shape[1] * SCALE, picture.shape[0] * SCALE), Image.NEAREST) \
        .save(out / f"{path.stem}.png")
    result = {"op": default.op, "default_strength": default.strength, "fit_seconds": seconds,
              "found": len(edit.spec.get("found") or []), "detector": info, "points": points, "heldout": len(seeds), "override": override or {},
              "engine_curve": (edit.metrics or {}).get("strength_curve"),
              "references": held.references(), "shown_seeds": shown, "threads": torch.get_num_threads()}
    plot_curves(path.stem, result, out / f"{path.stem}-curves.png")
    return result


def plot_curves(name: str, result: dict, out: Path) -> None:
    """Detected share and side effect (left), efficacy and box edge (right) against strength."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = result["points"]
    x = [p["strength"] for p in pts]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4))
    left.plot(x, [100 * p["detected"] for p in pts], marker="o", color="C0", label="detected (%)")
    false_alarms = 100 * result["references"]["unedited"]["detected"]
    left.axhline(false_alarms, color="C0", linestyle=":", linewidth=0.9)
    left.text(x[-1], false_alarms, "unedited ", color="C0", fontsize=7, va="bottom", ha="right")
    left.set_ylim(0, 100)
    left.set_ylabel("detected share (%)", color="C0")
    side = left.twinx()
    side.plot(x, [p["side_effect"] for p in pts], marker="s", color="C3", label="side effect")
    side.set_ylabel("side effect (|Δpixel| outside the box)", color="C3")
    tuned = finetune_reference(name)
    if tuned is not None:
        side.axhline(tuned["side_effect"], color="C3", linestyle=":", linewidth=0.9)
        side.text(x[0], tuned["side_effect"], " fine-tune's side effect", color="C3", fontsize=7, va="bottom")
    side.set_ylim(0, None)
    right.plot(x, [100 * p["efficacy"] for p in pts], marker="o", color="C2", label="pixel efficacy (%)")
    right.set_ylabel("pixel efficacy (%)", color="C2")
    edge = right.twinx()
    edge.plot(x, [p["box_edge"] for p in pts], marker="^", color="C1", label="box edge")
    ideal_edge = result["references"]["ideal"]["box_edge"]
    edge.axhline(ideal_edge, color="C1", linestyle=":", linewidth=0.9)
    edge.text(x[0], ideal_edge, " ideal", color="C1", fontsize=7, va="bottom")
    edge.set_ylabel("box edge (1: a pasted rectangle)", color="C1")
    edge.set_ylim(0, 1)
    for ax in (left, right):
        ax.axvline(result["default_strength"], color="grey", linestyle="--", linewidth=0.9)
        ax.set_xlabel("strength (dashed: the default)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"{name}: the default fit ({result['found']} found targets) along strength, "
                 f"{result['heldout']} held-out faces", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def print_table(out: Path) -> None:
    """The figures at each edit's default strength, as the Markdown table of docs/editing.md."""
    results = {p.stem: json.loads((out / f"{p.stem}.json").read_text())
               for p in sorted(Path("examples/edits").glob("*.json")) if (out / f"{p.stem}.json").exists()}
    print(f"at the default strength, {next(iter(results.values()))['heldout'] if results else 0} held-out faces from {HELDOUT_START} (fine-tune-all: 500 steps)\n")
    print("| edit | strength | detected | pixel efficacy | side effect | box edge (ideal) | detector accuracy "
          "| fine-tune: detected / side effect |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        d = next(p for p in r["points"] if p["strength"] == r["default_strength"])
        tuned = finetune_reference(name)
        ft = f"{100 * tuned['detected']:.1f}% / {tuned['side_effect']:.4f}" if tuned else "-"
        print(f"| {name} | {r['default_strength']:g} | {100 * d['detected']:.1f}% | {100 * d['efficacy']:.1f}% "
              f"| {d['side_effect']:.4f} | {d['box_edge']:.2f} ({r['references']['ideal']['box_edge']:.2f}) "
              f"| {100 * r['detector']['check_accuracy']:.1f}% | {ft} |")


def main(argv: list[str] | None = None) -> int:
    """Write every shipped edit's picture and curves, and print its figures at the default."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.edit_gallery", description=__doc__.splitlines()[0])
    p.add_argument("--edits", default="", help="comma-separated edit names (default: every examples/edits/*.json)")
    p.add_argument("--heldout", type=int, default=200, help="held-out faces measured")
    p.add_argument("--out", default="docs/editing", help="folder of the pictures, curves and {edit}.json")
    p.add_argument("--override", default="{}", help="JSON merged into every spec (another default to try)")
    p.add_argument("--replot", action="store_true", help="only redraw the curves from the {edit}.json files")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    names = [n for n in args.edits.split(",") if n]
    paths = [Path("examples/edits") / f"{n}.json" for n in names] or sorted(Path("examples/edits").glob("*.json"))
    if args.replot:
        for path in paths:
            plot_curves(path.stem, json.loads((out / f"{path.stem}.json").read_text()), out / f"{path.stem}-curves.png")
        print_table(out)
        return 0
    torch.manual_seed(0)
    configure_determinism()
    model = load_generator(import_faces())
    seeds = list(range(HELDOUT_START, HELDOUT_START + args.heldout))
    fingerprint = model_fingerprint(model)
    for path in paths:
        result = gallery_edit(model, path, seeds, out, fingerprint, json.loads(args.override))
        (out / f"{path.stem}.json").write_text(json.dumps(result, indent=1))
    print_table(out)
    print(f"pictures and curves: {out}/")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
