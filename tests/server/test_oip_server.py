"""The Open Inference Protocol on the server's own port: the real ``tritonclient[grpc]`` (in a
subprocess, ``triton_probe.py``) for readiness, metadata and infer pixels equal to Sample's, and
our own ``rulewright.inference`` stubs in-process for the request forms and errors it cannot send."""

from __future__ import annotations

import base64
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health

from rulewright.inference import grpc_predict_v2_pb2 as oip, grpc_predict_v2_pb2_grpc as oip_grpc
from rulewright.service.server import auth
from rulewright.service.server.app import create_server, set_health
from rulewright.v1 import generator_service_pb2 as gen, images_pb2, registry_service_pb2 as reg
from tests.support import missing

from .conftest import detail, error_info
from .test_auth import READER, TOKENS_TEXT, bearer
from .test_generator import spec_pb

REPO = Path(__file__).resolve().parents[2]
PROBE = Path(__file__).with_name("triton_probe.py")
SEEDS = [0, 7, 2**40]
Input = oip.ModelInferRequest.InferInputTensor


def probe(port: int, *calls: dict) -> list:
    """Run ``calls`` through tritonclient in a fresh interpreter; their results in order."""
    if importlib.util.find_spec("tritonclient") is None:      # finds it without importing it
        missing("tritonclient[grpc] (a test extra)")
    plan = json.dumps({"address": f"127.0.0.1:{port}", "calls": list(calls)})
    done = subprocess.run([sys.executable, str(PROBE)], input=plan, cwd=REPO, capture_output=True, text=True,
                          timeout=180, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout)["results"]


def sampled(generator, model: str = "tiny", seeds=None, z: np.ndarray | None = None) -> bytes:
    """Sample's raw RGB8 pixels for ``seeds`` or latents ``z``, concatenated in order."""
    request = gen.SampleRequest(model=model, image_format=images_pb2.IMAGE_FORMAT_RAW_RGB8)
    if z is not None:
        request.latents.CopyFrom(gen.Latents(count=z.shape[0], dim=z.shape[1], values=z.reshape(-1).tolist()))
    else:
        request.seeds.extend(seeds)
    return b"".join(image.data for image in generator.Sample(request, timeout=60).images)


def pixels(result: dict) -> bytes:
    """The image bytes of a probed infer result."""
    return base64.b64decode(result["pixels"])


@pytest.fixture
def inference(channel):
    """Our own OIP stub on the test server's channel."""
    return oip_grpc.GRPCInferenceServiceStub(channel)


# ---- tritonclient ------------------------------------------------------------------------------


def test_tritonclient_readiness_metadata_and_infer_match_sample(server, generator):
    z = np.random.default_rng(3).standard_normal((2, 16)).astype(np.float32)
    want_seeds, want_z = sampled(generator, seeds=SEEDS), sampled(generator, z=z)
    (live, ready, model_ready, other_ready, server_meta, model_meta, by_seed, by_z, truncated, bad_truncation,
     unknown, with_parameters, bad_output) = probe(
        server[1],
        {"op": "live"}, {"op": "ready"},
        {"op": "model_ready", "model": "tiny"}, {"op": "model_ready", "model": "nope"},
        {"op": "server_metadata"}, {"op": "model_metadata", "model": "tiny"},
        {"op": "infer", "model": "tiny", "seed": SEEDS, "request_id": "req-1", "outputs": ["image"]},
        {"op": "infer", "model": "tiny", "z": z.tolist()},
        {"op": "infer", "model": "tiny", "seed": SEEDS, "truncation": [1.0], "truncation_datatype": "FP64"},
        {"op": "infer", "model": "tiny", "seed": SEEDS, "truncation": [0.5]},
        {"op": "infer", "model": "nope", "seed": SEEDS},
        {"op": "infer", "model": "tiny", "seed": SEEDS, "parameters": {"priority_hint": "low", "x-trace": 7}},
        {"op": "infer", "model": "tiny", "seed": SEEDS, "outputs": ["image", "mask"]},
    )
    assert live is True and ready is True and model_ready is True and other_ready is False
    assert server_meta["name"] == "rulewright" and server_meta["version"] == "0.1.0"
    assert server_meta.get("extensions", []) == []
    assert model_meta["name"] == "tiny" and model_meta["versions"] == ["1"]
    assert model_meta["platform"] == "rulewright_dcgan"
    inputs = {t["name"]: (t["datatype"], [int(d) for d in t["shape"]]) for t in model_meta["inputs"]}
    assert inputs == {"seed": ("INT64", [-1]), "z": ("FP32", [-1, 16])}     # a DCGAN has no truncation trick
    (output,) = model_meta["outputs"]
    assert (output["name"], output["datatype"], [int(d) for d in output["shape"]]) == ("image", "UINT8",
                                                                                       [-1, 32, 32, 3])
    assert by_seed["shape"] == [3, 32, 32, 3] and by_seed["dtype"] == "uint8"
    assert (by_seed["model_name"], by_seed["model_version"], by_seed["id"]) == ("tiny", "1", "req-1")
    assert pixels(by_seed) == want_seeds
    assert by_z["shape"] == [2, 32, 32, 3] and pixels(by_z) == want_z
    assert pixels(truncated) == want_seeds                   # truncation 1 is no truncation
    assert bad_truncation["error"] == "INVALID_ARGUMENT" and "truncation" in bad_truncation["message"]
    assert unknown["error"] == "NOT_FOUND" and "nope" in unknown["message"]
    assert pixels(with_parameters) == want_seeds
    assert bad_output["error"] == "INVALID_ARGUMENT" and "mask" in bad_output["message"]


