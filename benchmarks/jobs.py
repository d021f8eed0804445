"""Bulk jobs on the faces model: ``python -m benchmarks.jobs``.

Two measurements, each against a baseline measured in the same run and interleaved with it (round by
round, so load from elsewhere on the machine hits both alike); every ratio is taken between totals:

1. **Dataset job vs in-process loop.** A dataset job of ``--seeds`` seeds in shards of
   ``--shard-size`` (defaults 2,000 and 250: 8 shards, so the ``--job-workers`` pool stays busy)
   run by ``DatasetJobs`` with the embedded ``LocalExecutor`` into a filesystem registry (tar
   shards published, read back, sha256-checked, recorded; a manifest), against the same images
   made in-process on the same cores: ``Domain.sample`` in passes of ``max_batch`` seeds and the
   same PNG encoder, nothing written. What the ratio leaves is what the job adds: tar building,
   the store's atomic publish and read-back, commit records, the runner's bookkeeping. Each round
   runs both (the order alternating) on fresh seeds; the last line is ``jobs / in-process``.
2. **Statistics job.** A statistics job of ``--stat-samples`` samples (default 100,000, shards of
   ``--stat-shard-size``) at the faces model's default layer, reported in keys/s (key vectors, one
   per location per sample, accumulated per second, wall time of the whole job including the
   merge, the store and the cache), and checked against ``key_moment`` over the same seeds in one
   process (the largest relative difference of C, which must be float64 rounding). The single
   process is timed too, for comparison.

torch keeps its default intra-op threads (printed); the same domain serves every measurement.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from rulewright.service.domain.core import Domain
from rulewright.service.engine.sampling import png_bytes
from rulewright.service.engine.stats import key_moment, load_stat
from rulewright.service.importers.faces import import_faces
from rulewright.service.jobs.dataset import DatasetJobRequest, DatasetJobs, LocalExecutor
from rulewright.service.domain.requests import SampleRequest
from rulewright.service.jobs.statistics import StatisticsJobRequest, StatisticsJobs

MODEL = "faces"
WAIT_S = 3600.0                   # the longest any one job may take before the run gives up


def in_process(domain: Domain, seeds: range) -> int:
    """Images of ``seeds`` sampled and PNG-encoded the way a dataset shard's are, nothing written."""
    step = max(1, min(domain.max_batch, domain.limits.max_images))
    n = 0
    for start in range(seeds.start, seeds.stop, step):
        chunk = list(range(start, min(start + step, seeds.stop)))
        images = domain.sample(SampleRequest(model=MODEL, seeds=chunk)).images
        n += len([png_bytes(img) for img in images.cpu().numpy()])
    return n


def dataset_vs_inprocess(domain: Domain, seeds: int, shard_size: int, rounds: int, workers: int) -> dict:
    """Seconds and images/s of dataset jobs and of the in-process loop, alternating round by round."""
    jobs = DatasetJobs(domain, LocalExecutor(domain, max_workers=workers))
    job_s, loop_s, per_round = 0.0, 0.0, []
    try:
        in_process(domain, range(10**9, 10**9 + 32))           # warm-up: weights resident, allocator primed
        for r in range(rounds):
            job_seeds = range(2 * r * seeds, (2 * r + 1) * seeds)
            loop_seeds = range((2 * r + 1) * seeds, (2 * r + 2) * seeds)

            def job() -> float:
                start = time.perf_counter()
                status = jobs.create(DatasetJobRequest(MODEL, job_seeds.start, seeds, shard_size=shard_size))
                status = jobs.wait(status.spec.id, WAIT_S)
                assert status.state == "succeeded" and status.images_done == seeds, status
                return time.perf_counter() - start

            def loop() -> float:
                start = time.perf_counter()
                assert in_process(domain, loop_seeds) == seeds
                return time.perf_counter() - start

            first, second = (job, loop) if r % 2 == 0 else (loop, job)
            a, b = first(), second()
            j, l = (a, b) if first is job else (b, a)
            job_s, loop_s = job_s + j, loop_s + l
            per_round.append(l / j)
    finally:
        jobs.close()
    return {"seeds_per_round": seeds, "shard_size": shard_size, "rounds": rounds, "job_workers": workers,
            "job_images_per_s": rounds * seeds / job_s, "in_process_images_per_s": rounds * seeds / loop_s,
            "ratio": loop_s / job_s, "round_ratios": per_round}


