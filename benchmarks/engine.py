"""Engine throughput on the faces model: ``python -m benchmarks.engine`` (or ``make bench``).

Prints images/s when sampling at batch 1, 16 and 64; keys/s for the key statistics at the default
layer (forward pass + accumulation); and the FLOP rate of the accumulation (KᵀK in float32, summed
in float64) as a ratio to a plain ``torch.mm`` of the same shapes measured in the same run.
Every figure is the median of several timed repeats after a warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Callable

import torch

from rulewright.service.engine.device import configure_determinism, select_device
from rulewright.service.engine.loading import load_generator
from rulewright.service.engine.nethook import latents_to_keys
from rulewright.service.engine.sampling import latents
from rulewright.service.engine.stats import SecondMoment, key_moment
from rulewright.service.importers.faces import import_faces


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median seconds of ``fn`` over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run(device_name: str = "auto", stats_samples: int = 256, stats_batch: int = 32, repeats: int = 5) -> dict:
    """Measure everything; returns the figures as a dict."""
    configure_determinism()
    device = select_device(device_name)
    model = load_generator(import_faces()).to(device)
    layer = model.default_layer()
    results: dict = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "model": "faces (dcgan 64x64)", "layer": layer, "sampling": {}}

    for batch in (1, 16, 64):
        z = latents(range(batch), model.z_dim).to(device)
        with torch.no_grad():
            seconds = timeit(lambda: model(z), device, repeats)
        results["sampling"][f"batch_{batch}_images_per_s"] = batch / seconds

    # End to end: latents → keys (stopping at the layer) → accumulation, over stats_samples seeds.
    seconds = timeit(lambda: key_moment(model, layer, range(stats_samples), batch_size=stats_batch),
                     device, max(1, repeats // 2), warmup=1)
    keys_per_sample = model.layer_infos()[[i.name for i in model.layer_infos()].index(layer)].key_shape
    n_keys = stats_samples * keys_per_sample[1] * keys_per_sample[2]
    results["statistics_keys_per_s"] = n_keys / seconds

    # The accumulation alone vs torch.mm on the same shapes: (C×N) @ (N×C), float32.
    with torch.no_grad():
        keys = latents_to_keys(model, layer, latents(range(stats_batch), model.z_dim).to(device)).key
    rows = keys.permute(0, 2, 3, 1).reshape(-1, keys.shape[1]).contiguous()
    n, c = rows.shape
    flops = 2.0 * n * c * c
    stat = SecondMoment(c)
    acc_s = timeit(lambda: stat.add(rows), device, repeats * 4)
    a, b = rows.T.contiguous(), rows.clone()
    mm_s = timeit(lambda: torch.mm(a, b), device, repeats * 4)
    results["accumulation"] = {
        "rows": n, "dim": c,
        "stat_gflops": flops / acc_s / 1e9,
        "mm_gflops": flops / mm_s / 1e9,
        "ratio_to_mm": (flops / acc_s) / (flops / mm_s),
    }
    return results


def main(argv: list[str] | None = None) -> int:
    """Print the table (or JSON with --json)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--stats-samples", type=int, default=256, help="seeds for the keys/s figure")
    parser.add_argument("--stats-batch", type=int, default=32, help="samples per statistics batch")
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats per figure (median reported)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = parser.parse_args(argv)
    r = run(args.device, args.stats_samples, args.stats_batch, args.repeats)
    if args.json:
        print(json.dumps(r))
        return 0
    print(f"engine benchmark: {r['model']} on {r['device']} (torch {r['torch']}, {r['threads']} threads)")
    for key, value in r["sampling"].items():
        print(f"  sampling {key.replace('_', ' ')}: {value:10.1f}")
    print(f"  statistics at {r['layer']}: {r['statistics_keys_per_s']:,.0f} keys/s (forward + accumulation)")
    acc = r["accumulation"]
    print(f"  accumulation KᵀK ({acc['rows']}×{acc['dim']}): {acc['stat_gflops']:.1f} GFLOP/s vs torch.mm "
          f"{acc['mm_gflops']:.1f} GFLOP/s → ratio {acc['ratio_to_mm']:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
