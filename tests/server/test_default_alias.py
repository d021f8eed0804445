"""A bare model name means the server's default alias on every gRPC API (``production`` unless
``--default-alias`` names another), OIP's empty ``model_version`` included: a rewrite does not
change what the bare name draws until the alias moves, every answer names the version it used,
and a model without the alias is NOT_FOUND with a message that says what to do."""

from __future__ import annotations

import grpc
import pytest

from rulewright.client import Client
from rulewright.inference import grpc_predict_v2_pb2 as oip, grpc_predict_v2_pb2_grpc as oip_grpc
from rulewright.service.server.app import create_server
from rulewright.v1 import generator_service_pb2 as gen, generator_service_pb2_grpc as gen_grpc
from rulewright.v1 import images_pb2, registry_service_pb2 as reg, registry_service_pb2_grpc as reg_grpc
from tests.builders import dcgan_state, store_edited_versions, tiny_domain

from .conftest import error_info
from .test_generator import spec_pb

SEEDS = [0, 3]


def served(domain):
    """(generator, registry, inference stubs, address, stop) of a server over ``domain``."""
    server, port = create_server(domain)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")

    def stop():
        channel.close()
        server.stop(0).wait()
        domain.close()
    return (gen_grpc.GeneratorServiceStub(channel), reg_grpc.RegistryServiceStub(channel),
            oip_grpc.GRPCInferenceServiceStub(channel), f"127.0.0.1:{port}", stop)


def sample(generator, model: str) -> tuple[str, bytes]:
    """The version a Sample of ``model`` used, and its raw pixels."""
    reply = generator.Sample(gen.SampleRequest(model=model, seeds=SEEDS, image_format=images_pb2.IMAGE_FORMAT_RAW_RGB8),
                             timeout=60)
    return reply.version, b"".join(image.data for image in reply.images)


def infer(inference, model: str, version: str = "") -> tuple[str, bytes]:
    """The model_version an OIP infer of ``model`` answered with, and its pixels."""
    seeds = oip.ModelInferRequest.InferInputTensor(name="seed", datatype="INT64", shape=[len(SEEDS)])
    seeds.contents.int64_contents.extend(SEEDS)
    reply = inference.ModelInfer(oip.ModelInferRequest(model_name=model, model_version=version, inputs=[seeds]),
                                 timeout=60)
    return reply.model_version, reply.raw_output_contents[0]


@pytest.fixture
def tiny(tmp_path):
    generator, registry, inference, address, stop = served(tiny_domain(tmp_path))
    yield generator, registry, inference
    stop()


def test_a_rewrite_changes_what_the_bare_name_draws_only_once_production_moves(tiny):
    generator, registry, inference = tiny
    v1 = sample(generator, "tiny/1")[1]
    result = list(generator.Rewrite(gen.RewriteRequest(model="tiny", spec=spec_pb()), timeout=120))[-1].result
    assert result.parent == "models/tiny/versions/1" and result.version.name == "models/tiny/versions/2"
    v2 = sample(generator, "tiny/2")[1]
    assert v2 != v1
    # The newer version is an unreviewed edit: the bare name still draws production's version 1.
    assert sample(generator, "tiny") == ("models/tiny/versions/1", v1)
    assert infer(inference, "tiny") == ("1", v1)
    layers = generator.ListLayers(gen.ListLayersRequest(model="tiny"), timeout=30)
    assert layers.version == "models/tiny/versions/1"
    registry.SetAlias(reg.SetAliasRequest(name="models/tiny/aliases/production", version=2, expected_version=1),
                      timeout=30)
    assert sample(generator, "tiny") == ("models/tiny/versions/2", v2)
    assert infer(inference, "tiny") == ("2", v2)


def test_the_configured_default_alias_is_what_a_bare_name_means(tmp_path):
    from safetensors.torch import save_file

    from rulewright.service.domain.core import Domain
    from rulewright.service.server.config import resolve

    config = resolve(environ={"RULEWRIGHT_DATA_DIR": str(tmp_path / "data"), "RULEWRIGHT_DEVICE": "cpu",
                              "RULEWRIGHT_DEFAULT_ALIAS": "stable"})
    domain = Domain.from_config(config)
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in dcgan_state(z_dim=16, widths=(32, 16, 8, 3)).items()}, str(path))
    assert domain.bootstrap("tiny", path).number == 1          # the bootstrap points `stable` at version 1
    edited, = store_edited_versions(domain, 1)
    generator, registry, inference, address, stop = served(domain)
    try:
        registry.SetAlias(reg.SetAliasRequest(name="models/tiny/aliases/production", version=2, expected_version=0),
                          timeout=30)
        assert sample(generator, "tiny")[0] == "models/tiny/versions/1"      # stable, not production
        assert infer(inference, "tiny")[0] == "1"
        registry.SetAlias(reg.SetAliasRequest(name="models/tiny/aliases/stable", version=2, expected_version=1),
                          timeout=30)
        assert sample(generator, "tiny")[0] == f"models/{edited.replace('/', '/versions/')}"

        # A model registered without the alias (straight into the registry): the bare name is
        # NOT_FOUND, as `other@stable` itself would be, saying how to name a version or set the alias.
        domain.registry.import_model("other", arch="dcgan", config={}, weights=path.read_bytes())
        with pytest.raises(grpc.RpcError) as err:
            sample(generator, "other")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        info = error_info(err.value)
        assert info.reason == "ALIAS_NOT_FOUND" and info.metadata["alias"] == "stable"
        message = err.value.details()
        assert "'stable'" in message and "other/1" in message and "rulewright alias set other stable" in message
        with pytest.raises(grpc.RpcError) as err:
            infer(inference, "other")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        ready = inference.ModelReady(oip.ModelReadyRequest(name="other"), timeout=30)
        assert ready.ready is False
        assert sample(generator, "other/1")[0] == "models/other/versions/1"

        # ImportModel points the default alias at the new model's version 1: the bare name serves it.
        with Client(address, timeout=60) as client:
            made = client.import_model("copy", path, arch="dcgan", config={})
            assert made.version.number == 1 and client.aliases("copy")["stable"].version == 1
        assert sample(generator, "copy")[0] == "models/copy/versions/1"
    finally:
        stop()

