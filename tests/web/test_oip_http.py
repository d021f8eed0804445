"""The Open Inference Protocol over HTTP/REST (KServe v2) on the HTTP port, driven by the real
``tritonclient.http`` and by raw JSON requests as curl sends them: health, server and model
metadata, the model configuration, infer pixel for pixel what gRPC Sample and ModelInfer draw
(JSON and binary tensors), ``truncation`` declared only where the architecture takes it, and
errors as ``{"error": "..."}`` with their HTTP status."""

from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import grpc
import numpy as np
import pytest
from google.protobuf import json_format

from rulewright.inference import grpc_predict_v2_pb2 as oip, grpc_predict_v2_pb2_grpc as oip_grpc
from rulewright.service.server.app import create_server
from rulewright.service.server.auth import parse_tokens
from rulewright.service.server.web import WebServer
from rulewright.v1 import generator_service_pb2 as gen, generator_service_pb2_grpc as gen_grpc, images_pb2
from tests.builders import tiny_domain
from tests.support import missing

from .conftest import request

SEEDS = [0, 7, 2**40]


@pytest.fixture(scope="module")
def http():
    """``tritonclient.http`` (a test extra)."""
    if importlib.util.find_spec("tritonclient") is None or importlib.util.find_spec("geventhttpclient") is None:
        missing("tritonclient[http] (a test extra)")
    import tritonclient.http

    return tritonclient.http


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """One domain with ``tiny`` (a DCGAN: no truncation trick) and ``sg`` (a small random StyleGAN2),
    served over gRPC and over HTTP."""
    from safetensors.torch import save_file

    from tests.test_stylegan2 import random_state_dict

    tmp = tmp_path_factory.mktemp("oip-http")
    domain = tiny_domain(tmp)
    save_file({k: v.contiguous() for k, v in random_state_dict().items()}, str(tmp / "sg.safetensors"))
    domain.bootstrap("sg", tmp / "sg.safetensors")
    grpc_server, port = create_server(domain)
    web = WebServer(domain, "127.0.0.1:0").start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        yield SimpleNamespace(url=web.url, domain=domain, generator=gen_grpc.GeneratorServiceStub(channel),
                              inference=oip_grpc.GRPCInferenceServiceStub(channel))
    web.stop()
    grpc_server.stop(0).wait()
    domain.close()


@pytest.fixture(scope="module")
def client(http, servers):
    with http.InferenceServerClient(servers.url.removeprefix("http://")) as c:
        yield c


def sampled(servers, model: str = "tiny", seeds=SEEDS, z: np.ndarray | None = None, truncation=None) -> np.ndarray:
    """gRPC Sample's raw RGB8 pixels, (N, H, W, 3)."""
    req = gen.SampleRequest(model=model, image_format=images_pb2.IMAGE_FORMAT_RAW_RGB8, truncation=truncation)
    if z is not None:
        req.latents.CopyFrom(gen.Latents(count=z.shape[0], dim=z.shape[1], values=z.reshape(-1).tolist()))
    else:
        req.seeds.extend(seeds)
    images = servers.generator.Sample(req, timeout=60).images
    return np.stack([np.frombuffer(i.data, np.uint8).reshape(i.height, i.width, 3) for i in images])


def tensor(http, name: str, value: np.ndarray, datatype: str, binary: bool = True):
    t = http.InferInput(name, list(value.shape), datatype)
    t.set_data_from_numpy(value, binary_data=binary)
    return t


def seeds_input(http, seeds=SEEDS, binary: bool = True):
    return tensor(http, "seed", np.asarray(seeds, np.int64), "INT64", binary)


# ---- tritonclient.http ---------------------------------------------------------------------------


