"""The Open Inference Protocol over HTTP/REST (KServe v2, as Triton serves it): the same models,
request checks, sampling call and pixels as gRPC ``GRPCInferenceService`` (both go through
``oip_model``), in JSON, plus Triton's binary tensor extension and model configuration.

- ``GET /v2/health/live`` and ``/v2/health/ready``: 200 when live / ready, else 400; empty bodies.
- ``GET /v2``: server metadata. ``GET /v2/models/{name}[/versions/{v}]``: model metadata;
  ``.../ready``: 200 once the version is loaded, 400 when it does not resolve; ``.../config``:
  the Triton model configuration. An empty version means what gRPC's ``model_version: ""`` means.
- ``POST /v2/models/{name}[/versions/{v}]/infer``: ``{"id", "parameters", "inputs": [{"name",
  "datatype", "shape", "data"}], "outputs": [{"name", "parameters"}]}`` with ``data`` flat in
  row-major order or nested. With ``Inference-Header-Content-Length: n`` the first ``n`` bytes
  are that JSON and the rest the inputs that give ``parameters.binary_data_size`` (little-endian,
  in input order). The image comes as ``data`` (JSON numbers) unless the output's
  ``parameters.binary_data`` or the request's ``parameters.binary_data_output`` is true (what
  tritonclient.http asks for by default): then the answer is the JSON, whose length its
  ``Inference-Header-Content-Length`` header gives, followed by the raw ``(N, H, W, 3)`` bytes.

Errors are KServe's ``{"error": "<message>"}`` with the status every HTTP endpoint maps to (400
for a bad request, naming the field as ``inputs[0].datatype`` and the input; 404 for a model or
version that does not exist). The body's Content-Type is not read (tritonclient sends none); a
compressed body (``Content-Encoding``) is refused with 415.
"""

from __future__ import annotations

import json
from typing import Any

from starlette.responses import Response

from rulewright.service.errors import Code, InvalidArgument
from rulewright.service.server import oip_model
from rulewright.service.server.oip import model_ready, resolve
from rulewright.service.server.web.context import Call
from rulewright.service.server.web.errors import Refused
from rulewright.service.server.web.schemas import parse_body

EXTENSIONS = ["binary_tensor_data", "model_configuration"]
HEADER_LENGTH = "Inference-Header-Content-Length"
_NO_STORE = {"Cache-Control": "no-store"}


def _flag(call: Call, ok: bool) -> Response:
    """A health answer: 200 for true, 400 for false, no body (the protocol's boolean over HTTP)."""
    return call.send(200 if ok else 400, "text/plain", b"", _NO_STORE)


def v2_live(call: Call) -> Response:
    """``GET /v2/health/live``: 200 while the process answers."""
    return _flag(call, True)


def v2_ready(call: Call) -> Response:
    """``GET /v2/health/ready``: 200 when the server is serving (gRPC's health), else 400."""
    try:
        serving = bool(call.web.serving())
    except Exception:  # noqa: BLE001 -- a failing check reads as not ready
        serving = False
    return _flag(call, serving)


def v2_server_metadata(call: Call) -> Response:
    """``GET /v2``: name, version and the extensions this transport speaks."""
    return call.json(200, oip_model.server_metadata(EXTENSIONS))


def v2_model_metadata(call: Call, model: str, version: str = "") -> Response:
    """``GET /v2/models/{name}[/versions/{v}]``: live versions, platform, inputs and outputs."""
    return call.json(200, oip_model.model_metadata(call.domain, resolve(call.domain, model, version, "version")))


def v2_model_ready(call: Call, model: str, version: str = "") -> Response:
    """``GET .../ready``: 200 once the named version is loaded; 400 when it does not resolve."""
    return _flag(call, model_ready(call.domain, model, version))


def v2_model_config(call: Call, model: str, version: str = "") -> Response:
    """``GET .../config``: the version as a Triton model configuration."""
    return call.json(200, oip_model.model_config(call.domain, resolve(call.domain, model, version, "version")))


def v2_infer(call: Call, model: str, version: str = "") -> Response:
    """``POST .../infer``: images for seeds or latents, pixel for pixel what gRPC ModelInfer and Sample draw."""
    body, binary = _split(call)
    tensors = _list(body, "inputs")
    outputs = _list(body, "outputs", required=False)
    oip_model.check_outputs([_string(o, f"outputs[{i}]", "name") for i, o in enumerate(outputs)])
    declared = [(_string(t, f"inputs[{i}]", "name"), _string(t, f"inputs[{i}]", "datatype"), _shape(t, i))
                for i, t in enumerate(tensors)]
    headers = oip_model.headers(call.domain.limits, declared)
    parameters = _object(body, "parameters")
    result = oip_model.infer(call.domain, _arrays(tensors, headers, binary), parameters,
                             lambda: resolve(call.domain, model, version, "version"), lambda: False)
    pixels = result.images.cpu().numpy()
    out: dict[str, Any] = {"name": oip_model.OUTPUT, "datatype": "UINT8", "shape": list(pixels.shape)}
    answer: dict[str, Any] = {"model_name": result.version.model, "model_version": str(result.version.number),
                              "outputs": [out]}
    if "id" in body:
        answer["id"] = _string(body, "", "id")
    if parameters_out := oip_model.response_parameters(result):
        answer["parameters"] = parameters_out
    if not _binary_output(outputs, parameters):
        out["data"] = pixels.reshape(-1).tolist()
        return call.send(200, "application/json", json.dumps(answer, separators=(",", ":")).encode(), _NO_STORE)
    data = pixels.tobytes()
    out["parameters"] = {"binary_data_size": len(data)}
    head = json.dumps(answer, separators=(",", ":")).encode()
    return call.send(200, "application/octet-stream", head + data, {**_NO_STORE, HEADER_LENGTH: str(len(head))})


