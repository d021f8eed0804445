"""The Open Inference Protocol v2 (``inference.GRPCInferenceService``, as Triton and KServe speak it)
over the domain layer, served on the same port as GeneratorService and RegistryService.

- Models: each registry model is an OIP model of the same name; ``model_version`` picks the
  version: ``""`` → what the bare model name means everywhere, the server's default alias
  (``production`` unless ``default_alias`` says otherwise; NOT_FOUND if the model lacks it);
  ``"3"`` → version 3; any other string → the alias of that name (``"staging"``).
- ``ServerLive``: always true (the process answers). ``ServerReady``: the server's overall
  ``grpc.health.v1`` status is SERVING. ``ModelReady``: the version resolves (and is loaded);
  a model, version or alias that does not exist is ``ready: false``, not an error.
- ``ServerMetadata``: ``rulewright``, the package version, no extensions.
- ``ModelMetadata``: every live version number; platform ``rulewright_<arch>``; inputs ``seed``
  INT64 ``[-1]``, ``z`` FP32 ``[-1, z_dim]``, ``truncation`` FP32 ``[1]``; output ``image``
  UINT8 ``[-1, H, W, 3]``.
- ``ModelInfer``: exactly one of ``seed`` and ``z``, optional ``truncation`` (FP32, or FP64 so a
  client can send the exact double that ``SampleRequest.truncation`` carries); tensors in
  ``contents`` or in ``raw_input_contents`` (little-endian, one entry per input, what
  tritonclient sends); the ``image`` output always in ``raw_output_contents``. The pixels are
  ``Sample``'s for the same version, seeds or latents and truncation: both go through
  ``Domain.sample`` (dynamic batching included) and the same latent conversion. Request,
  input and output ``parameters`` are tolerated and ignored.

Errors go through ``errors.rpc``: a model that does not exist is NOT_FOUND; a malformed tensor
is INVALID_ARGUMENT whose field names the request's path (``inputs[0].datatype``) and whose
message names the input. This module imports no torch (``convert`` builds the latents).
"""

from __future__ import annotations

import importlib.metadata
import math
import re
from typing import Callable

import numpy as np

from rulewright.inference import grpc_predict_v2_pb2 as oip, grpc_predict_v2_pb2_grpc as oip_grpc
from rulewright.registry.errors import NotFound
from rulewright.service.errors import InvalidArgument
from rulewright.service.domain.requests import Progress
from rulewright.service.domain.requests import SampleRequest
from rulewright.v1 import generator_service_pb2 as gen

from rulewright.service.server import convert
from rulewright.service.server.errors import renamed, rpc
from rulewright.service.domain.limits import check_images

SERVICE_NAME = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
SERVER_NAME = "rulewright"
OUTPUT = "image"
# name → datatypes accepted (the first is the one ModelMetadata declares)
INPUTS = {"seed": ("INT64",), "z": ("FP32",), "truncation": ("FP32", "FP64")}
# datatype → (little-endian numpy dtype of raw_input_contents, InferTensorContents field)
DTYPES = {"INT64": ("<i8", "int64_contents"), "FP32": ("<f4", "fp32_contents"), "FP64": ("<f8", "fp64_contents")}
_ALIAS = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
# registry fields → the request's (ModelInfer spells them model_name/model_version, the others name/version)
INFER_FIELDS = {"model": "model_name", "version": "model_version", "alias": "model_version"}
MODEL_FIELDS = {"model": "name", "version": "version", "alias": "version"}


def package_version() -> str:
    """The installed rulewright distribution's version (``0.0.0`` when run from a bare checkout)."""
    try:
        return importlib.metadata.version("rulewright")
    except importlib.metadata.PackageNotFoundError:
        return "0.0.0"


def reference(model: str, version: str, field: str = "model_version") -> str:
    """The registry reference for an OIP model and a non-empty version: ``m/3`` or ``m@alias``."""
    if version.isascii() and version.isdigit():
        return f"{model}/{int(version)}"
    if _ALIAS.match(version):
        return f"{model}@{version}"
    raise InvalidArgument(field, f"must be a version number or an alias name, got {version!r}")


def resolve(domain, model: str, version: str, field: str = "model_version"):
    """The ``Version`` an OIP (model, version) names; "" → as the bare model name (the default alias)."""
    return domain.resolve(reference(model, version, field) if version else model)


def _tensor(request: oip.ModelInferRequest, i: int) -> np.ndarray:
    """Input ``i`` as a numpy array of its declared shape, from ``contents`` or ``raw_input_contents``."""
    t = request.inputs[i]
    field = f"inputs[{i}]"
    if t.datatype not in INPUTS[t.name]:
        raise InvalidArgument(f"{field}.datatype", f"input {t.name!r} must be {' or '.join(INPUTS[t.name])}, "
                              f"got {t.datatype or 'none'!r}")
    if any(d < 0 for d in t.shape):
        raise InvalidArgument(f"{field}.shape", f"input {t.name!r} has a negative dimension: {list(t.shape)}")
    count = math.prod(t.shape)
    dtype, contents_field = DTYPES[t.datatype]
    if request.raw_input_contents:
        raw = request.raw_input_contents[i]
        size = np.dtype(dtype).itemsize
        if len(raw) != count * size:
            raise InvalidArgument(f"raw_input_contents[{i}]", f"input {t.name!r} of shape {list(t.shape)} "
                                  f"{t.datatype} needs {count * size} bytes, got {len(raw)}")
        values = np.frombuffer(raw, dtype=dtype)
    else:
        values = np.asarray(getattr(t.contents, contents_field), dtype=dtype)
        if values.size != count:
            raise InvalidArgument(f"{field}.contents.{contents_field}", f"input {t.name!r} of shape "
                                  f"{list(t.shape)} needs {count} values, got {values.size}")
    return values.reshape(tuple(t.shape))


