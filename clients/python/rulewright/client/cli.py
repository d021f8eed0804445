"""The ``rulewright`` command: sample, dissect, rewrite and manage versions over the API.

Subcommands: ``models``, ``layers``, ``sample``, ``dissect``, ``rewrite``, ``versions``,
``aliases``, ``alias set``, ``alias history``, ``rollback``, ``export``, ``dataset create|get|list|cancel``
(bulk image sets as WebDataset shards, a long-running job), ``stats create|get|list|cancel`` (a
layer's key moment over up to 10^7 samples into the statistics cache, a long-running job), and ``serve`` (the
server itself, when it is installed: ``pip install rulewright``). Errors print the server's
message and one line per field violation and exit 1; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from tqdm import tqdm

from rulewright.client.cli_adapter import add_adapter_parsers
from rulewright.client.cli_strength import add_strength_commands
from rulewright.client.client import Client
from rulewright.client.errors import RulewrightError
from rulewright.client.images import draw_boxes, grid, heatmap_overlay
from rulewright.client.spec import edit_spec_pb, parse_region, parse_seeds
from rulewright.client.types import DatasetJob, Progress, RewriteResult

DEFAULT_ADDRESS = "127.0.0.1:50051"
SERVE_MISSING = "rulewright serve needs the server: pip install rulewright"


def _seeds(text: str) -> list[int]:
    try:
        return parse_seeds(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _seed_range(text: str) -> range:
    """``A-B`` (inclusive) or one seed ``A``: a dataset job's seeds are one contiguous range."""
    lo, dash, hi = text.partition("-")
    try:
        first, last = int(lo), int(hi if dash else lo)
    except ValueError:
        raise argparse.ArgumentTypeError(f"seeds {text!r}: expected a range like 0-9999") from None
    if last < first or first < 0:
        raise argparse.ArgumentTypeError(f"seeds {text!r}: expected a non-empty range of seeds >= 0")
    return range(first, last + 1)


