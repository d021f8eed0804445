"""The Open Inference Protocol apart from its transport: what gRPC ``ModelInfer`` (``oip``) and the
KServe v2 REST endpoints (``web/oip``) share, so that both check a request alike, hand the domain
the same ``SampleRequest`` and describe a model the same way.

- Inputs: ``seed`` INT64 ``[N]``, ``z`` FP32 ``[N, z_dim]``, ``truncation`` FP32 or FP64 ``[1]``;
  exactly one of ``seed`` and ``z``. ``headers`` checks every input's name, datatype and shape
  (and the image count) before any data is read; ``from_bytes`` and ``from_values`` read one
  input's data (little-endian bytes, or numbers) in the shape it declared.
- ``infer``: checked inputs and request parameters → ``Domain.sample`` (dynamic batching
  included) → the images, ``(N, H, W, 3)`` uint8, the output ``image``. ``sample_options`` is
  where a request parameter becomes a ``SampleRequest`` field, once for both transports.
- ``model_metadata``, ``model_config``, ``server_metadata``: plain dicts each transport renders.
  ``truncation`` is declared only for architectures with the truncation trick (StyleGAN2); the
  others still take a truncation of 1 (no truncation) and refuse any other value.

This module imports no torch (``convert`` builds the latents) and nothing of the engine.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import math
from typing import Any, Callable, Mapping

import numpy as np

from rulewright.service.domain.limits import check_images
from rulewright.service.domain.requests import Progress, SampleRequest, SampleResult
from rulewright.service.errors import InvalidArgument
from rulewright.service.server import convert
from rulewright.service.server.errors import renamed
from rulewright.v1 import generator_service_pb2 as gen

SERVER_NAME = "rulewright"
OUTPUT = "image"
# name → datatypes accepted (the first is the one metadata declares)
INPUTS = {"seed": ("INT64",), "z": ("FP32",), "truncation": ("FP32", "FP64")}
# datatype → the little-endian numpy dtype of its bytes
NUMPY = {"INT64": "<i8", "FP32": "<f4", "FP64": "<f8"}


def package_version() -> str:
    """The installed rulewright distribution's version (``0.0.0`` when run from a bare checkout)."""
    try:
        return importlib.metadata.version("rulewright")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


@dataclasses.dataclass(frozen=True)
class Header:
    """One input as the request declared it: its place among the inputs, name, datatype and shape."""

    index: int
    name: str
    datatype: str
    shape: tuple[int, ...]

    @property
    def count(self) -> int:
        """How many values its shape holds."""
        return math.prod(self.shape)


def check_outputs(names: list[str]) -> None:
    """Requested outputs: only ``image`` exists."""
    for i, name in enumerate(names):
        if name != OUTPUT:
            raise InvalidArgument(f"outputs[{i}].name", f"unknown output {name!r}; outputs: {OUTPUT}")


def headers(limits, declared: list[tuple[str, str, list[int]]]) -> dict[str, Header]:
    """name → ``Header`` for the declared ``(name, datatype, shape)`` inputs, in order; the image
    count is checked first, before anything is read or built."""
    for i, (name, _, shape) in enumerate(declared):
        if name in ("seed", "z") and shape:
            check_images(limits, shape[0], f"inputs[{i}].shape")
    out: dict[str, Header] = {}
    for i, (name, datatype, shape) in enumerate(declared):
        field = f"inputs[{i}]"
        if name not in INPUTS:
            raise InvalidArgument(f"{field}.name", f"unknown input {name!r}; inputs: {', '.join(INPUTS)}")
        if name in out:
            raise InvalidArgument(f"{field}.name", f"input {name!r} is given twice")
        if datatype not in INPUTS[name]:
            raise InvalidArgument(f"{field}.datatype", f"input {name!r} must be {' or '.join(INPUTS[name])}, "
                                  f"got {datatype or 'none'!r}")
        if any(d < 0 for d in shape):
            raise InvalidArgument(f"{field}.shape", f"input {name!r} has a negative dimension: {list(shape)}")
        out[name] = Header(i, name, datatype, tuple(int(d) for d in shape))
    return out