# ---- the request body ------------------------------------------------------------------------

def _split(call: Call) -> tuple[dict, bytes]:
    """(the JSON object, the binary tensor data after it) of an infer request."""
    encoding = (call.headers.get("Content-Encoding") or "identity").strip().lower()
    if encoding != "identity":
        raise Refused(Code.INVALID_ARGUMENT, "UNSUPPORTED_ENCODING", f"Content-Encoding {encoding!r} is not "
                      "accepted: send the request body uncompressed", http_status=415)
    data = call.data()
    length = call.headers.get(HEADER_LENGTH)
    if length is None:
        return parse_body(data), b""
    if not length.isascii() or not length.isdigit() or int(length) > len(data):
        raise InvalidArgument(HEADER_LENGTH, f"must be the JSON's byte count, at most the body's {len(data)}, "
                              f"got {length!r}")
    return parse_body(data[:int(length)]), data[int(length):]


def _list(obj: dict, key: str, required: bool = True) -> list:
    """``obj[key]`` as a list of objects (absent: ``[]`` unless required)."""
    value = obj.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise InvalidArgument(key, "required: a list of tensor objects" if value is None
                              else "must be a list of tensor objects")
    return value


def _object(obj: dict, key: str, field: str = "") -> dict:
    """``obj[key]`` as an object (absent: ``{}``); ``field`` is where ``obj`` lies."""
    value = obj.get(key, {})
    if not isinstance(value, dict):
        raise InvalidArgument(f"{field}.{key}" if field else key, "must be an object")
    return value


def _string(obj: dict, field: str, key: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str):
        raise InvalidArgument(f"{field}.{key}" if field else key, "required: a string" if value is None
                              else f"must be a string, got {json.dumps(value)[:40]}")
    return value


def _shape(tensor: dict, i: int) -> list[int]:
    shape = tensor.get("shape")
    if not isinstance(shape, list) or not all(type(d) is int for d in shape):
        raise InvalidArgument(f"inputs[{i}].shape", f"input {tensor.get('name')!r} needs a shape: a list of integers")
    return shape


def _arrays(tensors: list[dict], headers: dict[str, oip_model.Header], binary: bytes) -> dict:
    """name → (index, array) of every input, from its ``data`` or its share of the binary data."""
    out, offset = {}, 0
    for name, header in headers.items():        # in request order: binary data follows it
        i, tensor = header.index, tensors[header.index]
        size = _object(tensor, "parameters", f"inputs[{i}]").get("binary_data_size")
        if size is not None:
            field = f"inputs[{i}].parameters.binary_data_size"
            if "data" in tensor:
                raise InvalidArgument(f"inputs[{i}].data", f"input {name!r} gives both data and binary_data_size")
            if type(size) is not int or not 0 <= size <= len(binary) - offset:
                raise InvalidArgument(field, f"input {name!r} must give a byte count within the "
                                      f"{len(binary) - offset} bytes of binary data left, got {size!r}")
            out[name] = (i, oip_model.from_bytes(header, binary[offset:offset + size], field))
            offset += size
        elif "data" in tensor:
            field = f"inputs[{i}].data"
            out[name] = (i, oip_model.from_values(header, _numbers(tensor["data"], header, field), field))
        else:
            raise InvalidArgument(f"inputs[{i}].data", f"input {name!r} has no data (give data, or "
                                  "parameters.binary_data_size with the binary tensor extension)")
    if offset != len(binary):
        raise InvalidArgument(HEADER_LENGTH, f"{len(binary) - offset} bytes of binary data belong to no input")
    return out


def _numbers(data: Any, header: oip_model.Header, field: str) -> list:
    """``data`` (flat or nested lists) flattened, each element checked against the input's datatype."""
    if not isinstance(data, list):
        raise InvalidArgument(field, f"input {header.name!r} needs its data as a list of numbers")
    flat: list = []
    stack = [iter(data)]
    while stack:                             # bounded by the body: every step consumes an element
        for value in stack[-1]:
            if isinstance(value, list):
                stack.append(iter(value))
                break
            flat.append(value)
        else:
            stack.pop()
    integral = header.datatype == "INT64"
    for k, value in enumerate(flat):
        if type(value) is int and (integral and -2**63 <= value < 2**63 or not integral and abs(value) < 2**1000):
            continue
        if type(value) is float and not integral:
            continue
        raise InvalidArgument(field, f"input {header.name!r} element {k} must be "
                              f"{'an INT64 integer' if integral else 'a number'}, got {json.dumps(value)[:40]}")
    return flat


def _binary_output(outputs: list[dict], parameters: dict) -> bool:
    """Whether the image goes as binary data: its output's ``binary_data``, else the request's ``binary_data_output``."""
    for i, out in enumerate(outputs):
        wanted = _object(out, "parameters", f"outputs[{i}]").get("binary_data")
        if wanted is not None:
            return wanted is True
    return parameters.get("binary_data_output") is True