def statistics_job(domain: Domain, samples: int, shard_size: int) -> dict:
    """keys/s of a statistics job, and its merged C against one process's ``key_moment``."""
    jobs = StatisticsJobs(domain)
    try:
        start = time.perf_counter()
        status = jobs.create(StatisticsJobRequest(MODEL, samples, shard_size=shard_size))
        status = jobs.wait(status.spec.id, WAIT_S)
        job_s = time.perf_counter() - start
        assert status.state == "succeeded", status
    finally:
        jobs.close()
    spec = status.spec
    merged = load_stat(domain.registry.store.read(status.manifest["statistic_key"]))
    model = domain.generator(domain.resolve(f"{MODEL}/{spec.number}")).hookable()
    start = time.perf_counter()
    single = key_moment(model, spec.layer, spec.seeds, spec.truncation, batch_size=spec.batch_size)
    single_s = time.perf_counter() - start
    want = single.moment()
    diff = ((merged.moment() - want).abs().max() / want.abs().max()).item()
    keys = merged.count
    return {"layer": spec.layer, "samples": samples, "shard_size": spec.shard_size, "shards": spec.shards,
            "batch_size": spec.batch_size, "keys": keys, "keys_per_sample": keys // samples,
            "job_seconds": job_s, "job_keys_per_s": keys / job_s, "single_process_seconds": single_s,
            "single_process_keys_per_s": keys / single_s, "max_relative_difference": diff,
            "counts_equal": merged.count == single.count}


def run(seeds: int, shard_size: int, rounds: int, workers: int, stat_samples: int, stat_shard: int) -> dict:
    """Every measurement on one domain over a temporary filesystem registry."""
    results = {"model": "faces (dcgan 64x64)", "device": "cpu", "torch": torch.__version__,
               "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "python": platform.python_version(),
               "load_average_at_start": os.getloadavg()[0]}
    with tempfile.TemporaryDirectory() as tmp:
        domain = Domain.open(Path(tmp) / "data", device="cpu")
        try:
            domain.generator(domain.bootstrap(MODEL, import_faces()))
            results["dataset"] = dataset_vs_inprocess(domain, seeds, shard_size, rounds, workers)
            results["statistics"] = statistics_job(domain, stat_samples, stat_shard)
        finally:
            domain.close()
    results["load_average_at_end"] = os.getloadavg()[0]
    return results


def print_table(r: dict) -> None:
    """The figures as text; the last line is the dataset ratio."""
    d, s = r["dataset"], r["statistics"]
    print(f"jobs benchmark: {r['model']} on {r['device']} (torch {r['torch']}, {r['threads']} intra-op threads, "
          f"{r['cpus']} CPUs, load average {r['load_average_at_start']:.2f} at start, "
          f"{r['load_average_at_end']:.2f} at end)")
    print(f"  1. dataset job ({d['seeds_per_round']} seeds, shards of {d['shard_size']}, {d['job_workers']} workers, "
          f"PNG) vs in-process sample + encode, {d['rounds']} rounds alternating:")
    print(f"     job {d['job_images_per_s']:.1f} img/s, in-process {d['in_process_images_per_s']:.1f} img/s "
          f"(per round {' '.join(f'{x:.2f}' for x in d['round_ratios'])})")
    print(f"  2. statistics job at {s['layer']}: {s['samples']:,} samples x {s['keys_per_sample']} locations = "
          f"{s['keys']:,} keys in {s['shards']} shards of {s['shard_size']:,} (batch {s['batch_size']})")
    print(f"     job {s['job_keys_per_s']:,.0f} keys/s ({s['job_seconds']:.1f} s); one process "
          f"{s['single_process_keys_per_s']:,.0f} keys/s ({s['single_process_seconds']:.1f} s); "
          f"max relative difference of C {s['max_relative_difference']:.2e}")
    print(f"jobs / in-process: {d['ratio']:.2f}")


def main(argv: list[str] | None = None) -> int:
    """Print the table (and save JSON with --json PATH)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.jobs", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=2000, help="images per dataset job (and per in-process loop)")
    parser.add_argument("--shard-size", type=int, default=250, help="images per dataset shard")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of job and loop, order alternating")
    parser.add_argument("--job-workers", type=int, default=2, help="the dataset job's worker threads (the "
                        "server's default job_workers)")
    parser.add_argument("--stat-samples", type=int, default=100_000, help="samples of the statistics job")
    parser.add_argument("--stat-shard-size", type=int, default=25_000, help="samples per statistics shard "
                        "(rounded up to the layer's float32 block)")
    parser.add_argument("--json", metavar="PATH", help="also save the figures as JSON to PATH")
    args = parser.parse_args(argv)
    r = run(args.seeds, args.shard_size, args.rounds, args.job_workers, args.stat_samples, args.stat_shard_size)
    print_table(r)
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