def test_health_metadata_and_config(client, servers):
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("tiny") and client.is_model_ready("tiny", "1")
    assert client.is_model_ready("tiny", "production")
    assert not client.is_model_ready("nope") and not client.is_model_ready("tiny", "9")
    meta = client.get_server_metadata()
    assert meta == {"name": "rulewright", "version": "0.1.0",
                    "extensions": ["binary_tensor_data", "model_configuration"]}
    tiny, sg = client.get_model_metadata("tiny"), client.get_model_metadata("sg", "1")
    assert (tiny["name"], tiny["versions"], tiny["platform"]) == ("tiny", ["1"], "rulewright_dcgan")
    assert tiny["inputs"] == [{"name": "seed", "datatype": "INT64", "shape": [-1]},
                              {"name": "z", "datatype": "FP32", "shape": [-1, 16]}]      # no truncation trick
    assert tiny["outputs"] == [{"name": "image", "datatype": "UINT8", "shape": [-1, 32, 32, 3]}]
    assert sg["platform"] == "rulewright_stylegan2"
    assert [t["name"] for t in sg["inputs"]] == ["seed", "z", "truncation"]
    assert sg["inputs"][2] == {"name": "truncation", "datatype": "FP32", "shape": [1]}
    for name, version in (("tiny", ""), ("sg", "1")):        # one description, both transports
        by_grpc = servers.inference.ModelMetadata(oip.ModelMetadataRequest(name=name, version=version), timeout=30)
        as_json = json_format.MessageToDict(by_grpc, preserving_proto_field_name=True)
        for t in as_json["inputs"] + as_json["outputs"]:
            t["shape"] = [int(d) for d in t["shape"]]         # int64 travels as a string in proto JSON
        assert as_json == client.get_model_metadata(name, version)
    config = client.get_model_config("tiny")
    assert config == client.get_model_config("tiny", "1")
    assert (config["name"], config["platform"], config["max_batch_size"]) == ("tiny", "rulewright_dcgan", 0)
    assert [(i["name"], i["data_type"], i["dims"], i["optional"]) for i in config["input"]] == [
        ("seed", "TYPE_INT64", [-1], True), ("z", "TYPE_FP32", [-1, 16], True)]
    assert config["output"] == [{"name": "image", "data_type": "TYPE_UINT8", "dims": [-1, 32, 32, 3]}]
    assert config["parameters"]["version"] == {"string_value": "1"}
    assert config["parameters"]["max_images"] == {"string_value": str(servers.domain.limits.max_images)}
    sg_config = client.get_model_config("sg")
    assert ("truncation", "TYPE_FP32", [1]) in [(i["name"], i["data_type"], i["dims"]) for i in sg_config["input"]]


def test_infer_matches_grpc_sample_and_model_infer(http, client, servers):
    want = sampled(servers)
    binary = client.infer("tiny", [seeds_input(http)], request_id="req-1")          # tritonclient's defaults
    response = binary.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == ("tiny", "1", "req-1")
    assert response["outputs"][0]["parameters"] == {"binary_data_size": want.nbytes}
    assert binary.as_numpy("image").dtype == np.uint8 and np.array_equal(binary.as_numpy("image"), want)
    as_json = client.infer("tiny", [seeds_input(http, binary=False)],
                           outputs=[http.InferRequestedOutput("image", binary_data=False)],
                           parameters={"priority_hint": "low"})                      # unknown parameters: ignored
    assert "data" in as_json.get_response()["outputs"][0]
    assert np.array_equal(as_json.as_numpy("image"), want)
    by_grpc = servers.inference.ModelInfer(oip.ModelInferRequest(
        model_name="tiny", inputs=[oip.ModelInferRequest.InferInputTensor(
            name="seed", datatype="INT64", shape=[3], contents=oip.InferTensorContents(int64_contents=SEEDS))]),
        timeout=60)
    assert by_grpc.raw_output_contents[0] == want.tobytes()
    z = np.random.default_rng(3).standard_normal((2, 16)).astype(np.float32)
    by_z = client.infer("tiny", [tensor(http, "z", z, "FP32")], model_version="1")
    assert np.array_equal(by_z.as_numpy("image"), sampled(servers, z=z))
    # truncation where the architecture has the trick: the same bits as Sample's, and not truncation 1's
    half = client.infer("sg", [seeds_input(http, [1, 2]), tensor(http, "truncation", np.asarray([0.5], np.float64),
                                                                   "FP64", binary=False)])
    assert np.array_equal(half.as_numpy("image"), sampled(servers, "sg", [1, 2], truncation=0.5))
    assert not np.array_equal(half.as_numpy("image"), sampled(servers, "sg", [1, 2]))


