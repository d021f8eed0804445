"""Strength at request time and versions at another strength, over a real gRPC server.

Sample's ``strength`` draws a version's own edit (the deltas it adds over its parent) at another
strength; RescaleVersion stores that as a new version without a fit or a new blob. One server
for the module, over the tiny random DCGAN: version 2 is a real (short) fit of it, version 3 a
random edit on top of version 2 (so "its own edit" and "earlier edits" differ).
"""

from __future__ import annotations

import math
import threading
from types import SimpleNamespace

import grpc
import pytest
from google.rpc import error_details_pb2

from rulewright.inference import grpc_predict_v2_pb2 as oip, grpc_predict_v2_pb2_grpc as oip_grpc
from rulewright.service.domain.requests import RewriteRequest
from rulewright.service.engine.delta import to_bytes
from rulewright.service.engine.sampling import latents, to_uint8
from rulewright.service.server.app import create_server
from rulewright.v1 import generator_service_pb2 as gen, generator_service_pb2_grpc as gen_grpc
from rulewright.v1 import images_pb2, registry_service_pb2 as reg, registry_service_pb2_grpc as reg_grpc
from tests.builders import TINY_SPEC, random_deltas, tiny_domain

from .conftest import detail

SEEDS = [0, 1, 2, 3]
RAW = images_pb2.IMAGE_FORMAT_RAW_RGB8


class Passes:
    """Stands in for the server's metrics: the image count of every forward pass the batcher runs."""

    def __init__(self):
        self.sizes: list[int] = []

    def observe_batch(self, n: int) -> None:
        self.sizes.append(n)

    def observe_stats_cache(self, kind: str, hit: bool) -> None:
        pass


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    domain = tiny_domain(tmp_path_factory.mktemp("strength"))
    passes = Passes()
    domain.metrics = passes
    fitted = domain.rewrite(RewriteRequest("tiny/1", {**TINY_SPEC, "strength": 0.8})).version
    base = domain.generator(fitted).model
    child = domain.registry.create_version("tiny", parent=fitted.number, spec={"strength": 0.5},
                                           delta=to_bytes(random_deltas(base, seed=5, strength=0.5)))
    server, port = create_server(domain)
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    yield SimpleNamespace(domain=domain, passes=passes, fitted=fitted, child=child,
                          generator=gen_grpc.GeneratorServiceStub(channel),
                          registry=reg_grpc.RegistryServiceStub(channel),
                          inference=oip_grpc.GRPCInferenceServiceStub(channel))
    channel.close()
    server.stop(0).wait()
    domain.close()


def sample(s, model: str, strength: float | None = None, seeds=SEEDS) -> gen.SampleResponse:
    request = gen.SampleRequest(model=model, seeds=seeds, image_format=RAW)
    if strength is not None:
        request.strength = strength
    return s.generator.Sample(request, timeout=60)


def pixels(response) -> list[bytes]:
    return [im.data for im in response.images]


def name(version) -> str:
    return f"models/tiny/versions/{version.number}"


def refused(call) -> dict[str, str]:
    """The INVALID_ARGUMENT field violations of a call that must fail."""
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    return {v.field: v.description for v in detail(err.value, error_details_pb2.BadRequest).field_violations}


def test_the_default_strength_draws_the_pixels_of_the_version_as_stored(served):
    s, child = served, served.child
    plain = sample(s, f"tiny/{child.number}")
    assert plain.HasField("strength") and plain.strength == 0.5
    assert pixels(sample(s, f"tiny/{child.number}", 0.5)) == pixels(plain)      # its own strength, asked for
    # What the resident version renders without any strength at all: today's path, bit for bit.
    res = s.domain.generator(child)
    today = to_uint8(res.render(latents(SEEDS, res.model.z_dim))).numpy()
    assert pixels(plain) == [im.tobytes() for im in today]
    assert not sample(s, "tiny/1").HasField("strength")                         # an import has no edit


def test_a_strength_per_request_is_the_version_rescaled_to_it_pixel_for_pixel(served):
    s, child = served, served.child
    rescaled = s.registry.RescaleVersion(reg.RescaleVersionRequest(name=name(child), strength=1.7), timeout=30)
    at = sample(s, f"tiny/{child.number}", 1.7)
    assert at.strength == 1.7 and at.version == name(child)
    assert pixels(at) == pixels(sample(s, f"tiny/{rescaled.number}"))
    assert pixels(at) != pixels(sample(s, f"tiny/{child.number}"))
    # Only its own edit is scaled: at 0 it draws its parent, whose own edit stays at 0.8.
    assert pixels(sample(s, f"tiny/{child.number}", 0.0)) == pixels(sample(s, f"tiny/{s.fitted.number}"))
    assert pixels(sample(s, f"tiny/{s.fitted.number}", 0.0)) == pixels(sample(s, "tiny/1"))