def from_bytes(header: Header, raw: bytes, field: str) -> np.ndarray:
    """The input's little-endian bytes (``field`` names where they came) in its declared shape."""
    size = np.dtype(NUMPY[header.datatype]).itemsize
    if len(raw) != header.count * size:
        raise InvalidArgument(field, f"input {header.name!r} of shape {list(header.shape)} {header.datatype} "
                              f"needs {header.count * size} bytes, got {len(raw)}")
    return np.frombuffer(raw, dtype=NUMPY[header.datatype]).reshape(header.shape)


def from_values(header: Header, values, field: str) -> np.ndarray:
    """The input's values, flattened in row-major order (``field`` names where they came), in its shape."""
    array = np.asarray(values, dtype=NUMPY[header.datatype])
    if array.size != header.count:
        raise InvalidArgument(field, f"input {header.name!r} of shape {list(header.shape)} needs {header.count} "
                              f"values, got {array.size}")
    return array.reshape(header.shape)


def _seeds(i: int, values: np.ndarray) -> list[int]:
    if values.ndim != 1 or values.size < 1:
        raise InvalidArgument(f"inputs[{i}].shape", f"input 'seed' must have shape [N] with N >= 1, "
                              f"got {list(values.shape)}")
    bad = np.flatnonzero(values < 0)
    if bad.size:
        raise InvalidArgument(f"inputs[{i}]", f"input 'seed' element {int(bad[0])} must lie in [0, 2**63), "
                              f"got {int(values[bad[0]])}")
    return [int(s) for s in values]


def _latents(i: int, values: np.ndarray, z_dim: int):
    """(N, z_dim) latents through the converter Sample uses, so both hand the engine the same tensor."""
    if values.ndim != 2 or values.shape[0] < 1 or values.shape[1] != z_dim:
        raise InvalidArgument(f"inputs[{i}].shape", f"input 'z' must have shape [N, {z_dim}] with N >= 1, "
                              f"got {list(values.shape)}")
    rows = np.flatnonzero(~np.isfinite(values).all(axis=1))
    if rows.size:
        raise InvalidArgument(f"inputs[{i}]", f"input 'z' row {int(rows[0])} holds NaN or infinite values")
    return convert.latents_tensor(gen.Latents(count=values.shape[0], dim=z_dim, values=values.reshape(-1).tolist()))


def _truncation(i: int, values: np.ndarray) -> float:
    """The one truncation value (its range and the architecture's own limit are the domain's to check)."""
    if values.size != 1:
        raise InvalidArgument(f"inputs[{i}].shape", f"input 'truncation' must hold one value, got shape "
                              f"{list(values.shape)}")
    return float(values.reshape(-1)[0])


def sample_options(parameters: Mapping[str, Any]) -> dict[str, Any]:
    """``SampleRequest`` fields from the request's parameters (name → bool, int, float or str, as
    either transport decoded them). A parameter the service reads is added here, once for both
    transports; any other (tritonclient's ``binary_data_output``, ``priority``, tracing keys) is ignored.

    ``strength``: the version's own edit at that strength (Sample's ``strength``); its bounds are
    the domain's to check."""
    options: dict[str, Any] = {}
    if "strength" in parameters:
        value = parameters["strength"]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidArgument("parameters.strength", f"must be a number, got {value!r}")
        options["strength"] = float(value)
    return options


def response_parameters(result: SampleResult) -> dict[str, Any]:
    """The answer's parameters, as either transport sends them: the strength drawn (absent for an import)."""
    return {} if result.strength is None else {"strength": result.strength}


