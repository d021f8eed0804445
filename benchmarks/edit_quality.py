"""Edit quality on the faces model: ours against a full-rank update and fine-tuning all weights.

``python -m benchmarks.edit_quality [--spec examples/edits/glasses.json] [--heldout 200]``
``python -m benchmarks.edit_quality --pareto [--edits glasses,mask] [--plot out/pareto.png]``

``--pareto`` sweeps every method along its own knob on every shipped edit (benchmarks/pareto.py),
draws the curves, prints efficacy at matched side effect, and times the default rewrite against
the paper's single-layer Adam edit of the first release (``speedup vs adam``).

For held-out seeds that took no part in the edit it prints, per method: **detected** — the share
of held-out faces that the edit's own detector calls edited (a small CNN trained to tell each
face's ideal result from its original, on seeds of its own; trained once and cached under
``out/detectors/``; its seeds and held-out accuracy are printed) and its mean probability;
**efficacy** — the share of the gap to each face's ideal result (the same copy/paste applied to its
own value map and rendered) closed inside the paste box; **side effect** — the mean absolute pixel
change outside the box (pixels in [-1, 1]); **box edge** — the change just inside the box's border
minus just outside, over the change in the box (near 1: a pasted rectangle); and wall time. The
rows ``unedited`` and ``ideal`` are the detector's false alarms and its hits on the ideal results.
It writes before/after grids of 16 held-out seeds to ``out/edit_quality.png`` (rows: original,
ideal, then each method).
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

from benchmarks import detectors
from rulewright.service.engine.detector import model_fingerprint
from rulewright.service.engine.device import configure_determinism, select_device
from rulewright.service.engine.edit import EditSpec, render_edited
from rulewright.service.engine.evaluate import heldout_metrics, ideal_images
from rulewright.service.engine.loading import load_generator
from rulewright.service.engine.rewrite import edited_images, finetune_all, full_rank_update, rewrite
from rulewright.service.engine.sampling import grid, latents
from rulewright.service.engine.stats import key_moment
from rulewright.service.importers.faces import import_faces

HELDOUT_START = 50_000      # disjoint from the example's seeds, the stats seeds and the keep pool


def _variants(base: dict, names: list[str]) -> dict[str, dict]:
    table = {
        "ours": {},                                                        # the defaults
        "ours_keepseed1": {"keep": {"seed": 1}},                           # run-to-run spread
        "ours_keepseed2": {"keep": {"seed": 2}},
        "paper_rank1": {"goal": "value", "rank": 1, "keep": {"weight": 0.0}},
        "image_rank1": {"goal": "image", "rank": 1, "keep": {"weight": 0.0}},
        "value_goal": {"goal": "value"},                                   # the paper's recipe
        "closed_form": {"goal": "value", "solver": "closed_form"},
        "image_goal": {"goal": "image", "keep": {"weight": 0.0}},
        "image_keep": {"goal": "image", "keep": {"weight": 1.0}},
        "image_keep4": {"goal": "image", "keep": {"weight": 4.0}},
        "image_rank4_keep": {"goal": "image", "rank": 4, "keep": {"weight": 2.0}},
        "image_rank4_keep4": {"goal": "image", "rank": 4, "keep": {"weight": 4.0}},
        "image_rank8_keep4": {"goal": "image", "rank": 8, "keep": {"weight": 4.0}},
        "image_rank8_keep16": {"goal": "image", "rank": 8, "keep": {"weight": 16.0}},
        "image_main9": {"goal": "image", "layer": "main.9"},
        "image_main9_keep": {"goal": "image", "layer": "main.9", "keep": {"weight": 1.0}},
    }
    out = {}
    for name in names:
        spec = json.loads(json.dumps(base))
        if not name.startswith("ours"):
            spec["method"] = "single"          # the variants below are of the paper's one-layer edit
        for k, v in table[name].items():
            spec[k] = {**spec.get(k, {}), **v} if isinstance(v, dict) else v
        out[name] = spec
    return out


def main(argv: list[str] | None = None) -> int:
    """Measure every method and print a table (and JSON with --json)."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.edit_quality", description=__doc__.splitlines()[0])
    p.add_argument("--spec", default="examples/edits/glasses.json", help="edit spec JSON (op rewrite)")
    p.add_argument("--heldout", type=int, default=200, help="held-out seeds to measure on")
    p.add_argument("--variants", default="ours", help="comma-separated variants of ours: ours, value_goal, "
                   "closed_form, image_goal, image_keep, image_keep4, image_rank4_keep, image_main9, image_main9_keep")
    p.add_argument("--baselines", default="full_rank,full_rank_keep,finetune",
                   help="comma-separated: full_rank, full_rank_keep, finetune, or none")
    p.add_argument("--steps", type=int, default=None, help="override the spec's optimization steps")
    p.add_argument("--full-rank-lr", type=float, default=1e-3, help="Adam step size of the full-rank baseline")
    p.add_argument("--finetune-steps", type=int, default=500, help="steps of the fine-tune-all baseline")
    p.add_argument("--finetune-lr", type=float, default=1e-4, help="Adam step size of the fine-tune-all baseline")
    p.add_argument("--out", default="out/edit_quality.png", help="before/after grid PNG")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (figures differ within float rounding)")
    p.add_argument("--pareto", action="store_true", help="sweep every method along its knob on every shipped edit")
    p.add_argument("--edits", default="", help="--pareto: comma-separated edit names (default: every examples/edits/*.json)")
    p.add_argument("--methods", default="ours,ours_draft,ours_context,single,full_rank_keep,finetune,finetune_found",
                   help="--pareto: methods to sweep")
    p.add_argument("--plot", default="out/pareto.png", help="--pareto: the curves, one panel per edit")
    p.add_argument("--single-steps", type=int, default=500, help="--pareto: Adam steps of the single-layer method")
    p.add_argument("--full-rank-steps", type=int, default=500, help="--pareto: Adam steps of full-rank + keep")
    p.add_argument("--keep-weights", default="1,4,16", help="--pareto: keep weights of full-rank + keep")
    p.add_argument("--finetune-sweep", default="25,50,100,250,500", help="--pareto: fine-tune-all step counts")
    p.add_argument("--finetune-found-sweep", default="100,250", help="--pareto: step counts with ours' found targets")
    p.add_argument("--replot", default=None, help="--pareto: redraw the plot and tables from a JSON it wrote")
    p.add_argument("--speed-edit", default="glasses", help="--pareto: the edit timed against the first release's "
                   "default (single layer, Adam, 2,001 steps); empty to skip")
    args = p.parse_args(argv)

    torch.manual_seed(0)
    configure_determinism()
    model = load_generator(import_faces()).to(select_device(args.device))
    if args.pareto:
        return run_pareto(model, args)
    base = json.loads(Path(args.spec).read_text())
    if args.steps:
        base["steps"] = args.steps
    heldout = list(range(HELDOUT_START, HELDOUT_START + args.heldout))
    show = latents(heldout[:16], model.z_dim).to(next(model.parameters()).device)
    rows = [model(show).detach()]
    first = EditSpec.from_json(base, model)
    rows.append(ideal_images(model, first, show))
    detector, detector_info = detectors.load_or_train(model, dataclasses.replace(first, found=[]))
    print(f"  {detectors.describe(detector_info)}", file=sys.stderr, flush=True)
    measure = lambda render: heldout_metrics(model, first, heldout, render, detect=detector.probability)  # noqa: E731
    results, moments = {
        "unedited": {**measure(lambda z: model(z, first.truncation)), "seconds": 0.0},
        "ideal": {**measure(lambda z: ideal_images(model, first, z)), "seconds": 0.0}}, {}

    for name, spec in _variants(base, [v for v in args.variants.split(",") if v]).items():
        es = EditSpec.from_json(spec, model)
        if es.layer not in moments:
            s = es.stats
            moments[es.layer] = key_moment(model, es.layer, range(s["seed_start"], s["seed_start"] + s["samples"]))
        started = time.perf_counter()
        edit = rewrite(model, es, moment=moments[es.layer])
        seconds = time.perf_counter() - started
        render = lambda z, e=edit, t=es.truncation: render_edited(model, [e], z, t)  # noqa: E731
        metrics = measure(render)
        rows.append(render(show))
        results[name] = {**metrics, "seconds": seconds, "goal_loss_before": edit.metrics["goal_loss_before"],
                         "goal_loss_after": edit.metrics["goal_loss_after"], "layer": es.layer, "rank": es.rank,
                         "goal": es.goal}
        print(f"  {name}: detected {100 * metrics['detected']:.1f}%, efficacy {100 * metrics['efficacy']:.1f}%, "
              f"side effect {metrics['side_effect']:.4f}, {seconds:.1f} s", file=sys.stderr, flush=True)

    baselines = [b for b in args.baselines.split(",") if b and b != "none"]
    for name in ("full_rank", "full_rank_keep"):
        if name not in baselines:
            continue
        # full_rank: the same goal with no keep term (the paper's unconstrained baseline);
        # full_rank_keep: the same goal plus our pooled keep term, to separate the two levers.
        single = EditSpec.from_json({**base, "method": "single", "search": {"targets": 0}}, model)
        spec = {**single.to_json(), "keep": {**single.keep, "weight": single.keep["weight"] if name.endswith("keep") else 0.0}}
        weights, info = full_rank_update(model, spec, lr=args.full_rank_lr)
        w = next(iter(weights.values()))
        render = lambda z, w=w: edited_images(model, first.layer, w, z, first.truncation)  # noqa: E731
        results[name] = {**measure(render), "seconds": info["seconds"],
                         "goal_loss_before": info["before"][f"{first.goal}_loss"],
                         "goal_loss_after": info["after"][f"{first.goal}_loss"]}
        with torch.no_grad():
            rows.append(render(show))
    if "finetune" in baselines:
        tuned, info = finetune_all(model, first, steps=args.finetune_steps, lr=args.finetune_lr)
        results["finetune_all"] = {**measure(lambda z: tuned(z, first.truncation)), "seconds": info["seconds"]}
        with torch.no_grad():
            rows.append(tuned(show))

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    picture = grid(torch.cat([r.cpu() for r in rows]), columns=16).numpy()
    Image.fromarray(picture).resize((picture.shape[1] * 2, picture.shape[0] * 2), Image.NEAREST).save(out)

    print(f"edit quality: {args.spec} on faces, {len(heldout)} held-out seeds from {HELDOUT_START}")
    print(detectors.describe(detector_info))
    print(f"{'method':18s} {'detected':>8s} {'mean p':>6s} {'efficacy':>9s} {'L1 ideal before→after':>22s} "
          f"{'side effect':>11s} {'edge':>5s} {'eff/side':>8s} {'seconds':>8s}")
    for name, r in results.items():
        ratio = r["efficacy"] / max(r["side_effect"], 1e-9)
        print(f"{name:18s} {100 * r['detected']:7.1f}% {r['probability']:6.3f} {100 * r['efficacy']:8.1f}% "
              f"{r['l1_to_ideal_before']:10.3f} → {r['l1_to_ideal_after']:.3f} {r['side_effect']:11.4f} "
              f"{r['box_edge']:5.2f} {ratio:8.2f} {r['seconds']:8.1f}")
    shown = [n for n in results if n not in ("unedited", "ideal")]
    print(f"grid (rows: original, ideal, {', '.join(shown)}): {out}")
    if args.json:
        Path(args.json).write_text(json.dumps({**results, "detector": detector_info}, indent=1))
    return 0


