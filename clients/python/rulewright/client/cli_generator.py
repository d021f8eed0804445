"""``rulewright`` commands over GeneratorService: ``layers``, ``sample``, ``dissect``, ``rewrite``.

``sample`` asks for at most ``--batch`` images per call (64, the server's default
``max_images``); a server that caps lower refuses naming its setting and value (ErrorInfo
metadata ``setting`` and ``limit``), and the rest go in calls of that size. Every call after the
first names the version the first one used, so one command never mixes versions.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Callable

from rulewright.client.cli_args import REF_HELP, STRENGTH_HELP, Bars, UsageError, reference, region, seeds, short, spec_error
from rulewright.client.client import Client
from rulewright.client.errors import RulewrightError
from rulewright.client.images import draw_boxes, grid, heatmap_overlay
from rulewright.client.spec import edit_spec_pb
from rulewright.client.types import Progress, RewriteResult, SampledImage

DEFAULT_BATCH = 64                      # the server's default max_images
_CAPS = ("max_images", "max_message_mb")  # the settings that bound one Sample call's images


def cmd_layers(client: Client, args: argparse.Namespace) -> int:
    """Print a version's rewritable layers."""
    info = client.layers(str(args.model))
    print(f"{info.version}: {info.image_resolution}x{info.image_resolution} images, z {info.z_dim}, "
          f"default layer {info.default_layer}")
    for layer in info.layers:
        shape = lambda s: "x".join(map(str, s))  # noqa: E731
        print(f"  {layer.name}\tkey {shape(layer.key_shape)}\tvalue {shape(layer.value_shape)}"
              f"\tweight {shape(layer.weight_shape)}{'  linear' if layer.linear else ''}")
    return 0


def _cap(err: RulewrightError, asked: int) -> int | None:
    """The images one call may ask for, if ``err`` refused ``asked`` of them for a per-call cap."""
    if err.metadata.get("setting") not in _CAPS or not err.metadata.get("limit", "").isdigit():
        return None
    limit = int(err.metadata["limit"])
    return limit if 1 <= limit < asked else None


def sample_all(call: Callable[[str, list[int]], list[SampledImage]], model: str, wanted: list[int],
               batch: int = DEFAULT_BATCH) -> list[SampledImage]:
    """``call(model, seeds)`` for every seed, at most ``batch`` per call and fewer once the server
    names a lower cap; after the first answer every call names the version it used."""
    images: list[SampledImage] = []
    while len(images) < len(wanted):
        chunk = wanted[len(images):len(images) + batch]
        try:
            got = call(model, chunk)
        except RulewrightError as err:
            batch = _cap(err, len(chunk)) or 0
            if not batch:
                raise
            continue
        images += got
        model = short(got[0].version)        # the same version for the rest, even if an alias moves
    return images


def cmd_sample(client: Client, args: argparse.Namespace) -> int:
    """Render seeds to PNG files or one grid, in calls the server accepts."""
    images = sample_all(lambda model, chunk: client.sample(model, chunk, truncation=args.truncation,
                                                           strength=args.strength),
                        str(args.model), args.seeds, args.batch)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for im in images:
            (out / f"seed-{im.seed}.png").write_bytes(im.png)
        print(f"{len(images)} images from {images[0].version} in {out}/seed-*.png")
    if args.grid:
        Path(args.grid).parent.mkdir(parents=True, exist_ok=True)
        grid([im.image for im in images], columns=args.columns, scale=args.scale).save(args.grid)
        print(f"{len(images)} images from {images[0].version}: {args.grid}")
    return 0


def cmd_dissect(client: Client, args: argparse.Namespace) -> int:
    """Rank a layer's units against regions; optionally write their heatmaps."""
    result = client.dissect(str(args.model), args.region, layer=args.layer or "", top=args.top, rank_by=args.rank_by,
                            include_maps=bool(args.out), threshold_samples=args.threshold_samples)
    print(f"{result.version} layer {result.layer}: unit, iou, contrast, threshold")
    for u in result.units:
        print(f"  {u.unit}\t{u.iou:.4f}\t{u.contrast:.4f}\t{u.threshold:.4f}")
    if args.out and result.units:
        _heatmaps(client, args, result)
    return 0


