"""GeneratorService over a real channel: ListLayers, Sample, Rewrite (progress, previews, request
ids, dry runs, cancellation)."""

from __future__ import annotations

import io
import json

import grpc
from google.protobuf import json_format
import numpy as np
import pytest
from PIL import Image

from rulewright.service.domain.requests import SampleRequest
from rulewright.v1 import edit_pb2, generator_service_pb2 as gen, images_pb2
from rulewright.v1 import registry_service_pb2 as reg

from .conftest import SPEC, wait_idle


def spec_pb(**overrides) -> edit_pb2.EditSpec:
    """SPEC (tests/test_domain.py) as a proto EditSpec."""
    s = {**SPEC, **overrides}
    box = list
    return edit_pb2.EditSpec(
        layer=s["layer"], rank=s["rank"], goal="value", steps=s["steps"],
        stats=edit_pb2.StatisticsSpec(samples=s["stats"]["samples"]), keep=edit_pb2.KeepSpec(weight=0.0),
        copy=images_pb2.Region(seed=s["copy"]["seed"], box=box(s["copy"]["box"])),
        paste=[images_pb2.Region(seed=p["seed"], box=box(p["box"])) for p in s["paste"]])


def test_list_layers_echoes_the_version(generator):
    r = generator.ListLayers(gen.ListLayersRequest(model="tiny@production"), timeout=30)
    assert r.version == "models/tiny/versions/1" and r.z_dim == 16 and r.image_resolution == 32
    assert r.default_layer in [layer.name for layer in r.layers] and "main.6" in [layer.name for layer in r.layers]


def test_sample_raw_matches_the_domain_and_png_decodes(generator, domain):
    raw = generator.Sample(gen.SampleRequest(model="tiny@production", seeds=[3, 4],
                                             image_format=images_pb2.IMAGE_FORMAT_RAW_RGB8), timeout=30)
    expected = domain.sample(SampleRequest("tiny/1", seeds=[3, 4])).images
    assert raw.version == "models/tiny/versions/1" and [i.seed for i in raw.images] == [3, 4]
    got = np.stack([np.frombuffer(i.data, np.uint8).reshape(i.height, i.width, 3) for i in raw.images])
    assert np.array_equal(got, expected.numpy())
    png = generator.Sample(gen.SampleRequest(model="tiny", seeds=[3]), timeout=30).images[0]
    assert png.format == images_pb2.IMAGE_FORMAT_PNG
    picture = Image.open(io.BytesIO(png.data))
    assert picture.size == (32, 32) and np.array_equal(np.asarray(picture.convert("RGB")), expected[0].numpy())


def test_sample_from_latents(generator, domain):
    z = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)
    r = generator.Sample(gen.SampleRequest(model="tiny/1", latents=gen.Latents(count=2, dim=16, values=z.ravel()),
                                           image_format=images_pb2.IMAGE_FORMAT_RAW_RGB8), timeout=30)
    import torch

    expected = domain.sample(SampleRequest("tiny/1", latents=torch.from_numpy(z))).images
    assert not r.images[0].HasField("seed")
    assert np.frombuffer(r.images[1].data, np.uint8).tobytes() == expected[1].numpy().tobytes()


def test_rewrite_streams_progress_previews_then_a_version_and_replays_its_request_id(generator, registry, domain):
    request = gen.RewriteRequest(model="tiny@production", spec=spec_pb(), preview_seeds=[5], request_id="req-1",
                                 preview_format=images_pb2.IMAGE_FORMAT_RAW_RGB8)
    events = list(generator.Rewrite(request, timeout=60))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[-1] == "result" and kinds[-2] == "preview" and kinds.count("progress") >= 2
    optimize = [e.progress for e in events if e.HasField("progress") and e.progress.stage == gen.Progress.STAGE_OPTIMIZE]
    assert optimize and optimize[-1].step == optimize[-1].steps == 60 and optimize[-1].HasField("loss")
    result = events[-1].result
    assert result.version.name == "models/tiny/versions/2" and result.parent == "models/tiny/versions/1"
    assert result.version.request_id == "req-1" and result.spec.layer == "main.6"
    assert list(result.version.lineage) == [1, 2]
    edited = domain.sample(SampleRequest("tiny/2", seeds=[5])).images
    assert events[-2].preview.images[0].data == edited[0].numpy().tobytes()
    again = list(generator.Rewrite(request, timeout=60))
    assert [e.WhichOneof("event") for e in again] == ["result"] and again[0].result.version.name == result.version.name
    assert [v.number for v in registry.ListVersions(reg.ListVersionsRequest(parent="models/tiny")).versions] == [1, 2]


def test_dry_run_commits_nothing(generator, registry):
    events = list(generator.Rewrite(gen.RewriteRequest(model="tiny", spec=spec_pb(), dry_run=True), timeout=60))
    assert events[-1].result.dry_run and not events[-1].result.HasField("version")
    assert [v.number for v in registry.ListVersions(reg.ListVersionsRequest(parent="models/tiny")).versions] == [1]