# The first release's default rewrite: one layer, rank 8, pooled keep term 16, 2,001 cosine Adam steps.
FIRST_RELEASE = {"method": "single", "solver": "adam", "rank": 8, "steps": 2001, "lr": 0.05,
                 "keep": {"weight": 16.0}, "search": {"targets": 0}}


def run_pareto(model, args) -> int:
    """--pareto: curves for every shipped edit, the matched-side-effect table, and the speed ratio."""
    from benchmarks import pareto

    if args.replot:
        results = json.loads(Path(args.replot).read_text())
        pareto.report(results)
        pareto.plot(results, Path(args.plot))
        print(f"\nplot: {args.plot}")
        return 0
    names = [n for n in args.edits.split(",") if n]
    paths = [Path("examples/edits") / f"{n}.json" for n in names] or sorted(Path("examples/edits").glob("*.json"))
    args.methods = [m for m in args.methods.split(",") if m]
    args.keep_weights = [float(w) for w in args.keep_weights.split(",") if w]
    args.finetune_steps = [int(s) for s in args.finetune_sweep.split(",") if s]
    args.finetune_found_steps = [int(s) for s in args.finetune_found_sweep.split(",") if s]
    args.finetune_default = args.finetune_steps and 500 if 500 in args.finetune_steps else args.finetune_steps[-1]
    seeds = list(range(HELDOUT_START, HELDOUT_START + args.heldout))
    args.fingerprint = model_fingerprint(model)
    results = {}
    for path in paths:
        print(f"  {path.stem} ...", file=sys.stderr, flush=True)
        results[path.stem] = pareto.sweep_edit(model, path, seeds, args)
    pareto.report(results)
    pareto.plot(results, Path(args.plot))
    print(f"\nplot: {args.plot}")
    if args.speed_edit:
        speed(model, Path("examples/edits") / f"{args.speed_edit}.json", seeds, pareto)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