def test_tritonclient_versions_follow_the_production_alias(server, generator, registry):
    v1 = sampled(generator, seeds=SEEDS)
    events = list(generator.Rewrite(gen.RewriteRequest(model="tiny@production", spec=spec_pb()), timeout=120))
    assert events[-1].result.version.name == "models/tiny/versions/2"
    v2 = sampled(generator, model="tiny/2", seeds=SEEDS)
    assert v2 != v1                                          # the edit changed what these seeds draw
    # `production` still names version 1, so "" means version 1 although version 2 is newer
    before, = probe(server[1], {"op": "infer", "model": "tiny", "seed": SEEDS})
    assert before["model_version"] == "1" and pixels(before) == v1
    registry.SetAlias(reg.SetAliasRequest(name="models/tiny/aliases/production", version=2, expected_version=1),
                      timeout=30)
    default, pinned, by_alias, meta, ready_v2, ready_v9 = probe(
        server[1],
        {"op": "infer", "model": "tiny", "seed": SEEDS},
        {"op": "infer", "model": "tiny", "version": "1", "seed": SEEDS},
        {"op": "infer", "model": "tiny", "version": "production", "seed": SEEDS},
        {"op": "model_metadata", "model": "tiny"},
        {"op": "model_ready", "model": "tiny", "version": "2"},
        {"op": "model_ready", "model": "tiny", "version": "9"},
    )
    assert default["model_version"] == "2" and pixels(default) == v2
    assert pinned["model_version"] == "1" and pixels(pinned) == v1
    assert by_alias["model_version"] == "2" and pixels(by_alias) == v2
    assert meta["versions"] == ["1", "2"]
    assert ready_v2 is True and ready_v9 is False


# ---- our own stubs: request forms tritonclient does not send, and errors -----------------------------


def seed_input(seeds, raw: bool) -> tuple[Input, bytes | None]:
    """A ``seed`` input in ``contents``, or (raw) empty plus its little-endian bytes."""
    if raw:
        return Input(name="seed", datatype="INT64", shape=[len(seeds)]), np.asarray(seeds, "<i8").tobytes()
    return Input(name="seed", datatype="INT64", shape=[len(seeds)],
                 contents=oip.InferTensorContents(int64_contents=seeds)), None


def test_contents_and_raw_input_contents_draw_the_same_pixels(inference, generator):
    want = sampled(generator, seeds=SEEDS)
    for raw in (False, True):
        tensor, data = seed_input(SEEDS, raw)
        request = oip.ModelInferRequest(model_name="tiny", id=f"raw-{raw}", inputs=[tensor],
                                        raw_input_contents=[data] if raw else [])
        request.parameters["unknown"].string_param = "tolerated"
        response = inference.ModelInfer(request, timeout=60)
        (out,) = response.outputs
        assert (out.name, out.datatype, list(out.shape)) == ("image", "UINT8", [3, 32, 32, 3])
        assert (response.model_version, response.id) == ("1", f"raw-{raw}")
        assert response.raw_output_contents[0] == want, f"raw={raw}"


def test_z_in_contents_matches_sample_latents(inference, generator):
    z = np.random.default_rng(5).standard_normal((2, 16)).astype(np.float32)
    contents = oip.InferTensorContents(fp32_contents=z.ravel().tolist())
    request = oip.ModelInferRequest(model_name="tiny", inputs=[Input(name="z", datatype="FP32", shape=[2, 16],
                                                                     contents=contents)])
    assert inference.ModelInfer(request, timeout=60).raw_output_contents[0] == sampled(generator, z=z)


