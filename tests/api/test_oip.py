"""The Open Inference Protocol stubs are wire-compatible with the real ``tritonclient[grpc]``.

tritonclient registers the same ``inference.*`` protobuf symbols as ``rulewright.inference``, so
it never enters this process: it runs in a subprocess, once to dump its descriptors and once as
a live client of a canned OIP servicer served from here.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from rulewright.inference import grpc_predict_v2_pb2 as oip
from rulewright.inference import grpc_predict_v2_pb2_grpc as oip_grpc

from ._descriptors import dump
from .conftest import REPO, missing, serve

OIP_METHODS = ["ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer"]
SIZE = 4  # canned images are SIZE x SIZE RGB


@pytest.fixture(scope="module", autouse=True)
def tritonclient_installed() -> None:
    if importlib.util.find_spec("tritonclient") is None:  # finds it without importing it
        missing("tritonclient[grpc] (a test extra)")


def in_subprocess(code: str, *args: str) -> dict:
    """Run ``code`` with tritonclient in a fresh interpreter; it prints one JSON object."""
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return json.loads(result.stdout)


def test_service_and_messages_match_tritonclient():
    theirs = in_subprocess("""
        import json
        from tritonclient.grpc import service_pb2
        from tests.api._descriptors import dump
        print(json.dumps(dump(service_pb2.DESCRIPTOR, "GRPCInferenceService")))
    """)
    ours = json.loads(json.dumps(dump(oip.DESCRIPTOR, "GRPCInferenceService")))
    assert ours["package"] == theirs["package"] == "inference"
    assert ours["service"] == theirs["service"] == "inference.GRPCInferenceService"
    assert list(ours["methods"]) == OIP_METHODS
    for name, signature in ours["methods"].items():
        assert theirs["methods"][name] == signature, name
    # every message we define matches theirs field for field: names, numbers, types, labels, oneofs
    assert len(ours["messages"]) >= 20
    for name, fields in ours["messages"].items():
        assert name in theirs["messages"], name
        assert fields == theirs["messages"][name], name


def pixels(seed: int) -> np.ndarray:
    return ((np.arange(SIZE * SIZE * 3) + seed * 7) % 256).astype(np.uint8).reshape(SIZE, SIZE, 3)


class Inference(oip_grpc.GRPCInferenceServiceServicer):
    """A canned OIP model `faces`: input `seed` INT64 [N] → output `image` UINT8 [N, 4, 4, 3]."""

    def ServerLive(self, request, context):
        return oip.ServerLiveResponse(live=True)

    def ServerReady(self, request, context):
        return oip.ServerReadyResponse(ready=True)

    def ModelReady(self, request, context):
        return oip.ModelReadyResponse(ready=request.name == "faces")

    def ServerMetadata(self, request, context):
        return oip.ServerMetadataResponse(name="rulewright", version="0.1.0", extensions=[])

    def ModelMetadata(self, request, context):
        tensor = oip.ModelMetadataResponse.TensorMetadata
        return oip.ModelMetadataResponse(
            name=request.name, versions=["3"], platform="pytorch",
            inputs=[tensor(name="seed", datatype="INT64", shape=[-1])],
            outputs=[tensor(name="image", datatype="UINT8", shape=[-1, SIZE, SIZE, 3])],
        )

    def ModelInfer(self, request, context):
        (tensor,) = request.inputs
        seeds = np.frombuffer(request.raw_input_contents[0], dtype="<i8")
        images = np.stack([pixels(int(s)) for s in seeds])
        response = oip.ModelInferResponse(
            model_name=request.model_name, model_version="3", id=request.id,
            outputs=[oip.ModelInferResponse.InferOutputTensor(name="image", datatype="UINT8", shape=images.shape)],
            raw_output_contents=[images.tobytes()],
        )
        response.parameters["truncation"].double_param = request.parameters["truncation"].double_param
        response.parameters["seed_shape"].string_param = f"{tensor.name}:{tensor.datatype}:{list(tensor.shape)}"
        return response


def test_tritonclient_talks_to_the_generated_service():
    seeds = [3, 2**40]
    with serve(lambda s: oip_grpc.add_GRPCInferenceServiceServicer_to_server(Inference(), s)) as address:
        got = in_subprocess("""
            import json, sys
            import numpy as np
            import tritonclient.grpc as tc

            client = tc.InferenceServerClient(sys.argv[1])
            seed = tc.InferInput("seed", [2], "INT64")
            seed.set_data_from_numpy(np.array([3, 2**40], dtype=np.int64))
            result = client.infer("faces", [seed], outputs=[tc.InferRequestedOutput("image")],
                                  request_id="req-1", parameters={"truncation": 0.7}, client_timeout=30)
            response = result.get_response()
            image = result.as_numpy("image")
            print(json.dumps({
                "live": client.is_server_live(),
                "ready": client.is_server_ready(),
                "model_ready": client.is_model_ready("faces"),
                "other_ready": client.is_model_ready("nope"),
                "server": client.get_server_metadata(as_json=True),
                "model": client.get_model_metadata("faces", as_json=True),
                "id": response.id,
                "truncation": response.parameters["truncation"].double_param,
                "seed_shape": response.parameters["seed_shape"].string_param,
                "shape": list(image.shape),
                "dtype": str(image.dtype),
                "pixels": image.reshape(-1).tolist(),
            }))
        """, address)
    assert got["live"] and got["ready"] and got["model_ready"] and not got["other_ready"]
    assert got["server"]["name"] == "rulewright"
    assert [t["name"] for t in got["model"]["inputs"]] == ["seed"]
    assert got["model"]["outputs"][0]["datatype"] == "UINT8"
    assert got["id"] == "req-1"
    assert got["truncation"] == 0.7
    assert got["seed_shape"] == "seed:INT64:[2]"
    assert got["shape"] == [2, SIZE, SIZE, 3] and got["dtype"] == "uint8"
    assert got["pixels"] == np.stack([pixels(s) for s in seeds]).reshape(-1).tolist()