def test_rescale_stores_no_blob_and_records_its_source_in_the_lineage(served):
    s, fitted = served, served.fitted
    store = s.domain.registry.store
    blobs = {b.sha256 for b in store.iter_blobs()}
    request = reg.RescaleVersionRequest(name=f"tiny/{fitted.number}", strength=0.3, description="weaker",
                                        request_id="rescale-once")
    v = s.registry.RescaleVersion(request, timeout=30)
    assert {b.sha256 for b in store.iter_blobs()} == blobs                     # no new blob: no fit, no copy
    source = s.registry.GetVersion(reg.GetVersionRequest(name=name(fitted)), timeout=30)
    assert [(b.role, b.sha256) for b in v.blobs] == [(b.role, b.sha256) for b in source.blobs]
    assert v.parent_version == source.parent_version == 1 and v.rescaled_from == fitted.number
    assert list(v.lineage) == [1, v.number] and source.rescaled_from == 0
    assert v.strength == 0.3 and source.strength == 0.8 and v.spec.strength == 0.3
    assert v.spec.description == "weaker" and v.spec.layer == source.spec.layer
    assert "strength_curve" in v.metrics and set(v.metrics) <= set(source.metrics)
    assert s.registry.RescaleVersion(request, timeout=30).number == v.number   # a retry: the same version
    listed = s.registry.ListVersions(reg.ListVersionsRequest(parent="models/tiny"), timeout=30).versions
    assert [x.rescaled_from for x in listed if x.number == v.number] == [fitted.number]
    # A version of a version at another strength: still the original delta, parent 1.
    again = s.registry.RescaleVersion(reg.RescaleVersionRequest(name=name(v), strength=0.8), timeout=30)
    assert again.rescaled_from == v.number and again.parent_version == 1
    assert pixels(sample(s, f"tiny/{again.number}")) == pixels(sample(s, f"tiny/{fitted.number}"))


def test_requests_at_different_strengths_share_one_pass_and_keep_their_own_pixels(served):
    s, ref = served, f"tiny/{served.child.number}"
    strengths = [None, 0.0, 1.7, -0.5]
    alone = {x: pixels(sample(s, ref, x, seeds=[4, 5])) for x in strengths}
    batcher = s.domain.batcher
    results: dict = {}
    before = len(s.passes.sizes)
    batcher.max_batch, batcher.max_delay_s = 8, 30.0       # the pass waits for all four requests (8 images)
    try:
        threads = [threading.Thread(target=lambda x=x: results.__setitem__(x, sample(s, ref, x, seeds=[4, 5])))
                   for x in strengths]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        batcher.max_batch, batcher.max_delay_s = s.domain.max_batch, 0.002
    assert s.passes.sizes[before:] == [8]                   # one forward pass held every strength
    assert {x: pixels(r) for x, r in results.items()} == alone
    assert [results[x].strength for x in strengths] == [0.5, 0.0, 1.7, -0.5]


def test_oip_infer_takes_strength_as_a_request_parameter(served):
    s, child = served, served.child
    seed = oip.ModelInferRequest.InferInputTensor(name="seed", datatype="INT64", shape=[len(SEEDS)],
                                                  contents=oip.InferTensorContents(int64_contents=SEEDS))
    request = oip.ModelInferRequest(model_name="tiny", model_version=str(child.number), inputs=[seed],
                                    parameters={"strength": oip.InferParameter(double_param=1.7)})
    response = s.inference.ModelInfer(request, timeout=60)
    assert response.raw_output_contents[0] == b"".join(pixels(sample(s, f"tiny/{child.number}", 1.7)))
    assert response.parameters["strength"].double_param == 1.7
    del request.parameters["strength"]
    assert s.inference.ModelInfer(request, timeout=60).parameters["strength"].double_param == 0.5
    request.parameters["strength"].CopyFrom(oip.InferParameter(string_param="high"))
    assert "parameters.strength" in refused(lambda: s.inference.ModelInfer(request, timeout=60))
    request.parameters["strength"].CopyFrom(oip.InferParameter(int64_param=11))
    assert "parameters.strength" in refused(lambda: s.inference.ModelInfer(request, timeout=60))


@pytest.mark.parametrize("strength", [10.5, -11.0, math.nan, math.inf])
def test_a_strength_out_of_bounds_is_refused_before_any_work(served, strength):
    s = served
    versions = len(s.registry.ListVersions(reg.ListVersionsRequest(parent="models/tiny"), timeout=30).versions)
    passes = len(s.passes.sizes)
    violations = refused(lambda: sample(s, f"tiny/{s.child.number}", strength))
    assert list(violations) == ["strength"] and "-10 to 10" in violations["strength"]
    violations = refused(lambda: s.registry.RescaleVersion(
        reg.RescaleVersionRequest(name=name(s.child), strength=strength), timeout=30))
    assert list(violations) == ["strength"]
    assert len(s.passes.sizes) == passes                  # nothing drawn
    assert len(s.registry.ListVersions(reg.ListVersionsRequest(parent="models/tiny"), timeout=30).versions) == versions


def test_an_import_has_no_edit_to_give_a_strength(served):
    s = served
    passes = len(s.passes.sizes)
    assert "import" in refused(lambda: sample(s, "tiny/1", 0.5))["strength"]
    assert "import" in refused(lambda: s.registry.RescaleVersion(
        reg.RescaleVersionRequest(name="models/tiny/versions/1", strength=0.5), timeout=30))["strength"]
    assert len(s.passes.sizes) == passes