def test_cancelled_rewrite_creates_nothing(generator, registry, server):
    call = generator.Rewrite(gen.RewriteRequest(model="tiny", spec=spec_pb(steps=100_000)), timeout=60)
    for event in call:
        if event.HasField("progress") and event.progress.stage == gen.Progress.STAGE_OPTIMIZE:
            call.cancel()
            break
    wait_idle(server)
    assert [v.number for v in registry.ListVersions(reg.ListVersionsRequest(parent="models/tiny")).versions] == [1]


def test_deadline_exceeded_rewrite_creates_nothing(generator, registry, server):
    with pytest.raises(grpc.RpcError) as err:
        list(generator.Rewrite(gen.RewriteRequest(model="tiny", spec=spec_pb(steps=100_000)), timeout=1.0))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_idle(server)
    assert [v.number for v in registry.ListVersions(reg.ListVersionsRequest(parent="models/tiny")).versions] == [1]


def test_a_multilayer_rewrite_at_strength_zero_renders_the_parent_bit_for_bit(generator, registry, domain):
    # A big box and 20 steps: on this random model's nearly flat images a smaller fit stays at no
    # edit, which is refused (tests/server/test_rewrite_no_op.py).
    big = [4, 4, 28, 28]
    spec = spec_pb(steps=20, copy={"seed": 1, "box": big}, paste=[{"seed": 2, "box": big}])
    spec.goal = "image"
    spec.method = "multilayer"
    spec.strength = 0.0
    spec.search.targets = 2
    spec.search.candidates = 20
    result = list(generator.Rewrite(gen.RewriteRequest(model="tiny@production", spec=spec), timeout=120))[-1].result
    recorded = json_format.MessageToDict(result.spec, preserving_proto_field_name=True)
    assert recorded["method"] == "multilayer" and recorded["strength"] == 0.0 and len(recorded["found"]) == 2
    raw = images_pb2.IMAGE_FORMAT_RAW_RGB8
    parent = generator.Sample(gen.SampleRequest(model="tiny/1", seeds=[3, 4], image_format=raw), timeout=30)
    edited = generator.Sample(gen.SampleRequest(model=result.version.name.replace("models/", "").replace(
        "/versions/", "/"), seeds=[3, 4], image_format=raw), timeout=30)
    assert edited.version == result.version.name
    assert [i.data for i in edited.images] == [i.data for i in parent.images]
    # A value-space goal over the API still means the paper's one-layer edit.
    again = list(generator.Rewrite(gen.RewriteRequest(model="tiny/1", spec=spec_pb(steps=30), dry_run=True),
                                   timeout=120))[-1].result
    assert again.spec.method == "single"    # GOAL_VALUE implies the one-layer edit


def test_concurrent_clients_on_different_versions_share_passes_and_get_their_own_bytes(generator, domain, channel):
    """Over a real channel: single-image Sample calls for six versions of one base at once, then
    OIP ModelInfer for each version, all the bytes each image gets when drawn alone."""
    import threading

    from rulewright.inference import grpc_predict_v2_pb2 as oip, grpc_predict_v2_pb2_grpc as oip_grpc
    from tests.builders import store_edited_versions

    refs = ["tiny/1"] + store_edited_versions(domain, 5)
    raw = images_pb2.IMAGE_FORMAT_RAW_RGB8
    work = [(refs[i % len(refs)], 60 + i) for i in range(12)]
    alone = {w: generator.Sample(gen.SampleRequest(model=w[0], seeds=[w[1]], image_format=raw), timeout=60)
             .images[0].data for w in work}
    assert len(set(alone.values())) == len(work)
    sizes: list[int] = []
    domain.batcher.observe = sizes.append        # each forward pass's image count
    domain.batcher.max_delay_s = 0.2          # long enough that every client arrives first
    out, barrier = {}, threading.Barrier(len(work))

    def client(w):
        barrier.wait()
        reply = generator.Sample(gen.SampleRequest(model=w[0], seeds=[w[1]], image_format=raw), timeout=60)
        out[w] = (reply.version, reply.images[0].data)
    threads = [threading.Thread(target=client, args=(w,)) for w in work]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert {w: data for w, (_, data) in out.items()} == alone
    assert all(version == "models/" + w[0].replace("/", "/versions/") for w, (version, _) in out.items())
    assert max(sizes) > 1 and sum(sizes) == len(work) and len(sizes) < len(work)
    infer = oip_grpc.GRPCInferenceServiceStub(channel)
    for ref in refs:
        model, number = ref.split("/")
        seeds = [w[1] for w in work if w[0] == ref]
        request = oip.ModelInferRequest(model_name=model, model_version=number, inputs=[
            oip.ModelInferRequest.InferInputTensor(name="seed", datatype="INT64", shape=[len(seeds)],
                                                   contents=oip.InferTensorContents(int64_contents=seeds))])
        assert infer.ModelInfer(request, timeout=60).raw_output_contents[0] == b"".join(alone[ref, s] for s in seeds)
