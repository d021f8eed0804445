"""Where the engine computes, and the numerical settings that keep CPU and GPU in agreement.

- ``select_device(spec)``: "auto" (CUDA when present, else CPU), "cpu", "cuda" or "cuda:N".
- ``configure_determinism()``: turn off TF32 and nondeterministic cuDNN autotuning.
- ``CPU_GPU_TOLERANCE``: the largest pixel difference (images in [-1, 1]) we guarantee between a
  CPU and a CUDA rendering of the same (version, seed, truncation).
"""

from __future__ import annotations

import torch

# Largest |CPU - CUDA| pixel difference we guarantee for images in [-1, 1]. Measured with
# `python -m benchmarks.devices` (H200, torch 2.11+cu130, TF32 off, 64 seeds): faces 5.2e-6,
# random ProGAN 3.1e-6, random StyleGAN2 2.3e-5 on images reaching ±21.8 (1e-6 relative).
# About 1 pixel in 50,000 then differs by one 8-bit level. The margin covers other GPUs and
# cuDNN versions, whose kernels sum in other orders.
CPU_GPU_TOLERANCE = 1e-4


def select_device(spec: str = "auto") -> torch.device:
    """Resolve a device name; ValueError if CUDA is asked for and absent."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise ValueError(f"unknown device {spec!r}: use auto, cpu, cuda or cuda:N") from exc
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {spec!r} requested but CUDA is not available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"device {spec!r} requested but only {torch.cuda.device_count()} GPUs exist")
    elif device.type != "cpu":
        raise ValueError(f"unsupported device {spec!r}: use auto, cpu, cuda or cuda:N")
    return device


def configure_determinism() -> None:
    """Use full float32 precision on GPUs, so the same seed renders the same picture as on a CPU."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