def speed(model, path: Path, seeds: list[int], pareto) -> None:
    """Time the default rewrite against the first release's default on one edit, same run, same C."""
    base = json.loads(path.read_text())
    default = EditSpec.from_json(base, model)
    s = default.stats
    C = key_moment(model, default.layer, range(s["seed_start"], s["seed_start"] + s["samples"])).moment()
    user = dataclasses.replace(default, found=[])
    held = pareto.Heldout(model, user, seeds, C, detect=detectors.load_or_train(model, user)[0].probability)
    rows = {}
    # "default" is the final quality's rewrite; "draft" the quick one (the previous default).
    for name, spec in (("first release (adam)", pareto._spec(base, model, **FIRST_RELEASE)),
                       ("draft", pareto._spec(base, model, quality="draft")), ("default", default)):
        started = time.perf_counter()
        edit = rewrite(model, spec, moment=C)
        seconds = time.perf_counter() - started
        rows[name] = {"seconds": seconds, **held.measure(lambda z, e=edit: render_edited(model, [e], z, spec.truncation))}
    print(f"\nspeed on {path.stem} (statistics cached for both, {torch.get_num_threads()} threads):")
    for name, r in rows.items():
        print(f"  {name:22s} {r['seconds']:7.1f} s   detected {100 * r['detected']:5.1f}%   "
              f"efficacy {100 * r['efficacy']:5.1f}%   side effect {r['side_effect']:.4f}")
    ratio = rows["first release (adam)"]["seconds"] / rows["default"]["seconds"]
    print(f"speedup vs adam: {ratio:.1f}x (draft: {rows['first release (adam)']['seconds'] / rows['draft']['seconds']:.1f}x)")


if __name__ == "__main__":
    raise SystemExit(main())