def infer(domain, inputs: dict[str, tuple[int, np.ndarray]], parameters: Mapping[str, Any],
          version: Callable[[], Any], stopped: Callable[[], bool]) -> SampleResult:
    """Images for the inputs (name → (index, array)), pixel for pixel what Sample draws for the
    same version, seeds or latents and truncation. ``version()`` resolves the request's model
    version, once its inputs are known to be whole; ``stopped()`` says the caller has gone."""
    if ("seed" in inputs) == ("z" in inputs):
        raise InvalidArgument("inputs", "give exactly one of the inputs 'seed' and 'z'")
    found = version()
    # the resolved number, not the request's alias: a move of the alias cannot change what is drawn
    ref = f"{found.model}/{found.number}"
    seeds = _seeds(*inputs["seed"]) if "seed" in inputs else None
    z = _latents(*inputs["z"], domain.list_layers(ref).z_dim) if "z" in inputs else None
    truncation = _truncation(*inputs["truncation"]) if "truncation" in inputs else 1.0
    count = f"inputs[{inputs['seed' if seeds else 'z'][0]}].shape"
    names = {"seeds": count, "latents.count": count, "strength": "parameters.strength"}
    if "truncation" in inputs:
        names["truncation"] = f"inputs[{inputs['truncation'][0]}]"
    request = SampleRequest(ref, seeds=seeds, latents=z, truncation=truncation, **sample_options(parameters))
    with renamed(names):
        return domain.sample(request, Progress(None, stopped))


def _version_numbers(domain, model: str) -> list[str]:
    """Every live version of ``model``, oldest first, as strings."""
    numbers, token = [], ""
    while True:
        page = domain.list_versions(model, page_token=token)
        numbers += [str(summary.version.number) for summary in page.items]
        if not (token := page.next_page_token):
            return numbers


def _tensors(layers) -> tuple[list[tuple[str, str, list[int]]], list[tuple[str, str, list[int]]]]:
    """(inputs, outputs) of a version as (name, datatype, shape): truncation only where it applies."""
    side = layers.resolution
    inputs = [("seed", "INT64", [-1]), ("z", "FP32", [-1, layers.z_dim])]
    if layers.truncation:
        inputs.append(("truncation", "FP32", [1]))
    return inputs, [(OUTPUT, "UINT8", [-1, side, side, 3])]


def model_metadata(domain, version) -> dict:
    """The OIP model metadata of ``version``: its model's live versions, platform and tensors."""
    layers = domain.list_layers(f"{version.model}/{version.number}")
    inputs, outputs = _tensors(layers)
    return {"name": version.model, "versions": _version_numbers(domain, version.model),
            "platform": f"rulewright_{layers.arch}",
            "inputs": [{"name": n, "datatype": d, "shape": s} for n, d, s in inputs],
            "outputs": [{"name": n, "datatype": d, "shape": s} for n, d, s in outputs]}


def model_config(domain, version) -> dict:
    """``version`` as a Triton model configuration (the JSON ``tritonclient`` and Triton's tools read).

    ``max_batch_size`` is 0 and every shape is whole (``-1``: any N) because ``truncation`` is one
    value per request, not per image; batching is the server's own (``max_images`` per request).
    """
    layers = domain.list_layers(f"{version.model}/{version.number}")
    inputs, outputs = _tensors(layers)
    return {"name": version.model, "platform": f"rulewright_{layers.arch}", "backend": "",
            "version_policy": {"all": {}}, "max_batch_size": 0,
            "input": [{"name": n, "data_type": f"TYPE_{d}", "format": "FORMAT_NONE", "dims": s, "optional": True}
                      for n, d, s in inputs],
            "output": [{"name": n, "data_type": f"TYPE_{d}", "dims": s} for n, d, s in outputs],
            "parameters": {"version": {"string_value": str(version.number)},
                           "max_images": {"string_value": str(domain.limits.max_images)}}}


def server_metadata(extensions: list[str]) -> dict:
    """Server name, package version and the protocol extensions its transport speaks."""
    return {"name": SERVER_NAME, "version": package_version(), "extensions": list(extensions)}
