"""Read generator checkpoints safely and build the right architecture.

- ``read_state_dict(path_or_bytes)``: tensors from a safetensors file or a torch checkpoint read
  with ``weights_only=True`` (never unpickling code), unwrapped to the generator's own dict.
- ``detect_architecture(state)``: "dcgan", "progan" or "stylegan2" from the key names.
- ``load_generator(source, arch=None)``: a ready ``Generator`` in eval mode on the CPU.
- ``ARCHITECTURES``: architecture name → generator class.
"""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from typing import Mapping, Union

import torch
from safetensors.torch import load as load_safetensors_bytes

from rulewright.service.engine.generators.base import Generator, StateDictMismatch
from rulewright.service.engine.generators.dcgan import DCGANGenerator
from rulewright.service.engine.generators.progan import ProGANGenerator
from rulewright.service.engine.generators.stylegan2 import StyleGAN2Generator, normalize_checkpoint

ARCHITECTURES: dict[str, type[Generator]] = {
    "dcgan": DCGANGenerator,
    "progan": ProGANGenerator,
    "stylegan2": StyleGAN2Generator,
}

# Wrappers that training scripts put around a generator's state dict.
_WRAPPER_KEYS = ("netG_state_dict", "state_dict", "generator", "netG", "G")

Source = Union[str, os.PathLike, bytes, Mapping[str, torch.Tensor]]


class CheckpointError(ValueError):
    """A file that is neither safetensors nor a weights-only torch checkpoint (INVALID_ARGUMENT)."""


def _read_bytes(source: Union[str, os.PathLike, bytes]) -> bytes:
    if isinstance(source, bytes):
        return source
    with open(source, "rb") as f:
        return f.read()


def is_safetensors(data: bytes) -> bool:
    """Whether bytes begin like a safetensors file (a plausible header length, then JSON)."""
    # safetensors: 8-byte little-endian header length, then a JSON header starting with '{'.
    if len(data) < 9:
        return False
    n = int.from_bytes(data[:8], "little")
    return 0 < n <= len(data) - 8 and data[8:9] == b"{"


def read_state_dict(source: Source) -> dict[str, torch.Tensor]:
    """Tensors of a generator from safetensors bytes/path, a weights-only torch checkpoint or a dict."""
    if isinstance(source, Mapping):
        obj = dict(source)
    else:
        data = _read_bytes(source)
        if is_safetensors(data):
            return load_safetensors_bytes(data)
        if not zipfile.is_zipfile(io.BytesIO(data)) and not data[:2] == b"\x80\x02":
            raise CheckpointError("not a safetensors file nor a torch checkpoint")
        try:
            obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise CheckpointError(f"torch checkpoint refused by the weights-only loader: {first}") from exc
    return _unwrap(obj)


def _unwrap(obj: object) -> dict[str, torch.Tensor]:
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint holds a {type(obj).__name__}, not a dict of tensors")
    if "g_ema" in obj or any(isinstance(k, str) and k.startswith("g_ema.") for k in obj):
        return normalize_checkpoint(obj)
    for key in _WRAPPER_KEYS:
        if key in obj and isinstance(obj[key], Mapping):
            return _unwrap(obj[key])
    bad = [str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError("checkpoint entries are not tensors: " + ", ".join(sorted(bad)[:10]))
    return {str(k): v for k, v in obj.items()}


def detect_architecture(state: Mapping[str, torch.Tensor]) -> str:
    """Name the architecture whose public layout the keys follow."""
    keys = set(state)
    if "main.0.weight" in keys:
        return "dcgan"
    if "layer1.conv.weight" in keys:
        return "progan"
    if "input.input" in keys or "conv1.conv.weight" in keys or any(k.startswith("style.") for k in keys):
        return "stylegan2"
    sample = ", ".join(sorted(keys)[:5])
    raise StateDictMismatch(
        "any known architecture",
        reason="keys match no known layout (dcgan: main.N.*, progan: layerN.conv.*, "
        f"stylegan2: style.*, input.input, convs.N.*); first keys: {sample}",
    )


def load_generator(source: Source, arch: str | None = None, share: bool = False) -> Generator:
    """Build a generator from a checkpoint (path, bytes or dict); ``arch`` None means detect it.

    ``share=True`` (dict sources) makes the parameters the dict's own tensors, without copying.
    """
    state = read_state_dict(source)
    arch = arch or detect_architecture(state)
    if arch not in ARCHITECTURES:
        raise LookupError(f"unknown architecture {arch!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[arch].from_state_dict(state, share=share)