def _heatmaps(client: Client, args: argparse.Namespace, result) -> None:
    """Each top unit's map over each region's sample (rows: units, columns: seeds), boxes outlined."""
    seeds_ = list(dict.fromkeys(r["seed"] for r in args.region))
    pictures = {im.seed: im.image for im in client.sample(short(result.version), seeds_)}
    boxes = {s: [r["box"] for r in args.region if r["seed"] == s] for s in seeds_}
    maps = {(m.unit, m.seed): m.values for m in result.maps}
    tiles = [draw_boxes(heatmap_overlay(pictures[s], maps[(u.unit, s)], threshold=u.threshold), boxes[s],
                        color="cyan", scale=args.scale) for u in result.units for s in seeds_]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    grid(tiles, columns=len(seeds_), scale=1).save(args.out)
    print(f"heatmap of unit{'s' if len(result.units) > 1 else ''} "
          f"{', '.join(str(u.unit) for u in result.units)} (rows) on seeds {seeds_} (columns): {args.out}")


def _edit_spec(args: argparse.Namespace) -> dict[str, Any]:
    """The spec file (if any) with the flags laid over it."""
    spec: dict[str, Any] = {}
    if args.spec:
        try:
            spec = json.loads(Path(args.spec).read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"--spec {args.spec}: {exc}") from None
        if not isinstance(spec, dict):
            raise UsageError(f"--spec {args.spec}: must hold a JSON object")
    for key in ("op", "method", "quality", "layer", "rank", "steps", "goal", "lr", "strength", "description"):
        if getattr(args, key) is not None:
            spec[key] = getattr(args, key)
    if args.search_targets is not None:
        spec["search"] = {**(spec.get("search") or {}), "targets": args.search_targets}
    for key in ("copy", "paste", "context"):
        if getattr(args, key):
            spec[key] = getattr(args, key)
    if spec.get("op", "rewrite") == "rewrite" and not (spec.get("copy") and spec.get("paste")):
        raise UsageError("rewrite needs --spec FILE, or --copy and at least one --paste")
    if spec.get("op", "rewrite") != "rewrite" and not spec.get("context"):
        raise UsageError(f"op {spec['op']} needs at least one --context")
    return spec


def cmd_rewrite(client: Client, args: argparse.Namespace) -> int:
    """Run an edit; print the new version (and move ``--promote`` onto it)."""
    spec = _edit_spec(args)
    try:
        edit_spec_pb(spec)
    except ValueError as exc:
        raise spec_error(exc) from None
    bars = Bars(not args.quiet)
    result: RewriteResult | None = None
    try:
        for event in client.rewrite(str(args.model), spec, dry_run=args.dry_run, request_id=args.request_id):
            if isinstance(event, Progress):
                bars.update(event)
            elif isinstance(event, RewriteResult):
                result = event
    finally:
        bars.close()
    assert result is not None, "the server ended the stream without a result"
    metrics = {k: v for k, v in result.metrics.items() if isinstance(v, (int, float))}
    if result.version is None:
        print(f"dry run of an edit of {result.parent}: nothing committed; metrics {json.dumps(metrics)}")
        return 0
    print(f"created {result.version.name} (parent {result.parent})")
    if args.promote:
        model = result.version.model
        before = client.aliases(model).get(args.promote)
        moved = client.set_alias(model, args.promote, result.version.number,
                                 **({"etag": before.etag} if before else {"expected_version": 0}),
                                 reason=args.reason or f"promote version {result.version.number}")
        print(f"{args.promote}: {before.version if before else '-'} -> {moved.version}")
    return 0