def _inputs(request: oip.ModelInferRequest) -> dict[str, tuple[int, np.ndarray]]:
    """name → (index, array) for every input, the request's framing checked."""
    if request.raw_input_contents:
        if len(request.raw_input_contents) != len(request.inputs):
            raise InvalidArgument("raw_input_contents", f"holds {len(request.raw_input_contents)} entries for "
                                  f"{len(request.inputs)} inputs (one per input, in order)")
        for i, t in enumerate(request.inputs):
            if t.HasField("contents"):     # OIP: raw contents are all or nothing
                raise InvalidArgument(f"inputs[{i}].contents", f"input {t.name!r} has contents although the "
                                      "request uses raw_input_contents")
    out: dict[str, tuple[int, np.ndarray]] = {}
    for i, t in enumerate(request.inputs):
        if t.name not in INPUTS:
            raise InvalidArgument(f"inputs[{i}].name", f"unknown input {t.name!r}; inputs: {', '.join(INPUTS)}")
        if t.name in out:
            raise InvalidArgument(f"inputs[{i}].name", f"input {t.name!r} is given twice")
        out[t.name] = (i, _tensor(request, i))
    return out


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


def _tensor_metadata(name: str, datatype: str, shape) -> oip.ModelMetadataResponse.TensorMetadata:
    return oip.ModelMetadataResponse.TensorMetadata(name=name, datatype=datatype, shape=list(shape))


class InferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    """GRPCInferenceService over a ``Domain``; ``ready()`` says whether the server is ready."""

    def __init__(self, domain, ready: Callable[[], bool] = lambda: True):
        self.domain = domain
        self.ready = ready
        self.version = package_version()

    @rpc()
    def ServerLive(self, request, context):
        """Always live: answering at all is the proof."""
        return oip.ServerLiveResponse(live=True)

    @rpc()
    def ServerReady(self, request, context):
        """Ready when the server's overall grpc.health.v1 status is SERVING."""
        return oip.ServerReadyResponse(ready=bool(self.ready()))

    @rpc(fields=MODEL_FIELDS)
    def ModelReady(self, request, context):
        """Whether the named version resolves; it is loaded before answering true."""
        try:
            version = resolve(self.domain, request.name, request.version, "version")
        except NotFound:
            return oip.ModelReadyResponse(ready=False)
        self.domain.generator(version)        # ready means loaded: the first infer pays no load
        return oip.ModelReadyResponse(ready=True)

    @rpc()
    def ServerMetadata(self, request, context):
        """Server name, package version, no extensions."""
        return oip.ServerMetadataResponse(name=SERVER_NAME, version=self.version, extensions=[])

    @rpc(fields=MODEL_FIELDS)
    def ModelMetadata(self, request, context):
        """Live versions, platform, and the input and output tensors of the named version."""
        version = resolve(self.domain, request.name, request.version, "version")
        shape = self.domain.list_layers(f"{version.model}/{version.number}")
        numbers, token = [], ""
        while True:
            page = self.domain.list_versions(version.model, page_token=token)
            numbers += [str(summary.version.number) for summary in page.items]
            if not (token := page.next_page_token):
                break
        side = shape.resolution
        return oip.ModelMetadataResponse(
            name=version.model, versions=numbers, platform=f"rulewright_{shape.arch}",
            inputs=[_tensor_metadata("seed", "INT64", [-1]), _tensor_metadata("z", "FP32", [-1, shape.z_dim]),
                    _tensor_metadata("truncation", "FP32", [1])],
            outputs=[_tensor_metadata(OUTPUT, "UINT8", [-1, side, side, 3])])

    @rpc(fields=INFER_FIELDS)
    def ModelInfer(self, request, context):
        """Images for seeds or latents, pixel for pixel what Sample draws for the same version."""
        for i, out in enumerate(request.outputs):
            if out.name != OUTPUT:
                raise InvalidArgument(f"outputs[{i}].name", f"unknown output {out.name!r}; outputs: {OUTPUT}")
        for i, t in enumerate(request.inputs):          # before any tensor is built
            if t.name in ("seed", "z") and t.shape:
                check_images(self.domain.limits, t.shape[0], f"inputs[{i}].shape")
        inputs = _inputs(request)
        if ("seed" in inputs) == ("z" in inputs):
            raise InvalidArgument("inputs", "give exactly one of the inputs 'seed' and 'z'")
        version = resolve(self.domain, request.model_name, request.model_version)
        # the resolved number, not the request's alias: a move of the alias cannot change what is drawn
        ref = f"{version.model}/{version.number}"
        seeds = _seeds(*inputs["seed"]) if "seed" in inputs else None
        z = _latents(*inputs["z"], self.domain.list_layers(ref).z_dim) if "z" in inputs else None
        truncation = _truncation(*inputs["truncation"]) if "truncation" in inputs else 1.0
        count = f"inputs[{inputs['seed' if seeds else 'z'][0]}].shape"
        names = {"seeds": count, "latents.count": count}
        if "truncation" in inputs:
            names["truncation"] = f"inputs[{inputs['truncation'][0]}]"
        with renamed(names):
            result = self.domain.sample(SampleRequest(ref, seeds=seeds, latents=z, truncation=truncation),
                                        Progress(None, lambda: not context.is_active()))
        version, pixels = result.version, result.images.cpu().numpy()
        return oip.ModelInferResponse(
            model_name=version.model, model_version=str(version.number), id=request.id,
            outputs=[oip.ModelInferResponse.InferOutputTensor(name=OUTPUT, datatype="UINT8", shape=pixels.shape)],
            raw_output_contents=[pixels.tobytes()])
