"""CPU versus CUDA: the same images from the same seeds, and GPU throughput.

``python -m benchmarks.devices`` (needs a CUDA device; prints one JSON object). For the faces
model and small random ProGAN and StyleGAN2 models it renders the same seeds on the CPU and on
the GPU and reports the largest pixel difference (images in [-1, 1]) and the share of 8-bit
pixels that differ; whether a GPU image depends on its batch; the relative difference of the
key statistics C; and the engine benchmark's figures on the GPU beside the CPU's.
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from benchmarks import engine as engine_bench
from rulewright.service.engine.device import configure_determinism
from rulewright.service.engine.generators.progan import ProGANGenerator
from rulewright.service.engine.generators.stylegan2 import StyleGAN2Generator
from rulewright.service.engine.loading import load_generator
from rulewright.service.engine.sampling import sample, to_uint8
from rulewright.service.engine.stats import key_moment
from rulewright.service.importers.faces import import_faces


def random_models() -> dict:
    """Small randomly initialised ProGAN and StyleGAN2 generators (fixed seed)."""
    torch.manual_seed(0)
    progan = ProGANGenerator([256, 256, 128, 64, 32])
    for p in progan.parameters():
        p.data.normal_()
    stylegan = StyleGAN2Generator(size=64, style_dim=128, n_mlp=4, channels=[256, 256, 128, 64, 32])
    for name, p in stylegan.named_parameters():
        if name.endswith("noise.weight") or name.endswith("activate.bias"):
            p.data.normal_(0, 0.2)
    stylegan.latent_avg = stylegan.mean_latent(512)
    return {"progan": progan, "stylegan2": stylegan}


def compare(model, seeds: list[int], truncation: float, device: torch.device) -> dict:
    """CPU vs GPU images, GPU batch dependence, and C at the default layer on both."""
    gpu = copy.deepcopy(model).to(device)
    cpu_img = sample(model, seeds=seeds, truncation=truncation, batch_size=16)
    gpu_img = sample(gpu, seeds=seeds, truncation=truncation, batch_size=16)
    gpu_b1 = sample(gpu, seeds=seeds[:8], truncation=truncation, batch_size=1)
    gpu_b64 = sample(gpu, seeds=seeds, truncation=truncation, batch_size=64)
    layer = model.default_layer()
    c_cpu = key_moment(model, layer, seeds, truncation=truncation).moment()
    c_gpu = key_moment(gpu, layer, seeds, truncation=truncation).moment().cpu()
    return {
        "cpu_vs_gpu_max_abs": (cpu_img - gpu_img).abs().max().item(),
        "cpu_image_max_abs": cpu_img.abs().max().item(),
        "cpu_vs_gpu_mean_abs": (cpu_img - gpu_img).abs().mean().item(),
        "uint8_pixels_differing": (to_uint8(cpu_img) != to_uint8(gpu_img)).float().mean().item(),
        "uint8_max_level_diff": (to_uint8(cpu_img).int() - to_uint8(gpu_img).int()).abs().max().item(),
        "gpu_batch1_vs_batch16_max_abs": (gpu_b1 - gpu_img[:8]).abs().max().item(),
        "gpu_batch64_vs_batch16_max_abs": (gpu_b64 - gpu_img).abs().max().item(),
        "stats_layer": layer,
        "stats_rel_diff": ((c_cpu - c_gpu).norm() / c_cpu.norm()).item(),
    }


def main(argv: list[str] | None = None) -> int:
    """Run every comparison and print JSON."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.devices", description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=64, help="seeds 0..N-1 to compare")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks.devices needs a CUDA device")
    configure_determinism()
    device = torch.device("cuda")
    seeds = list(range(args.seeds))
    report = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "models": {}}
    report["models"]["faces"] = compare(load_generator(import_faces()), seeds, 1.0, device)
    for name, model in random_models().items():
        report["models"][name] = compare(model, seeds, 0.7 if name == "stylegan2" else 1.0, device)
    report["bench_cuda"] = engine_bench.run("cuda", stats_samples=1024, stats_batch=64)
    report["bench_cpu"] = engine_bench.run("cpu", repeats=3)
    print(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