def test_infer_takes_strength_as_a_request_parameter(http, client, servers):
    """The request parameter ``strength`` draws the version's own edit at that strength, as gRPC
    Sample's ``strength`` does, and the answer echoes it; a strength that is not a number is a 400."""
    from tritonclient.utils import InferenceServerException

    from rulewright.service.domain.requests import RewriteRequest
    from tests.builders import TINY_SPEC

    edit = servers.domain.rewrite(RewriteRequest("tiny/1", {**TINY_SPEC, "steps": 20, "strength": 0.5})).version
    req = gen.SampleRequest(model=f"tiny/{edit.number}", seeds=SEEDS, strength=1.5,
                            image_format=images_pb2.IMAGE_FORMAT_RAW_RGB8)
    want = np.stack([np.frombuffer(i.data, np.uint8).reshape(i.height, i.width, 3)
                     for i in servers.generator.Sample(req, timeout=60).images])
    got = client.infer("tiny", [seeds_input(http)], model_version=str(edit.number), parameters={"strength": 1.5})
    assert np.array_equal(got.as_numpy("image"), want)
    assert got.get_response()["parameters"] == {"strength": 1.5}
    own = client.infer("tiny", [seeds_input(http)], model_version=str(edit.number))
    assert own.get_response()["parameters"] == {"strength": 0.5} and not np.array_equal(own.as_numpy("image"), want)
    with pytest.raises(InferenceServerException) as err:
        client.infer("tiny", [seeds_input(http)], model_version=str(edit.number), parameters={"strength": "high"})
    assert err.value.status() == "400" and "parameters.strength" in err.value.message()


def test_errors_name_the_input_with_their_http_status(http, client):
    from tritonclient.utils import InferenceServerException

    def refused(*args, **kw) -> tuple[str, str]:
        with pytest.raises(InferenceServerException) as err:
            client.infer(*args, **kw)
        return err.value.status(), err.value.message()

    status, message = refused("nope", [seeds_input(http)])
    assert status == "404" and "nope" in message
    assert refused("tiny", [seeds_input(http)], model_version="9")[0] == "404"
    status, message = refused("tiny", [tensor(http, "seed", np.asarray([1.0], np.float32), "FP32")])
    assert status == "400" and "inputs[0].datatype" in message and "'seed'" in message and "INT64" in message
    status, message = refused("tiny", [seeds_input(http), tensor(http, "truncation", np.asarray([0.5], np.float32),
                                                                 "FP32")])
    assert status == "400" and "inputs[1]" in message and "truncation" in message          # a DCGAN takes only 1
    status, message = refused("tiny", [tensor(http, "z", np.zeros((1, 8), np.float32), "FP32")])
    assert status == "400" and "inputs[0].shape" in message and "[N, 16]" in message
    status, message = refused("tiny", [seeds_input(http)], outputs=[http.InferRequestedOutput("mask")])
    assert status == "400" and "outputs[0].name" in message and "mask" in message


# ---- raw requests, as curl sends them ------------------------------------------------------------


def infer_path(model: str = "tiny", version: str = "") -> str:
    return f"/v2/models/{model}" + (f"/versions/{version}" if version else "") + "/infer"