def _region(text: str) -> dict[str, Any]:
    try:
        return parse_region(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _reference(name: str) -> str:
    """``models/faces/versions/3`` → ``faces/3`` (a model reference)."""
    parts = name.split("/")
    return f"{parts[1]}/{parts[3]}" if len(parts) == 4 else name


def _time(t) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S") if t else "-"


# ---- subcommands -----------------------------------------------------------------------------

def cmd_models(client: Client, args: argparse.Namespace) -> int:
    for m in client.models():
        aliases = ", ".join(f"{a}={al.version}" for a, al in sorted(m.aliases.items())) or "-"
        print(f"{m.id}\t{m.arch}\tlatest {m.latest_version}\taliases {aliases}\t{m.description}")
    return 0


def cmd_layers(client: Client, args: argparse.Namespace) -> int:
    info = client.layers(args.model)
    print(f"{info.version}: {info.image_resolution}x{info.image_resolution} images, z {info.z_dim}, "
          f"default layer {info.default_layer}")
    for layer in info.layers:
        shape = lambda s: "x".join(map(str, s))  # noqa: E731
        print(f"  {layer.name}\tkey {shape(layer.key_shape)}\tvalue {shape(layer.value_shape)}"
              f"\tweight {shape(layer.weight_shape)}{'  linear' if layer.linear else ''}")
    return 0


def cmd_sample(client: Client, args: argparse.Namespace) -> int:
    images = client.sample(args.model, args.seeds, truncation=args.truncation)
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
    result = client.dissect(args.model, args.region, layer=args.layer or "", top=args.top, rank_by=args.rank_by,
                            include_maps=bool(args.out), threshold_samples=args.threshold_samples)
    print(f"{result.version} layer {result.layer}: unit, iou, contrast, threshold")
    for u in result.units:
        print(f"  {u.unit}\t{u.iou:.4f}\t{u.contrast:.4f}\t{u.threshold:.4f}")
    if args.out and result.units:
        seeds = list(dict.fromkeys(r["seed"] for r in args.region))
        pictures = {im.seed: im.image for im in client.sample(_reference(result.version), seeds)}
        boxes = {s: [r["box"] for r in args.region if r["seed"] == s] for s in seeds}
        maps = {(m.unit, m.seed): m.values for m in result.maps}
        tiles = []
        for u in result.units:
            for s in seeds:
                tile = heatmap_overlay(pictures[s], maps[(u.unit, s)], threshold=u.threshold)
                tiles.append(draw_boxes(tile, boxes[s], color="cyan", scale=args.scale))
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        grid(tiles, columns=len(seeds), scale=1).save(args.out)
        print(f"heatmap of unit{'s' if len(result.units) > 1 else ''} "
              f"{', '.join(str(u.unit) for u in result.units)} (rows) on seeds {seeds} (columns): {args.out}")
    return 0


def _edit_spec(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, Any]:
    """The spec file (if any) with the flags laid over it."""
    spec: dict[str, Any] = {}
    if args.spec:
        try:
            spec = json.loads(Path(args.spec).read_text())
        except (OSError, ValueError) as exc:
            parser.error(f"--spec {args.spec}: {exc}")
        if not isinstance(spec, dict):
            parser.error(f"--spec {args.spec}: must hold a JSON object")
    for key in ("op", "method", "layer", "rank", "steps", "goal", "lr", "strength", "description"):
        if getattr(args, key) is not None:
            spec[key] = getattr(args, key)
    if args.search_targets is not None:
        spec["search"] = {**(spec.get("search") or {}), "targets": args.search_targets}
    if args.copy is not None:
        spec["copy"] = args.copy
    if args.paste:
        spec["paste"] = args.paste
    if args.context:
        spec["context"] = args.context
    if spec.get("op", "rewrite") == "rewrite" and not (spec.get("copy") and spec.get("paste")):
        parser.error("rewrite needs --spec FILE, or --copy and at least one --paste")
    if spec.get("op", "rewrite") != "rewrite" and not spec.get("context"):
        parser.error(f"op {spec['op']} needs at least one --context")
    return spec


class _Bars:
    """One tqdm bar per stage of a long call, on stderr."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.bar: tqdm | None = None
        self.stage = ""

    def update(self, p: Progress) -> None:
        if not self.enabled:
            return
        if p.stage != self.stage:
            self.close()
            self.stage = p.stage
            self.bar = tqdm(total=p.steps or None, desc=p.stage, unit="sample" if p.stage == "statistics" else "step",
                            file=sys.stderr, leave=True, dynamic_ncols=True)
        assert self.bar is not None
        if p.steps:
            self.bar.total = p.steps
        self.bar.update(p.step - self.bar.n)
        if p.loss is not None:
            self.bar.set_postfix(loss=f"{p.loss:.4f}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def cmd_rewrite(client: Client, args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    spec = _edit_spec(parser, args)
    try:
        edit_spec_pb(spec)
    except ValueError as exc:
        parser.error(str(exc))
    bars = _Bars(not args.quiet)
    result: RewriteResult | None = None
    try:
        for event in client.rewrite(args.model, spec, dry_run=args.dry_run, request_id=args.request_id):
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


def cmd_versions(client: Client, args: argparse.Namespace) -> int:
    aliases = client.aliases(args.model)
    for v in client.versions(args.model):
        names = ",".join(a for a, al in sorted(aliases.items()) if al.version == v.number) or "-"
        what = v.spec.get("description") or v.spec.get("name") or (v.spec.get("layer") and f"layer {v.spec['layer']}") or ""
        print(f"{v.number}\t{v.kind}\tparent {v.parent_version or '-'}\t{v.author}\t{_time(v.create_time)}"
              f"\taliases {names}\t{what}")
    return 0


def cmd_aliases(client: Client, args: argparse.Namespace) -> int:
    for name, a in sorted(client.aliases(args.model).items()):
        print(f"{name}\t{a.version}\tetag {a.etag}\t{_time(a.update_time)}")
    return 0


def cmd_alias_set(client: Client, args: argparse.Namespace) -> int:
    before = client.aliases(args.model).get(args.alias)
    kw = ({"expected_version": args.expect_version} if args.expect_version is not None
          else {"etag": before.etag} if before else {"expected_version": 0})
    moved = client.set_alias(args.model, args.alias, args.version, reason=args.reason, **kw)
    print(f"{args.alias}: {before.version if before else '-'} -> {moved.version}")
    return 0


def cmd_alias_history(client: Client, args: argparse.Namespace) -> int:
    for m in client.alias_history(args.model, args.alias):
        print(f"{m.seq}\t{m.from_version or '-'} -> {m.to_version or '-'}\t{m.author}\t{_time(m.move_time)}"
              f"\t{m.reason}")
    return 0


def cmd_rollback(client: Client, args: argparse.Namespace) -> int:
    before = client.alias(args.model, args.alias)
    # The etag just read: what is printed as "before" is exactly the state rolled back.
    moved = client.rollback(args.model, args.alias, reason=args.reason, etag=before.etag)
    print(f"{args.alias}: {before.version} -> {moved.version}")
    return 0


def cmd_export(client: Client, args: argparse.Namespace) -> int:
    done = client.export(args.model, args.version, args.out)
    print(f"{done.version.name}: {done.path} ({done.size_bytes} bytes, sha256 {done.sha256})")
    return 0


def _print_job(job: DatasetJob, shards: bool = False) -> None:
    print(f"{job.name}\t{job.state}\t{job.version}\tshards {job.shards_done}/{job.shards_total}"
          f"\timages {job.images_done}/{job.images_total}" + (f"\t{job.error}" if job.error else ""))
    if job.manifest_uri:
        print(f"manifest {job.manifest_uri}")
    for s in job.shards if shards else ():
        print(f"{s.uri}\t{s.samples} images\tsha256 {s.sha256}")


def _with_bar(updates: Iterable[Any], job, quiet: bool, total: int, done: Callable[[Any], int], **bar: Any):
    """Follow ``updates`` of ``job`` to its last, with a progress bar of ``done(job)`` of ``total`` on stderr."""
    progress = None if quiet else tqdm(total=total, file=sys.stderr, dynamic_ncols=True, **bar)
    try:
        for job in updates:
            if progress is not None:
                progress.update(done(job) - progress.n)
                progress.set_postfix(shards=f"{job.shards_done}/{job.shards_total}")
    finally:
        if progress is not None:
            progress.close()
    return job


def _follow(client: Client, job: DatasetJob, quiet: bool) -> DatasetJob:
    """Wait for a job with an images progress bar on stderr; Ctrl-C leaves the job running."""
    return _with_bar(client.watch_dataset_job(job.name), job, quiet, job.images_total, lambda j: j.images_done,
                     desc="dataset", unit="image")


def cmd_dataset_create(client: Client, args: argparse.Namespace) -> int:
    job = client.create_dataset_job(args.model, args.seeds, shard_size=args.shard_size, truncation=args.truncation,
                                    request_id=args.request_id, output_uri=args.out or "")
    print(f"started {job.name} ({job.version}, {job.shards_total} shards)", file=sys.stderr)
    return _created(client, args, job)


def _print_stats_job(job) -> None:
    print(f"{job.name}\t{job.state}\t{job.version}\t{job.layer}\tshards {job.shards_done}/{job.shards_total}"
          f"\tsamples {job.samples_done}/{job.samples_total}" + (f"\t{job.error}" if job.error else ""))
    if job.cache_key:
        print(f"cached {job.cache_key}")
        print(f"statistic {job.statistic_uri} (sha256 {job.sha256})")


def _follow_stats(client: Client, job, quiet: bool):
    """Wait for a statistics job with a samples progress bar on stderr; Ctrl-C leaves the job running."""
    return _with_bar(client.watch_statistics_job(job.name), job, quiet, job.samples_total, lambda j: j.samples_done,
                     desc="statistics", unit="sample", unit_scale=True)


def cmd_stats_create(client: Client, args: argparse.Namespace) -> int:
    job = client.create_statistics_job(args.model, args.samples, layer=args.layer or "", seed_start=args.seed_start,
                                       truncation=args.truncation, shard_size=args.shard_size,
                                       request_id=args.request_id)
    print(f"started {job.name} ({job.version} {job.layer}, {job.shards_total} shards)", file=sys.stderr)
    return _created(client, args, job)


@dataclasses.dataclass(frozen=True)
class _JobKind:
    """What the job commands call for one kind of job (dataset, statistics)."""

    get: Callable[[Client, str], Any]
    list: Callable[[Client], Iterable[Any]]
    cancel: Callable[[Client, str], Any]
    follow: Callable[[Client, Any, bool], Any]          # wait with a progress bar; Ctrl-C leaves the job running
    row: Callable[[Any], None]                          # one job in a listing
    detail: Callable[[Any], None]                       # one job on its own, with what it made


DATASET_JOBS = _JobKind(Client.dataset_job, Client.dataset_jobs, Client.cancel_dataset_job, _follow, _print_job,
                        lambda job: _print_job(job, shards=True))
STATISTICS_JOBS = _JobKind(Client.statistics_job, Client.statistics_jobs, Client.cancel_statistics_job,
                           _follow_stats, _print_stats_job, _print_stats_job)


def _created(client: Client, args: argparse.Namespace, job) -> int:
    """After a create: print the job, or follow it to its end (exit 1 unless it succeeded)."""
    kind: _JobKind = args.jobs
    if args.no_wait:
        kind.row(job)
        return 0
    job = kind.follow(client, job, args.quiet)
    kind.detail(job)
    return 0 if job.state == "succeeded" else 1


def cmd_job_get(client: Client, args: argparse.Namespace) -> int:
    kind: _JobKind = args.jobs
    job = kind.get(client, args.name)
    kind.detail(kind.follow(client, job, args.quiet) if args.wait else job)
    return 0


def cmd_job_list(client: Client, args: argparse.Namespace) -> int:
    for job in args.jobs.list(client):
        args.jobs.row(job)
    return 0


def cmd_job_cancel(client: Client, args: argparse.Namespace) -> int:
    args.jobs.row(args.jobs.cancel(client, args.name))
    return 0


# ---- the parser ------------------------------------------------------------------------------

def _connection_flags(p: argparse.ArgumentParser, suppress: bool) -> None:
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)   # subcommands must not reset the globals
    p.add_argument("--address", default=d(os.environ.get("RULEWRIGHT_ADDRESS") or DEFAULT_ADDRESS),
                   help="host:port of the server (default: $RULEWRIGHT_ADDRESS or 127.0.0.1:50051)")
    p.add_argument("--token", default=d(os.environ.get("RULEWRIGHT_TOKEN") or None),
                   help="bearer token (default: $RULEWRIGHT_TOKEN; none: no auth)")
    p.add_argument("--timeout", type=float, default=d(60.0),
                   help="seconds a call may take, retries included (rewrite and export: an hour)")
    p.add_argument("--retries", type=int, default=d(4), help="retries of a call the server is unavailable for")


def _job_create_flags(p: argparse.ArgumentParser, run: Callable, kind: _JobKind) -> None:
    """The flags every job's ``create`` shares."""
    p.add_argument("--request-id", help="idempotency key: creating again with it returns the same job")
    p.add_argument("--no-wait", action="store_true", help="print the job's name and return at once")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=run, jobs=kind)


