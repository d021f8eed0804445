"""Efficacy against side effect along each method's own strength knob, on every shipped edit.

Run through ``python -m benchmarks.edit_quality --pareto`` (see that module for the flags).

Each method is swept along its knob, and every point is measured on the same held-out seeds:
- ``ours``: the default (final quality) rewrite (low-rank deltas on every layer, found targets),
  fitted once and swept along its *strength* (the stored delta scaled; exact for the low-rank form);
- ``ours_draft``: the same at the draft quality (fewer targets and steps: what shows first);
- ``ours_context``: the same with each layer's input factor fixed to that layer's context directions;
- ``single``: the paper's edit of one layer (rank 8, pooled keep term), swept along strength;
- ``full_rank_keep``: an unconstrained update of the same layer with the keep term, along its weight;
- ``finetune``: every weight fine-tuned on the user's pastes, along its step count (the baseline to
  beat at its best step count); ``finetune_found``: the same given ours' found targets too.

Figures per point: **detected** — the share of held-out faces that the edit's own detector (a
small CNN trained on ideal results against originals, on seeds of its own; benchmarks/detectors.py)
calls edited, and its mean probability; efficacy (share of the gap to each face's ideal result
closed inside the box); side effect (mean absolute pixel change outside it); specificity — the
change inside the box on the held-out faces whose keys there respond least to the context
(``off``) beside those that respond most (``on``): an edit that paints everything has ``on ≈ off``;
and box edge — the change just inside the box's border minus just outside it, over the change in
the box: near 1 when the edit pastes a rectangle, near 0 when it draws only the object.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import torch

from rulewright.service.engine.delta import with_strength
from rulewright.service.engine.edit import Edit, EditSpec, render_edited
from rulewright.service.engine.evaluate import EdgeSums, ideal_images, paste_geometry
from rulewright.service.engine.rewrite import (_box_mask, _capture, build_goal, context_direction, edited_images,
                                               finetune_all, full_rank_update, rewrite)
from rulewright.service.engine.sampling import latents
from rulewright.service.engine.stats import key_moment

from benchmarks import detectors

STRENGTHS = (0.25, 0.5, 0.6, 0.75, 1.0, 1.5, 2.0, 3.0)     # 0.6: the default


class Heldout:
    """The held-out faces of one edit: originals, ideals, box, and context response, computed once."""

    def __init__(self, model, spec: EditSpec, seeds: list[int], C: torch.Tensor, batch: int = 50,
                 detect=None):
        self.model, self.spec, self.detect = model, spec, detect
        geometry = paste_geometry(model, spec)
        self.box = _box_mask(geometry["image_box"])
        self.z = [latents(seeds[i:i + batch], model.z_dim) for i in range(0, len(seeds), batch)]
        with torch.no_grad():
            self.base = [model(z, spec.truncation) for z in self.z]
        self.ideal = [ideal_images(model, spec, z, geometry) for z in self.z]
        # Context response of each held-out face: mean over the box of ‖Dᵀk‖ at the edited layer.
        goal = build_goal(model, dataclasses.replace(spec, found=[]))
        d = context_direction(C, goal.context_keys, min(spec.rank, goal.context_keys.shape[0]), spec.ridge)
        kb = goal.key_box[0]
        resp = []
        for z in self.z:
            key, _, _ = _capture(model, spec.layer, z, spec.truncation)
            r = torch.einsum("nchw,cr->nrhw", key, d).norm(dim=1)
            resp.append((r * kb).sum(dim=(1, 2)) / kb.sum())
        resp = torch.cat(resp)
        order = torch.argsort(resp)
        q = max(1, len(seeds) // 4)
        self.off, self.on = order[:q], order[-q:]

    def measure(self, render) -> dict:
        """Detected share, efficacy, side effect, specificity and box edge of ``render(z) -> images``."""
        return self.measure_images([render(z) for z in self.z])

    def measure_images(self, images: list[torch.Tensor]) -> dict:
        """The same figures for images already rendered (one tensor per batch of ``self.z``)."""
        box, out = self.box, 1 - self.box
        gap0 = gap1 = side = 0.0
        inside, probability = [], []
        edge = EdgeSums(box)
        for edited, base, ideal in zip(images, self.base, self.ideal):
            edited = edited.detach()
            gap0 += ((base - ideal).abs().mean(1) * box).sum().item() / box.sum().item()
            gap1 += ((edited - ideal).abs().mean(1) * box).sum().item() / box.sum().item()
            side += ((edited - base).abs().mean(1) * out).sum().item() / out.sum().item()
            inside.append(((edited - base).abs().mean(1) * box).sum(dim=(1, 2)) / box.sum())
            edge.add(edited, base)
            if self.detect is not None:
                probability.append(self.detect(edited).cpu())
        inside = torch.cat(inside)
        n = sum(len(z) for z in self.z)
        point = {"efficacy": 1 - gap1 / gap0, "side_effect": side / n, "box_edge": edge.value(),
                 "change_on": inside[self.on].mean().item(), "change_off": inside[self.off].mean().item()}
        if probability:
            p = torch.cat(probability)
            point.update(detected=(p >= 0.5).float().mean().item(), probability=p.mean().item())
        return point

    def references(self) -> dict:
        """The same figures for the unedited faces (the detector's false alarms) and their ideals."""
        return {"unedited": self.measure_images(self.base), "ideal": self.measure_images(self.ideal)}


def _spec(base: dict, model, **over) -> EditSpec:
    spec = json.loads(json.dumps(base))
    for k, v in over.items():
        spec[k] = {**spec.get(k, {}), **v} if isinstance(v, dict) else v
    return EditSpec.from_json(spec, model)


def _strength_sweep(model, held: Heldout, edit: Edit, seconds: float, truncation: float) -> list[dict]:
    points = []
    for s in STRENGTHS:
        e = dataclasses.replace(edit, deltas=with_strength(edit.deltas, s))
        points.append({"knob": f"strength {s:g}", "seconds": seconds,
                       **held.measure(lambda z, e=e: render_edited(model, [e], z, truncation))})
    return points


def sweep_edit(model, path: Path, seeds: list[int], args) -> dict:
    """Every method's curve on one edit: {method: [points]}, plus the found targets."""
    base = json.loads(path.read_text())
    default = EditSpec.from_json(base, model)
    C = key_moment(model, default.layer, range(default.stats["seed_start"],
                                               default.stats["seed_start"] + default.stats["samples"])).moment()
    user = dataclasses.replace(default, found=[])
    detector, detector_info = detectors.load_or_train(model, user, fingerprint=args.fingerprint)
    print(f"    {path.stem} {detectors.describe(detector_info)}", flush=True)
    held = Heldout(model, user, seeds, C, detect=detector.probability)
    curves: dict[str, list[dict]] = {}
    log = lambda name, p: print(f"    {path.stem} {name} {p['knob']}: detected {100 * p['detected']:.1f}%, "  # noqa: E731
                                f"efficacy {100 * p['efficacy']:.1f}%, side {p['side_effect']:.4f}, "
                                f"edge {p['box_edge']:.2f}, {p['seconds']:.1f} s", flush=True)

    def fit(name: str, spec: EditSpec) -> Edit:
        started = time.perf_counter()
        edit = rewrite(model, spec, moment=C)
        seconds = time.perf_counter() - started
        curves[name] = _strength_sweep(model, held, edit, seconds, spec.truncation)
        for p in curves[name]:
            log(name, p)
        return edit

    ours = fit("ours", default)
    found = EditSpec.from_json(ours.spec, model).found
    if "ours_draft" in args.methods:
        fit("ours_draft", _spec(base, model, quality="draft"))
    if "ours_context" in args.methods:
        fit("ours_context", _spec(base, model, factors="context"))
    if "single" in args.methods:
        fit("single", _spec(base, model, method="single", steps=args.single_steps))
    if "full_rank_keep" in args.methods and default.op == "rewrite":
        curves["full_rank_keep"] = []
        for weight in args.keep_weights:
            spec = _spec(base, model, method="single", steps=args.full_rank_steps, keep={"weight": weight},
                         search={"targets": 0})
            weights, info = full_rank_update(model, spec, lr=args.full_rank_lr)
            w = next(iter(weights.values()))
            p = {"knob": f"keep {weight:g}", "seconds": info["seconds"],
                 **held.measure(lambda z, w=w: edited_images(model, spec.layer, w, z, spec.truncation))}
            curves["full_rank_keep"].append(p)
            log("full_rank_keep", p)
    for name, targets, steps_list in (("finetune", [], args.finetune_steps),
                                      ("finetune_found", found, args.finetune_found_steps)):
        if name not in args.methods or (name == "finetune_found" and not found):
            continue
        curves[name] = []
        for steps in steps_list:
            tuned, info = finetune_all(model, dataclasses.replace(default, found=targets), steps=steps,
                                       lr=args.finetune_lr)
            p = {"knob": f"{steps} steps", "seconds": info["seconds"],
                 **held.measure(lambda z, t=tuned: t(z, default.truncation))}
            curves[name].append(p)
            log(name, p)
    return {"curves": curves, "found": [r.seed for r in found or []], "references": held.references(),
            "detector": detector_info, "finetune_default_steps": args.finetune_default}


def origin(result: dict, metric: str) -> float:
    """``metric`` with no edit: 0, except the detector's false alarms on the unedited faces."""
    return result.get("references", {}).get("unedited", {}).get(metric, 0.0) if metric == "detected" else 0.0


def interpolate(points: list[dict], side: float, metric: str = "efficacy", start: float = 0.0) -> float | None:
    """``metric`` at side effect ``side`` along a curve (from ``start`` with no edit); None beyond its reach."""
    if any(metric not in p for p in points):
        return None                                       # a curve measured before the metric existed
    pts = sorted([(0.0, start)] + [(p["side_effect"], p[metric]) for p in points])
    best = None
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= side <= x1 and x1 > x0:
            y = y0 + (y1 - y0) * (side - x0) / (x1 - x0)
            best = y if best is None else max(best, y)
    return best


def reference_side(result: dict) -> float | None:
    """Side effect of fine-tune-all at its default step count."""
    knob = f"{result['finetune_default_steps']} steps"
    for p in result["curves"].get("finetune", []):
        if p["knob"] == knob:
            return p["side_effect"]
    return None


PANELS = (("efficacy", "efficacy (% of gap closed)"), ("detected", "detected (% of held-out faces)"))


def plot(results: dict, out: Path) -> None:
    """A column per edit: efficacy (top row) and detected share (bottom row) against side effect."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({m for r in results.values() for m in r["curves"]})
    colors = {m: f"C{i}" for i, m in enumerate(methods)}     # one colour per method in every panel
    n = len(results)
    fig, axes = plt.subplots(len(PANELS), n, figsize=(4.2 * n, 3.6 * len(PANELS)), squeeze=False)
    for col, (edit, result) in enumerate(results.items()):
        for row, (metric, label) in enumerate(PANELS):
            ax = axes[row][col]
            for method, points in result["curves"].items():
                if any(metric not in p for p in points):
                    continue
                pts = sorted([(0.0, 100 * origin(result, metric))] + [(p["side_effect"], 100 * p[metric]) for p in points])
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", markersize=3, label=method,
                        color=colors[method])
            ref = reference_side(result)
            if ref is not None:
                ax.axvline(ref, color="grey", linestyle="--", linewidth=0.8)
                ax.axvline(ref / 2, color="grey", linestyle=":", linewidth=0.8)
                ax.set_xlim(0, 2 * ref)                # the region the comparison is about
            ax.set_ylim(0, 100 if metric == "detected" else None)
            ax.set_title(edit)
            ax.set_xlabel("side effect (mean |Δpixel| outside the box)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
    handles = [plt.Line2D([], [], color=colors[m], marker="o", markersize=3, label=m) for m in methods]
    fig.legend(handles=handles, loc="upper center", ncol=len(methods), fontsize=8, title="method (dashed: "
               "fine-tune's default side effect; dotted: half of it)", title_fontsize=7)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def _pct(point: dict, key: str) -> str:
    return f"{100 * point[key]:5.1f}%" if key in point else "     -"


def report(results: dict) -> None:
    """Print every point, then detected share and efficacy at fine-tune's default side effect and half of it."""
    for edit, result in results.items():
        print(f"\n{edit} (found targets: {len(result['found'])})")
        if "detector" in result:
            print(f"  {detectors.describe(result['detector'])}")
        print(f"  {'method':15s} {'knob':14s} {'detected':>8s} {'mean p':>6s} {'efficacy':>9s} {'side':>7s} "
              f"{'on':>6s} {'off':>6s} {'edge':>5s} {'seconds':>8s}")
        rows = [(m, p) for m, points in result["curves"].items() for p in points]
        rows += [(name, {**p, "knob": "", "seconds": float("nan")}) for name, p in result.get("references", {}).items()]
        for method, p in rows:
            prob = f"{p['probability']:6.3f}" if "probability" in p else "     -"
            edge = f"{p['box_edge']:5.2f}" if "box_edge" in p else "    -"
            print(f"  {method:15s} {p['knob']:14s} {_pct(p, 'detected'):>8s} {prob} {100 * p['efficacy']:8.1f}% "
                  f"{p['side_effect']:7.4f} {p['change_on']:6.3f} {p['change_off']:6.3f} {edge} {p['seconds']:8.1f}")
    print("\ndetected share and efficacy at matched side effect: s = fine-tune-all's side effect at its default "
          "step count; '-' = the curve does not reach that side effect")
    print(f"  {'edit':15s} {'method':15s} {'det at s':>8s} {'at s/2':>8s} {'eff at s':>8s} {'at s/2':>8s}   {'s':>7s}")
    for edit, result in results.items():
        ref = reference_side(result)
        if ref is None:
            continue
        for method, points in result["curves"].items():
            cells = []
            for metric in ("detected", "efficacy"):
                for x in (ref, ref / 2):
                    y = interpolate(points, x, metric, origin(result, metric))
                    cells.append(f"{'-' if y is None else f'{100 * y:.1f}%':>8s}")
            print(f"  {edit:15s} {method:15s} {' '.join(cells)}   {ref:7.4f}")