def test_curl_style_json(servers):
    base = servers.url
    live, ready = request(base, "GET", "/v2/health/live"), request(base, "GET", "/v2/health/ready")
    assert (live.status, live.data, ready.status, ready.data) == (200, b"", 200, b"")
    assert request(base, "GET", "/v2").json()["name"] == "rulewright"
    assert request(base, "GET", "/v2/models/tiny/versions/1/ready").status == 200
    assert request(base, "GET", "/v2/models/nope/ready").status == 400
    z = np.random.default_rng(8).standard_normal((2, 16)).astype(np.float32)
    body = {"id": "curl-1", "inputs": [{"name": "z", "shape": [2, 16], "datatype": "FP32", "data": z.tolist()}]}
    answer = request(base, "POST", infer_path(version="1"), body)             # data nested by the shape
    assert answer.status == 200 and answer.headers["Content-Type"] == "application/json"
    result = answer.json()
    assert (result["model_name"], result["model_version"], result["id"]) == ("tiny", "1", "curl-1")
    (out,) = result["outputs"]
    assert (out["name"], out["datatype"], out["shape"]) == ("image", "UINT8", [2, 32, 32, 3])
    assert np.array_equal(np.asarray(out["data"], np.uint8).reshape(out["shape"]), sampled(servers, z=z))
    flat = {"inputs": [{"name": "seed", "shape": [3], "datatype": "INT64", "data": SEEDS}],
            "parameters": {"binary_data_output": True}}
    raw = request(base, "POST", infer_path(), raw=json.dumps(flat).encode())    # no Content-Type, binary answer
    length = int(raw.headers["Inference-Header-Content-Length"])
    header = json.loads(raw.data[:length])
    assert header["outputs"][0]["parameters"]["binary_data_size"] == len(raw.data) - length
    assert raw.data[length:] == sampled(servers).tobytes()


def test_raw_errors_are_kserve_json(servers):
    base = servers.url

    def error(method: str, path: str, body=None, **kw) -> tuple[int, str]:
        answer = request(base, method, path, body, **kw)
        assert set(answer.json()) == {"error"} and isinstance(answer.error, str), answer
        return answer.status, answer.error

    assert error("GET", "/v2/models/nope")[0] == 404
    assert error("GET", "/v2/models/nope/config")[0] == 404
    assert error("GET", "/v2/nothing")[0] == 404
    assert error("GET", infer_path())[0] == 405
    status, message = error("POST", infer_path(), {})
    assert status == 400 and message.startswith("inputs: required")
    seed = {"name": "seed", "shape": [2], "datatype": "INT64"}
    status, message = error("POST", infer_path(), {"inputs": [{**seed, "data": [1, 2.5]}]})
    assert status == 400 and "inputs[0].data" in message and "element 1" in message and "'seed'" in message
    status, message = error("POST", infer_path(), {"inputs": [{**seed, "data": [1]}]})
    assert status == 400 and "inputs[0].data" in message and "needs 2 values, got 1" in message
    status, message = error("POST", infer_path(), {"inputs": [seed]})
    assert status == 400 and "inputs[0].data" in message and "no data" in message
    status, message = error("POST", infer_path(), {"inputs": [{**seed, "shape": "2", "data": [1, 2]}]})
    assert status == 400 and "inputs[0].shape" in message
    header = json.dumps({"inputs": [{**seed, "parameters": {"binary_data_size": 16}}]}).encode()
    status, message = error("POST", infer_path(), raw=header + b"\0" * 15,
                            headers={"Inference-Header-Content-Length": str(len(header))})
    assert status == 400 and "binary_data_size" in message
    status, message = error("POST", infer_path(), raw=b"\x1f\x8b", headers={"Content-Encoding": "gzip"})
    assert status == 415 and "uncompressed" in message
    status, message = error("POST", infer_path(version="Bad!"), {"inputs": [{**seed, "data": [1, 2]}]})
    assert status == 400 and "version" in message
    assert request(base, "GET", "/v2/health/live").status == 200               # still serving


def test_auth_takes_the_roles_of_the_grpc_methods(web_server):
    base = web_server(tokens=parse_tokens("r-token reader rita\n")).url
    assert request(base, "GET", "/v2/health/ready").status == 200            # probes are open, as on gRPC
    body = {"inputs": [{"name": "seed", "shape": [1], "datatype": "INT64", "data": [1]}]}
    anonymous = request(base, "POST", infer_path(), body)
    assert anonymous.status == 401 and isinstance(anonymous.error, str)
    assert anonymous.headers["WWW-Authenticate"].startswith("Bearer")
    reader = {"Authorization": "Bearer r-token"}
    assert request(base, "POST", infer_path(), body, headers=reader).json()["model_version"] == "1"
    assert request(base, "GET", "/v2/models/tiny/config", headers=reader).status == 200
