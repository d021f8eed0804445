"""ImportModel with an NVIDIA StyleGAN2-ADA network pickle, over a real channel: converted by the
server (read as data), served like any import; a hostile pickle is INVALID_ARGUMENT on ``chunk``,
naming what it refers to, and runs nothing."""

from __future__ import annotations

import json
import os

import grpc
import pytest

from rulewright.service.engine.nvidia_pkl import convert_network_pickle
from rulewright.service.engine.sampling import latents, to_uint8
from google.rpc import error_details_pb2
from rulewright.v1 import generator_service_pb2 as gen, images_pb2, registry_service_pb2 as reg
from tests import nvidia_pickles as nv
from tests.server.conftest import detail

CFG = nv.Config(resolution=16, w_dim=32, n_mlp=2, channels=(32, 16, 8))


class System:
    """Pickles as ``os.system(command)``."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def upload(data: bytes, chunk: int = 4096, **meta):
    meta = {"model_id": "mini", "arch": "stylegan2", **meta}
    yield reg.ImportModelRequest(metadata=reg.ImportModelMetadata(**meta))
    for i in range(0, len(data), chunk):
        yield reg.ImportModelRequest(chunk=data[i:i + chunk])


def test_a_network_pickle_is_converted_and_served(registry, generator):
    t = nv.random_tensors(CFG)
    data = nv.dumps(nv.network_pickle(nv.generator(t, CFG)))
    r = registry.ImportModel(upload(data, size_bytes=len(data), spec_json='{"source": "snapshot.pkl"}'), timeout=60)
    assert r.model.arch == "stylegan2" and json.loads(r.model.config_json)["size"] == 16
    spec = json.loads(r.version.source_json)
    assert spec["source"] == "snapshot.pkl"
    assert spec["converted_from"]["sha256"] == convert_network_pickle(data).source["sha256"]
    images = generator.Sample(gen.SampleRequest(model="mini", seeds=[0, 1],
                                                image_format=images_pb2.IMAGE_FORMAT_RAW_RGB8), timeout=60).images
    expected = to_uint8(nv.reference_forward(t, CFG, latents([0, 1], CFG.w_dim)))
    for image, want in zip(images, expected):
        got = bytes(image.data)
        assert len(got) == want.numel()
        assert max(abs(a - b) for a, b in zip(got, want.flatten().tolist())) <= 1     # rounding apart


def test_a_hostile_pickle_is_invalid_argument_and_runs_nothing(registry, tmp_path):
    sentinel = tmp_path / "ran"
    data = nv.dumps({"G_ema": System(f"touch {sentinel}")})
    with pytest.raises(grpc.RpcError) as err:
        registry.ImportModel(upload(data), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    violation = detail(err.value, error_details_pb2.BadRequest).field_violations[0]
    assert violation.field == "chunk" and "posix.system" in violation.description
    assert not sentinel.exists()
    assert [m.name for m in registry.ListModels(reg.ListModelsRequest(), timeout=30).models] == ["models/tiny"]