def _job_actions(add: Callable, subs, what: str, kind: _JobKind, made: str, cancelled: str) -> None:
    """``get``, ``list`` and ``cancel`` of one kind of job."""
    p = add("get", f"show a {what} job: state, progress, and {made} once done", subs)
    p.add_argument("name", help="operations/ID or ID, as create printed it")
    p.add_argument("--wait", action="store_true", help="follow it with a progress bar until it is done")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_job_get, jobs=kind)
    p = add("list", f"list the {what} jobs in the server's store", subs)
    p.set_defaults(run=cmd_job_list, jobs=kind)
    p = add("cancel", f"stop a {what} job between shards ({cancelled})", subs)
    p.add_argument("name", help="operations/ID or ID")
    p.set_defaults(run=cmd_job_cancel, jobs=kind)


def _add_version_parsers(sub, add: Callable, common: argparse.ArgumentParser) -> None:
    """The commands that list versions and move aliases."""
    p = add("versions", "list a model's versions, oldest first")
    p.add_argument("model", help="model name, e.g. faces")
    p.set_defaults(run=cmd_versions)

    p = add("aliases", "list a model's aliases")
    p.add_argument("model", help="model name, e.g. faces")
    p.set_defaults(run=cmd_aliases)

    alias = sub.add_parser("alias", help="move an alias or show its history", description="move an alias or show "
                           "its history", parents=[common])
    alias_sub = alias.add_subparsers(dest="alias_command", required=True, metavar="ACTION")
    p = add("set", "point an alias at a version (compare-and-set on its current state)", alias_sub)
    p.add_argument("model", help="model name, e.g. faces")
    p.add_argument("alias", help="alias name, e.g. production")
    p.add_argument("version", type=int, help="version number (0 unsets the alias)")
    p.add_argument("--expect-version", type=int,
                   help="move only if the alias points here now (0: unset); default: the state just read")
    p.add_argument("--reason", default="", help="why, recorded in the alias history")
    p.set_defaults(run=cmd_alias_set)
    p = add("history", "list an alias's moves, oldest first", alias_sub)
    p.add_argument("model", help="model name, e.g. faces")
    p.add_argument("alias", nargs="?", default="production", help="alias name (default: production)")
    p.set_defaults(run=cmd_alias_history)

    p = add("rollback", "move an alias back to where its latest move came from")
    p.add_argument("model", help="model name, e.g. faces")
    p.add_argument("--alias", default="production", help="alias to roll back (default: production)")
    p.add_argument("--reason", default="", help="why, recorded in the alias history")
    p.set_defaults(run=cmd_rollback)
    add_adapter_parsers(sub, add)


