"""Registry costs on the faces model: ``python -m benchmarks.registry``.

Prints, each figure the median of several repeats, every ratio against a baseline measured in
the same run:

- the bytes a rank-1 edit version adds (its delta blob + its manifest) against the full weights;
- the time to materialize an edited version from the store (base blob read and verified, loaded,
  delta applied) against loading the full weights from the store (the same read without the
  delta), and the time to apply the edit to a resident base (what the resident-version LRU pays);
- fetching C at ``main.6`` over 1,000 samples from Redis (GET + deserialize) against recomputing
  it with ``key_moment``, and apart from it the cost of the cache key (hashing the weights upstream
  of the layer, paid once per version).

It starts its own ``redis-server`` (persistence off) on a free loopback port and a file store in
a temporary folder; both are removed at the end.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from rulewright.registry import Registry
from rulewright.registry.filestore import FileStore
from rulewright.registry.stats_cache import RedisStatsCache
from rulewright.service.domain.statistics import cached_key_moment, moment_key
from rulewright.service.domain.weights import materialize
from rulewright.service.engine.delta import LowRankDelta, apply_to_state_dict, from_bytes, to_bytes
from rulewright.service.engine.loading import load_generator
from rulewright.service.engine.stats import key_moment, load_stat
from rulewright.service.importers.faces import import_faces
from tests.backends import RedisServer

LAYER = "main.6"
SAMPLES = 1000


def median_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def median_pair(a: Callable[[], object], b: Callable[[], object], repeats: int) -> tuple[float, float]:
    """Median wall times of ``a`` and ``b``, timed alternately so that load on the machine hits both alike."""
    a()
    b()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, out in ((a, ta), (b, tb)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(ta), statistics.median(tb)


def rank1_delta(weight: torch.Tensor, in_axis: int, seed: int = 0) -> LowRankDelta:
    """A random rank-1 delta of the right shapes for ``weight`` (direction (in, 1), Λ with in → 1)."""
    g = torch.Generator().manual_seed(seed)
    lam_shape = list(weight.shape)
    lam_shape[in_axis] = 1
    direction = torch.randn(weight.shape[in_axis], 1, generator=g)
    return LowRankDelta(
        f"{LAYER}.weight", in_axis, direction / direction.norm(), 0.01 * torch.randn(lam_shape, generator=g)
    )


def _unreachable() -> bytes:
    raise RuntimeError("the statistic should have been cached")


def run(repeats: int = 5) -> dict:
    """Measure everything; returns the figures as a dict."""
    weights_path = import_faces()
    weights = Path(weights_path).read_bytes()
    model = load_generator(weights_path)
    spec = model.layer(LAYER)
    results: dict = {
        "model": "faces (dcgan 64x64)",
        "layer": LAYER,
        "repeats": repeats,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    with tempfile.TemporaryDirectory(prefix="rulewright-bench-") as tmp:
        registry = Registry(FileStore(Path(tmp) / "store"))
        registry.import_model(
            "faces",
            arch=model.arch,
            config=model.config(),
            weights=weights,
            spec={"source": "gan-face-generate==1.1.1"},
        )
        delta = rank1_delta(spec.weight.detach(), spec.in_axis)
        edit_spec = {"layer": LAYER, "rank": 1, "goal": "image", "context": "benchmark", "seed": 0}
        version = registry.create_version(
            "faces",
            parent=1,
            delta=to_bytes([delta]),
            spec=edit_spec,
            metrics={"efficacy": 0.0, "side_effect": 0.0},
            author="benchmark",
        )
        manifest = registry.store.read(registry._version_key("faces", version.number))
        edit_bytes = version.blobs["delta"].size + len(manifest)
        full_bytes = registry.get_version("faces", 1).blobs["weights"].size
        results["size"] = {
            "delta_blob": version.blobs["delta"].size,
            "manifest": len(manifest),
            "edit_version": edit_bytes,
            "full_weights": full_bytes,
            "ratio": edit_bytes / full_bytes,
            "direction_shape": list(delta.direction.shape),
            "lambda_shape": list(delta.lam.shape),
        }

        load_full, load_edit = median_pair(
            lambda: materialize(registry, "faces", 1),
            lambda: materialize(registry, "faces", version.number),
            2 * repeats,
        )
        base = materialize(registry, "faces", 1)
        blob = registry.store.get_blob(version.blobs["delta"].sha256)
        apply_only = median_seconds(lambda: apply_to_state_dict(base, from_bytes(blob)), repeats * 4)
        results["materialize"] = {
            "full_weights_s": load_full,
            "edited_version_s": load_edit,
            "ratio": load_edit / load_full,
            "apply_on_resident_base_s": apply_only,
        }

        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is not installed (apt-get install redis-server, or make test)")
        redis = RedisServer(binary, Path(tmp))     # the tests' launcher: persistence off, a free port
        redis.start()
        try:
            cache = RedisStatsCache(f"redis://127.0.0.1:{redis.port}/0", namespace="bench")
            seeds = range(SAMPLES)
            compute = median_seconds(lambda: key_moment(model, LAYER, seeds), max(3, repeats // 2 + 1), warmup=0)
            # The key names the weights upstream of the layer: hashing them is paid once per
            # version (a server keeps it with the resident version), so it is reported apart.
            fingerprint = median_seconds(lambda: moment_key(model, LAYER, seeds), repeats)
            key = moment_key(model, LAYER, seeds)
            cached_key_moment(cache, model, LAYER, seeds)  # fill the cache
            fetch = median_seconds(lambda: load_stat(cache.get_or_compute(key, _unreachable)), repeats * 4)
            payload = cache.get(key)
            cache.close()
        finally:
            redis.stop()
        results["statistics"] = {
            "samples": SAMPLES,
            "compute_s": compute,
            "redis_fetch_s": fetch,
            "key_fingerprint_s": fingerprint,
            "speedup": compute / fetch,
            "bytes": len(payload or b""),
        }
    return results


def main(argv: list[str] | None = None) -> int:
    """Print the figures (or JSON with --json)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.registry", description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per figure (median reported)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    r = run(args.repeats)
    if args.json:
        print(json.dumps(r))
        return 0
    s, m, st = r["size"], r["materialize"], r["statistics"]
    print(
        f"registry benchmark: {r['model']}, rank-1 edit at {r['layer']} (torch {r['torch']}, {r['threads']} threads, "
        f"medians of {r['repeats']} or more repeats)"
    )
    print(
        f"  edit version: {s['edit_version']:,} bytes (delta {s['delta_blob']:,} + manifest {s['manifest']:,}) vs full "
        f"weights {s['full_weights']:,} bytes → {100 * s['ratio']:.3f}%"
    )
    print(
        f"  materialize edited version: {1000 * m['edited_version_s']:.1f} ms vs loading full weights "
        f"{1000 * m['full_weights_s']:.1f} ms → ratio {m['ratio']:.2f} (applying the delta to a resident base: "
        f"{1000 * m['apply_on_resident_base_s']:.2f} ms)"
    )
    print(
        f"  statistics C at {r['layer']} over {st['samples']:,} samples ({st['bytes']:,} bytes): Redis fetch "
        f"{1000 * st['redis_fetch_s']:.2f} ms vs recompute {1000 * st['compute_s']:.0f} ms → ratio "
        f"{st['redis_fetch_s'] / st['compute_s']:.4f} ({st['speedup']:,.0f}× faster); cache key (upstream "
        f"fingerprint, once per version) {1000 * st['key_fingerprint_s']:.1f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
