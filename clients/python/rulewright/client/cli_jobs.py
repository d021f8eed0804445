"""``rulewright`` commands over JobService and google.longrunning.Operations: ``dataset
create|get|list|cancel`` (bulk image sets as WebDataset shards) and ``stats create|get|list|cancel``
(a layer's key moment over up to 10^7 samples into the statistics cache), each a long-running job
followed with a progress bar.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any, Callable, Iterable

from tqdm import tqdm

from rulewright.client.cli_args import REF_HELP, reference, seed_range
from rulewright.client.client import Client
from rulewright.client.types import DatasetJob


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
    """Start a dataset job and follow it (or, ``--no-wait``, print it)."""
    job = client.create_dataset_job(str(args.model), args.seeds, shard_size=args.shard_size, truncation=args.truncation,
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
    """Start a statistics job and follow it (or, ``--no-wait``, print it)."""
    job = client.create_statistics_job(str(args.model), args.samples, layer=args.layer or "", seed_start=args.seed_start,
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
    """Show a job (``--wait``: follow it to its end)."""
    kind: _JobKind = args.jobs
    job = kind.get(client, args.name)
    kind.detail(kind.follow(client, job, args.quiet) if args.wait else job)
    return 0


def cmd_job_list(client: Client, args: argparse.Namespace) -> int:
    """One line per job of the kind."""
    for job in args.jobs.list(client):
        args.jobs.row(job)
    return 0


def cmd_job_cancel(client: Client, args: argparse.Namespace) -> int:
    """Stop a job between shards."""
    args.jobs.row(args.jobs.cancel(client, args.name))
    return 0


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


def register(sub, add: Callable[..., argparse.ArgumentParser]) -> None:
    """Add the ``dataset`` and ``stats`` commands: long-running jobs on the server."""
    dataset = sub.add_parser("dataset", help="bulk image sets: WebDataset tar shards and a manifest in the "
                             "server's object store", description="bulk image sets: WebDataset tar shards and a "
                             "manifest in the server's object store, made by a long-running job")
    dsub = dataset.add_subparsers(dest="dataset_command", required=True, metavar="ACTION")
    p = add("create", "start a dataset job and follow it with a progress bar", dsub)
    p.add_argument("model", type=reference, help=f"{REF_HELP}; resolved once, at creation")
    p.add_argument("--seeds", type=seed_range, required=True, help="one image per seed of this range, e.g. 0-9999")
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
    p.add_argument("model", type=reference, help=f"{REF_HELP}; resolved once, at creation")
    p.add_argument("--layer", help="layer (default: the model's default layer)")
    p.add_argument("--samples", type=int, required=True, help="samples (seeds) the moment covers, up to the "
                   "server's max_job_samples (10,000,000 by default)")
    p.add_argument("--seed-start", type=int, default=0, help="first seed (a rewrite's stats.seed_start)")
    p.add_argument("--truncation", type=float, help="truncation of the samples, 0 to 1 (StyleGAN2 only)")
    p.add_argument("--shard-size", type=int, default=10_000, help="samples per shard (1 to 1000000; rounded up "
                   "to the layer's float32 block so shards merge exactly)")
    _job_create_flags(p, cmd_stats_create, STATISTICS_JOBS)
    _job_actions(add, ssub, "statistics", STATISTICS_JOBS, "its cache key", "nothing is cached")