def register(sub, add: Callable[..., argparse.ArgumentParser]) -> None:
    """Add ``layers``, ``sample``, ``dissect`` and ``rewrite``."""
    p = add("layers", "list a model's rewritable layers")
    p.add_argument("model", type=reference, help=REF_HELP)
    p.set_defaults(run=cmd_layers)

    p = add("sample", "render seeds to PNG files or one grid")
    p.add_argument("model", type=reference, help=REF_HELP)
    p.add_argument("--seeds", type=seeds, required=True, help="seeds, e.g. 0-15 or 1,5,9 or 0-3,10")
    p.add_argument("--out", help="folder to write seed-N.png files into")
    p.add_argument("--grid", help="PNG file to write all images into, as one grid")
    p.add_argument("--columns", type=int, default=8, help="images per row of the grid")
    p.add_argument("--scale", type=int, default=2, help="enlargement of the grid (nearest neighbour)")
    p.add_argument("--truncation", type=float, help="truncation toward the mean latent, 0 to 1 (StyleGAN2 only)")
    p.add_argument("--batch", type=_positive, default=DEFAULT_BATCH,
                   help=f"most images per call (default {DEFAULT_BATCH}, the server's default max_images; a server "
                        "that caps lower says so and gets calls of its size)")
    p.add_argument("--strength", type=float, help=STRENGTH_HELP + "; default: the version's own")
    p.set_defaults(run=cmd_sample)

    p = add("dissect", "rank a layer's units against regions; optionally write their heatmaps")
    p.add_argument("model", type=reference, help=REF_HELP)
    p.add_argument("--region", type=region, action="append", required=True,
                   help="SEED:x0,y0,x1,y1 in image pixels (repeat for more regions)")
    p.add_argument("--layer", help="layer to dissect (default: the model's default layer)")
    p.add_argument("--top", type=int, default=1, help="how many of the best units to show")
    p.add_argument("--rank-by", choices=("iou", "contrast"), default="iou", help="how units are ranked")
    p.add_argument("--threshold-samples", type=int, default=0,
                   help="samples the unit thresholds are computed over (0: the server's default)")
    p.add_argument("--out", help="PNG file: each top unit's map over each region's sample, boxes outlined")
    p.add_argument("--scale", type=int, default=4, help="enlargement of the heatmap tiles")
    p.set_defaults(run=cmd_dissect)
    _add_rewrite(add)


def _positive(text: str) -> int:
    """A whole number of at least 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return int(text)


def _add_rewrite(add: Callable[..., argparse.ArgumentParser]) -> None:
    """The ``rewrite`` command: a spec file and flags that override its fields."""
    p = add("rewrite", "run an edit from a spec JSON or from flags; prints the new version")
    p.add_argument("model", type=reference, help=f"the version to edit: {REF_HELP}")
    p.add_argument("--spec", help="edit spec JSON (examples/edits/*.json); flags below override its fields")
    p.add_argument("--copy", type=region, help="SEED:x0,y0,x1,y1 whose content is copied")
    p.add_argument("--paste", type=region, action="append", help="SEED:x0,y0,x1,y1 where the copy goes (repeat)")
    p.add_argument("--context", type=region, action="append",
                   help="SEED:x0,y0,x1,y1 defining where the rule applies (repeat; default: the pastes)")
    p.add_argument("--op", choices=("rewrite", "erase", "zero"), help="what the edit does (default: rewrite)")
    p.add_argument("--method", choices=("multilayer", "single"),
                   help="low-rank deltas on every layer (default), or the paper's one-layer edit")
    p.add_argument("--layer", help="layer to edit (single) or to search the context at (default: the model's default)")
    p.add_argument("--rank", type=int, help="rank of the update per layer (default: 4 multilayer, 8 single)")
    p.add_argument("--quality", choices=("draft", "final"),
                   help="the multilayer fit's defaults: final (the default: 128 found targets, 200 steps, about 30 s "
                        "on 2 CPU cores) or draft (16 targets, 50 steps, a rougher look in seconds)")
    p.add_argument("--steps", type=int, help="optimization steps (default: the spec's, else the quality's: 200 final, "
                   "50 draft; 2001 single)")
    p.add_argument("--goal", choices=("image", "value"), help="space the goal is measured in (default: image)")
    p.add_argument("--lr", type=float, help="learning rate (default: 0.002 multilayer, 0.05 single)")
    p.add_argument("--strength", type=float, help="scale of the fitted edit, recorded with the version (default: the "
                   "one its strength curve picks, final; 0.6 draft; 1 single; 0 = none)")
    p.add_argument("--search-targets", type=int,
                   help="extra paste targets found by context search (default: 128 final, 16 draft, 0 single)")
    p.add_argument("--description", help="free text recorded with the spec")
    p.add_argument("--dry-run", action="store_true", help="run the edit but commit nothing")
    p.add_argument("--promote", metavar="ALIAS", help="point ALIAS (e.g. production) at the new version")
    p.add_argument("--reason", default="", help="why, recorded in the alias history with --promote")
    p.add_argument("--request-id", help="idempotency key (default: a fresh one; retries reuse it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_rewrite)