def _add_job_parsers(sub, add: Callable) -> None:
    """The ``dataset`` and ``stats`` commands: long-running jobs on the server."""
    dataset = sub.add_parser("dataset", help="bulk image sets: WebDataset tar shards and a manifest in the "
                             "server's object store", description="bulk image sets: WebDataset tar shards and a "
                             "manifest in the server's object store, made by a long-running job")
    dsub = dataset.add_subparsers(dest="dataset_command", required=True, metavar="ACTION")
    p = add("create", "start a dataset job and follow it with a progress bar", dsub)
    p.add_argument("model", help="model reference: faces, faces@production or faces/3 (resolved once, at creation)")
    p.add_argument("--seeds", type=_seed_range, required=True, help="one image per seed of this range, e.g. 0-9999")
    p.add_argument("--shard-size", type=int, default=1000, help="images per tar shard (1 to 10000)")
    p.add_argument("--truncation", type=float, help="truncation toward the mean latent, 0 to 1 (StyleGAN2 only)")
    p.add_argument("--out", metavar="URI", help="write the shards and manifest to s3://bucket/prefix or file:///path "
                   "(a prefix the server's operator allowed) instead of the registry's store")
    _job_create_flags(p, cmd_dataset_create, DATASET_JOBS)
    _job_actions(add, dsub, "dataset", DATASET_JOBS, "its shards", "the shards written stay whole")

    stats = sub.add_parser("stats", help="a layer's key moment over many samples, into the statistics cache",
                           description="a layer's key moment C over more samples than one request may compute, "
                           "merged from shards by a long-running job into the server's statistics cache, where a "
                           "rewrite whose stats name the same samples finds it")
    ssub = stats.add_subparsers(dest="stats_command", required=True, metavar="ACTION")
    p = add("create", "start a statistics job and follow it with a progress bar", ssub)
    p.add_argument("model", help="model reference: faces, faces@production or faces/3 (resolved once, at creation)")
    p.add_argument("--layer", help="layer (default: the model's default layer)")
    p.add_argument("--samples", type=int, required=True, help="samples (seeds) the moment covers, up to the "
                   "server's max_job_samples (10,000,000 by default)")
    p.add_argument("--seed-start", type=int, default=0, help="first seed (a rewrite's stats.seed_start)")
    p.add_argument("--truncation", type=float, help="truncation of the samples, 0 to 1 (StyleGAN2 only)")
    p.add_argument("--shard-size", type=int, default=10_000, help="samples per shard (1 to 1000000; rounded up "
                   "to the layer's float32 block so shards merge exactly)")
    _job_create_flags(p, cmd_stats_create, STATISTICS_JOBS)
    _job_actions(add, ssub, "statistics", STATISTICS_JOBS, "its cache key", "nothing is cached")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``rulewright``."""
    parser = argparse.ArgumentParser(prog="rulewright", description="Sample, dissect and rewrite GANs served by "
                                     "rulewright, and manage their versions and aliases.")
    _connection_flags(parser, suppress=False)
    common = argparse.ArgumentParser(add_help=False)
    _connection_flags(common, suppress=True)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help: str, parent=sub) -> argparse.ArgumentParser:
        return parent.add_parser(name, help=help, description=help, parents=[common])

    sub.add_parser("serve", help="run the server (needs the rulewright package); see rulewright serve --help",
                   add_help=False)

    p = add("models", "list the registered models")
    p.set_defaults(run=cmd_models)

    p = add("layers", "list a model's rewritable layers")
    p.add_argument("model", help="model reference: faces, faces@production or faces/3")
    p.set_defaults(run=cmd_layers)

    p = add("sample", "render seeds to PNG files or one grid")
    p.add_argument("model", help="model reference: faces, faces@production or faces/3")
    p.add_argument("--seeds", type=_seeds, required=True, help="seeds, e.g. 0-15 or 1,5,9 or 0-3,10")
    p.add_argument("--out", help="folder to write seed-N.png files into")
    p.add_argument("--grid", help="PNG file to write all images into, as one grid")
    p.add_argument("--columns", type=int, default=8, help="images per row of the grid")
    p.add_argument("--scale", type=int, default=2, help="enlargement of the grid (nearest neighbour)")
    p.add_argument("--truncation", type=float, help="truncation toward the mean latent, 0 to 1 (StyleGAN2 only)")
    p.set_defaults(run=cmd_sample)
    add_strength_commands(add, p)           # sample --strength, rescale

    p = add("dissect", "rank a layer's units against regions; optionally write their heatmaps")
    p.add_argument("model", help="model reference: faces, faces@production or faces/3")
    p.add_argument("--region", type=_region, action="append", required=True,
                   help="SEED:x0,y0,x1,y1 in image pixels (repeat for more regions)")
    p.add_argument("--layer", help="layer to dissect (default: the model's default layer)")
    p.add_argument("--top", type=int, default=1, help="how many of the best units to show")
    p.add_argument("--rank-by", choices=("iou", "contrast"), default="iou", help="how units are ranked")
    p.add_argument("--threshold-samples", type=int, default=0,
                   help="samples the unit thresholds are computed over (0: the server's default)")
    p.add_argument("--out", help="PNG file: each top unit's map over each region's sample, boxes outlined")
    p.add_argument("--scale", type=int, default=4, help="enlargement of the heatmap tiles")
    p.set_defaults(run=cmd_dissect)

    p = add("rewrite", "run an edit from a spec JSON or from flags; prints the new version")
    p.add_argument("model", help="model reference of the version to edit: faces, faces@production or faces/3")
    p.add_argument("--spec", help="edit spec JSON (examples/edits/*.json); flags below override its fields")
    p.add_argument("--copy", type=_region, help="SEED:x0,y0,x1,y1 whose content is copied")
    p.add_argument("--paste", type=_region, action="append", help="SEED:x0,y0,x1,y1 where the copy goes (repeat)")
    p.add_argument("--context", type=_region, action="append",
                   help="SEED:x0,y0,x1,y1 defining where the rule applies (repeat; default: the pastes)")
    p.add_argument("--op", choices=("rewrite", "erase", "zero"), help="what the edit does (default: rewrite)")
    p.add_argument("--method", choices=("multilayer", "single"),
                   help="low-rank deltas on every layer (default), or the paper's one-layer edit")
    p.add_argument("--layer", help="layer to edit (single) or to search the context at (default: the model's default)")
    p.add_argument("--rank", type=int, help="rank of the update per layer (default: 4 multilayer, 8 single)")
    p.add_argument("--steps", type=int, help="optimization steps (default: the spec's, else 50 multilayer, 2001 single)")
    p.add_argument("--goal", choices=("image", "value"), help="space the goal is measured in (default: image)")
    p.add_argument("--lr", type=float, help="learning rate (default: 0.002 multilayer, 0.05 single)")
    p.add_argument("--strength", type=float, help="scale of the fitted edit, recorded with the version (default: 0.6 multilayer, 1 single; 0 = none)")
    p.add_argument("--search-targets", type=int,
                   help="extra paste targets found by context search (default: 16 multilayer, 0 single)")
    p.add_argument("--description", help="free text recorded with the spec")
    p.add_argument("--dry-run", action="store_true", help="run the edit but commit nothing")
    p.add_argument("--promote", metavar="ALIAS", help="point ALIAS (e.g. production) at the new version")
    p.add_argument("--reason", default="", help="why, recorded in the alias history with --promote")
    p.add_argument("--request-id", help="idempotency key (default: a fresh one; retries reuse it)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=cmd_rewrite)

    _add_version_parsers(sub, add, common)

    p = add("export", "download a version's weights as one safetensors file (sha256 checked)")
    p.add_argument("model", help="model name, e.g. faces")
    p.add_argument("version", type=int, help="version number")
    p.add_argument("--out", required=True, help="file to write")
    p.set_defaults(run=cmd_export)
    _add_job_parsers(sub, add)
    return parser


def serve(argv: Sequence[str]) -> int:
    """``rulewright serve ...``: the server's own command, if the server is installed."""
    try:
        from rulewright.service.cli import server_main
    except ImportError:
        print(SERVE_MISSING, file=sys.stderr)
        return 2
    return server_main(["serve", *argv])


def print_error(err: RulewrightError) -> None:
    """``rulewright: error: <message>`` and one ``  <field>: <description>`` line per violation."""
    print(f"rulewright: error: {err.message}", file=sys.stderr)
    for field, description in err.field_violations:
        print(f"  {field}: {description}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``rulewright``; returns the exit status (0 ok, 1 a failed call, 2 usage)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        return serve(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    with Client(args.address, args.token, timeout=args.timeout, retries=args.retries) as client:
        try:
            if args.run is cmd_rewrite:
                return cmd_rewrite(client, args, parser)
            return args.run(client, args)
        except RulewrightError as err:
            print_error(err)
            return 1
        except OSError as err:
            print(f"rulewright: error: {err}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            return 130


if __name__ == "__main__":
    sys.exit(main())
