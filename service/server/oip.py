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
  INT64 ``[-1]``, ``z`` FP32 ``[-1, z_dim]`` and, where the architecture has the truncation
  trick, ``truncation`` FP32 ``[1]``; output ``image`` UINT8 ``[-1, H, W, 3]``.
- ``ModelInfer``: exactly one of ``seed`` and ``z``, optional ``truncation`` (FP32, or FP64 so a
  client can send the exact double that ``SampleRequest.truncation`` carries); tensors in
  ``contents`` or in ``raw_input_contents`` (little-endian, one entry per input, what
  tritonclient sends); the ``image`` output always in ``raw_output_contents``. The pixels are
  ``Sample``'s for the same version, seeds or latents and truncation: both go through
  ``Domain.sample`` (dynamic batching included) and the same latent conversion. Request
  ``parameters`` go to ``oip_model.sample_options`` (``strength``, a number: Sample's ``strength``, the version's own edit at that strength, echoed in the
  response's parameters; unknown ones ignored); input and output
  ``parameters`` are tolerated and ignored.

The checks, the sampling call and the metadata are ``oip_model``'s, shared with the KServe v2
REST endpoints of the HTTP side (``web/oip``); this module decodes and encodes the gRPC messages.
The model configuration (Triton's ``ModelConfig`` RPC) is not served here: it is no part of the
protocol's gRPC service; the HTTP side serves it at ``/v2/models/{name}/config``.

Errors go through ``errors.rpc``: a model that does not exist is NOT_FOUND; a malformed tensor
is INVALID_ARGUMENT whose field names the request's path (``inputs[0].datatype``) and whose
message names the input. This module imports no torch.
"""

from __future__ import annotations

import re
from typing import Callable

import numpy as np

from rulewright.inference import grpc_predict_v2_pb2 as oip, grpc_predict_v2_pb2_grpc as oip_grpc
from rulewright.registry.errors import NotFound
from rulewright.service.errors import InvalidArgument

from rulewright.service.server import oip_model
from rulewright.service.server.errors import rpc

SERVICE_NAME = oip.DESCRIPTOR.services_by_name["GRPCInferenceService"].full_name
OUTPUT = oip_model.OUTPUT
# datatype → the InferTensorContents field that carries it
CONTENTS = {"INT64": "int64_contents", "FP32": "fp32_contents", "FP64": "fp64_contents"}
_ALIAS = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")
# registry fields → the request's (ModelInfer spells them model_name/model_version, the others name/version)
INFER_FIELDS = {"model": "model_name", "version": "model_version", "alias": "model_version"}
MODEL_FIELDS = {"model": "name", "version": "version", "alias": "version"}


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


def model_ready(domain, model: str, version: str) -> bool:
    """Whether an OIP (model, version) resolves; it is loaded before answering true."""
    try:
        found = resolve(domain, model, version, "version")
    except NotFound:
        return False
    domain.generator(found)        # ready means loaded: the first infer pays no load
    return True


def _tensor(request: oip.ModelInferRequest, header: oip_model.Header) -> np.ndarray:
    """An input's data from ``contents`` or ``raw_input_contents``, in its declared shape."""
    i = header.index
    if request.raw_input_contents:
        return oip_model.from_bytes(header, request.raw_input_contents[i], f"raw_input_contents[{i}]")
    contents_field = CONTENTS[header.datatype]
    return oip_model.from_values(header, getattr(request.inputs[i].contents, contents_field),
                                 f"inputs[{i}].contents.{contents_field}")


def _inputs(request: oip.ModelInferRequest, limits) -> dict[str, tuple[int, np.ndarray]]:
    """name → (index, array) for every input, the request's framing checked."""
    if request.raw_input_contents:
        if len(request.raw_input_contents) != len(request.inputs):
            raise InvalidArgument("raw_input_contents", f"holds {len(request.raw_input_contents)} entries for "
                                  f"{len(request.inputs)} inputs (one per input, in order)")
        for i, t in enumerate(request.inputs):
            if t.HasField("contents"):     # OIP: raw contents are all or nothing
                raise InvalidArgument(f"inputs[{i}].contents", f"input {t.name!r} has contents although the "
                                      "request uses raw_input_contents")
    headers = oip_model.headers(limits, [(t.name, t.datatype, list(t.shape)) for t in request.inputs])
    return {name: (h.index, _tensor(request, h)) for name, h in headers.items()}


def parameters(params) -> dict:
    """A ``map<string, InferParameter>`` as name → its value (bool, int, float or str)."""
    return {name: getattr(p, p.WhichOneof("parameter_choice")) for name, p in params.items()
            if p.WhichOneof("parameter_choice")}


def _tensor_metadata(tensor: dict) -> oip.ModelMetadataResponse.TensorMetadata:
    return oip.ModelMetadataResponse.TensorMetadata(name=tensor["name"], datatype=tensor["datatype"],
                                                    shape=tensor["shape"])


class InferenceServicer(oip_grpc.GRPCInferenceServiceServicer):
    """GRPCInferenceService over a ``Domain``; ``ready()`` says whether the server is ready."""

    def __init__(self, domain, ready: Callable[[], bool] = lambda: True):
        self.domain = domain
        self.ready = ready

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
        return oip.ModelReadyResponse(ready=model_ready(self.domain, request.name, request.version))

    @rpc()
    def ServerMetadata(self, request, context):
        """Server name, package version, no extensions."""
        return oip.ServerMetadataResponse(**oip_model.server_metadata([]))

    @rpc(fields=MODEL_FIELDS)
    def ModelMetadata(self, request, context):
        """Live versions, platform, and the input and output tensors of the named version."""
        meta = oip_model.model_metadata(self.domain, resolve(self.domain, request.name, request.version, "version"))
        return oip.ModelMetadataResponse(
            name=meta["name"], versions=meta["versions"], platform=meta["platform"],
            inputs=[_tensor_metadata(t) for t in meta["inputs"]], outputs=[_tensor_metadata(t) for t in meta["outputs"]])

    @rpc(fields=INFER_FIELDS)
    def ModelInfer(self, request, context):
        """Images for seeds or latents, pixel for pixel what Sample draws for the same version."""
        oip_model.check_outputs([out.name for out in request.outputs])
        result = oip_model.infer(
            self.domain, _inputs(request, self.domain.limits), parameters(request.parameters),
            lambda: resolve(self.domain, request.model_name, request.model_version), lambda: not context.is_active())
        version, pixels = result.version, result.images.cpu().numpy()
        return oip.ModelInferResponse(
            model_name=version.model, model_version=str(version.number), id=request.id,
            outputs=[oip.ModelInferResponse.InferOutputTensor(name=OUTPUT, datatype="UINT8", shape=pixels.shape)],
            raw_output_contents=[pixels.tobytes()],
            parameters={k: oip.InferParameter(double_param=v) for k, v in oip_model.response_parameters(result).items()})