def invalid(inference, request) -> tuple[str, str]:
    """(field, description) of the INVALID_ARGUMENT ``request`` must fail with."""
    with pytest.raises(grpc.RpcError) as err:
        inference.ModelInfer(request, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    (violation,) = detail(err.value, error_details_pb2.BadRequest).field_violations
    return violation.field, violation.description


def test_bad_tensors_are_invalid_argument_naming_the_input(inference):
    z = Input(name="z", datatype="FP32", shape=[1, 16], contents=oip.InferTensorContents(fp32_contents=[0.0] * 16))
    seed, _ = seed_input([1], raw=False)
    wrong_type = Input(name="seed", datatype="FP32", shape=[1], contents=oip.InferTensorContents(fp32_contents=[1]))
    field, text = invalid(inference, oip.ModelInferRequest(model_name="tiny", inputs=[z, wrong_type]))
    assert field == "inputs[1].datatype" and "'seed'" in text and "INT64" in text
    assert invalid(inference, oip.ModelInferRequest(model_name="tiny", inputs=[seed, z]))[0] == "inputs"
    assert invalid(inference, oip.ModelInferRequest(model_name="tiny", inputs=[]))[0] == "inputs"
    short = Input(name="z", datatype="FP32", shape=[1, 8], contents=oip.InferTensorContents(fp32_contents=[0.0] * 8))
    field, text = invalid(inference, oip.ModelInferRequest(model_name="tiny", inputs=[short]))
    assert field == "inputs[0].shape" and "[N, 16]" in text
    tensor, data = seed_input([1, 2], raw=True)
    field, text = invalid(inference, oip.ModelInferRequest(model_name="tiny", inputs=[tensor],
                                                           raw_input_contents=[data[:-1]]))
    assert field == "raw_input_contents[0]" and "'seed'" in text
    nan = Input(name="z", datatype="FP32", shape=[1, 16],
                contents=oip.InferTensorContents(fp32_contents=[float("nan")] + [0.0] * 15))
    assert invalid(inference, oip.ModelInferRequest(model_name="tiny", inputs=[nan]))[0] == "inputs[0]"
    negative = Input(name="seed", datatype="INT64", shape=[2], contents=oip.InferTensorContents(int64_contents=[1, -4]))
    field, text = invalid(inference, oip.ModelInferRequest(model_name="tiny", inputs=[negative]))
    assert field == "inputs[0]" and "-4" in text
    extra = Input(name="w", datatype="FP32", shape=[1], contents=oip.InferTensorContents(fp32_contents=[0]))
    assert invalid(inference, oip.ModelInferRequest(model_name="tiny", inputs=[seed, extra]))[0] == "inputs[1].name"
    outputs = [oip.ModelInferRequest.InferRequestedOutputTensor(name="mask")]
    assert invalid(inference, oip.ModelInferRequest(model_name="tiny", inputs=[seed],
                                                    outputs=outputs))[0] == "outputs[0].name"
    assert invalid(inference, oip.ModelInferRequest(model_name="tiny", model_version="Bad!",
                                                    inputs=[seed]))[0] == "model_version"


def test_unknown_model_or_version_is_not_found_and_not_ready(inference):
    seed, _ = seed_input([1], raw=False)
    for name, version in (("nope", ""), ("tiny", "9"), ("tiny", "staging")):
        with pytest.raises(grpc.RpcError) as err:
            inference.ModelInfer(oip.ModelInferRequest(model_name=name, model_version=version, inputs=[seed]),
                                 timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND, (name, version)
        assert not inference.ModelReady(oip.ModelReadyRequest(name=name, version=version), timeout=30).ready
        with pytest.raises(grpc.RpcError) as err:
            inference.ModelMetadata(oip.ModelMetadataRequest(name=name, version=version), timeout=30)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert error_info(err.value).reason == "ALIAS_NOT_FOUND"


def test_server_ready_follows_health(domain):
    servicer = health.HealthServicer()
    set_health(servicer, False)
    server, port = create_server(domain, health_servicer=servicer)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = oip_grpc.GRPCInferenceServiceStub(ch)
            assert stub.ServerLive(oip.ServerLiveRequest(), timeout=10).live
            assert not stub.ServerReady(oip.ServerReadyRequest(), timeout=10).ready
            set_health(servicer, True)
            assert stub.ServerReady(oip.ServerReadyRequest(), timeout=10).ready
    finally:
        server.stop(0).wait()


def test_auth_reader_for_models_probes_open(domain):
    server, port = create_server(domain, tokens=auth.parse_tokens(TOKENS_TEXT))
    seed, _ = seed_input([1], raw=False)
    request = oip.ModelInferRequest(model_name="tiny", inputs=[seed])
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = oip_grpc.GRPCInferenceServiceStub(ch)
            for call, message in ((stub.ModelInfer, request),
                                  (stub.ModelMetadata, oip.ModelMetadataRequest(name="tiny")),
                                  (stub.ModelReady, oip.ModelReadyRequest(name="tiny")),
                                  (stub.ServerMetadata, oip.ServerMetadataRequest())):
                with pytest.raises(grpc.RpcError) as err:
                    call(message, timeout=30)
                assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
                assert error_info(err.value).reason == "TOKEN_MISSING"
            assert stub.ModelInfer(request, timeout=60, metadata=bearer(READER)).model_version == "1"
            assert stub.ServerLive(oip.ServerLiveRequest(), timeout=10).live
            assert stub.ServerReady(oip.ServerReadyRequest(), timeout=10).ready
        ready, anonymous, reader = probe(port, {"op": "ready"}, {"op": "infer", "model": "tiny", "seed": [1]},
                                         {"op": "infer", "model": "tiny", "seed": [1], "token": READER})
        assert ready is True and anonymous["error"] == "UNAUTHENTICATED" and reader["model_version"] == "1"
    finally:
        server.stop(0).wait()
