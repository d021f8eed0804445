"""Dissect, SearchContext, ComputeStatistics and ImportModel over a real channel."""

from __future__ import annotations

import hashlib
import json
from concurrent import futures

import grpc
import pytest
import torch
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from safetensors.torch import save

from rulewright.service.domain.statistics import moment_key
from rulewright.service.domain import statistics as statistics_module
from rulewright.service.engine import dissect
from rulewright.service.engine.regions import Region
from rulewright.service.engine.stats import key_moment, load_stat, value_quantiles
from rulewright.service.domain.requests import SearchRequest
from rulewright.service.server.servicers import RegistryServicer
from rulewright.v1 import edit_pb2, generator_service_pb2 as gen, images_pb2
from rulewright.v1 import registry_service_pb2 as reg, registry_service_pb2_grpc as reg_grpc
from tests.builders import dcgan_state

from .conftest import detail, error_info, wait_idle

BOX = [8, 8, 16, 16]


def field_of(err: grpc.RpcError) -> str:
    return detail(err, error_details_pb2.BadRequest).field_violations[0].field


def fail(call, *args, **kw) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        result = call(*args, **kw)
        if hasattr(result, "__iter__") and not hasattr(result, "SerializeToString"):
            list(result)
    error_info(err.value)    # every error carries ErrorInfo
    return err.value


@pytest.fixture
def counting(monkeypatch):
    """Counts of the statistics component's computations (cache misses)."""
    counts = {"key_moment": 0, "value_quantiles": 0}

    def wrap(name, fn):
        def counted(*args, **kw):
            counts[name] += 1
            return fn(*args, **kw)
        monkeypatch.setattr(statistics_module, name, counted)
    wrap("key_moment", statistics_module.key_moment)
    wrap("value_quantiles", statistics_module.value_quantiles)
    return counts


# ---- Dissect ---------------------------------------------------------------------------------

def test_dissect_matches_rank_units_and_reuses_the_thresholds(generator, domain, counting):
    request = gen.DissectRequest(model="tiny@production", layer="main.6", top=5, include_maps=True,
                                 regions=[images_pb2.Region(seed=1, box=BOX)],
                                 thresholds=edit_pb2.StatisticsSpec(samples=16))
    r = generator.Dissect(request, timeout=30)
    model = domain.generator(domain.resolve("tiny/1")).model
    quantiles = value_quantiles(model, "main.6", range(16))
    expected = dissect.rank_units(model, "main.6", [Region(seed=1, box=(8, 8, 16, 16))], quantiles)[:5]
    thresholds = quantiles.quantile(0.99)
    assert r.version == "models/tiny/versions/1" and r.layer == "main.6"
    assert [u.unit for u in r.units] == [u.unit for u in expected]
    for got, want in zip(r.units, expected):
        assert got.iou == pytest.approx(want.iou) and got.contrast == pytest.approx(want.contrast, abs=1e-6)
        assert got.threshold == pytest.approx(float(thresholds[want.unit]), abs=1e-6)
    assert len(r.maps) == 5 and {m.seed for m in r.maps} == {1} and len(r.maps[0].values) == r.maps[0].width ** 2
    again = generator.Dissect(gen.DissectRequest(model="tiny", regions=[images_pb2.Region(seed=1, box=BOX)],
                                                 layer="main.6", rank_by=gen.DissectRequest.RANK_BY_CONTRAST,
                                                 thresholds=edit_pb2.StatisticsSpec(samples=16)), timeout=30)
    assert counting["value_quantiles"] == 1        # the thresholds came from the cache the second time
    contrasts = [u.contrast for u in again.units]
    assert contrasts == sorted(contrasts, reverse=True) and len(again.units) == 8 and not again.maps


def test_dissect_errors_name_the_field(generator):
    bad = images_pb2.Region(seed=1, box=[8, 8, 99, 16])
    err = fail(generator.Dissect, gen.DissectRequest(model="tiny", regions=[bad],
                                                     thresholds=edit_pb2.StatisticsSpec(samples=8)), timeout=30)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(err) == "regions[0].box"
    err = fail(generator.Dissect, gen.DissectRequest(model="tiny", layer="nope", regions=[bad]), timeout=30)
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = fail(generator.Dissect, gen.DissectRequest(model="tiny", thresholds=edit_pb2.StatisticsSpec(samples=8)),
               timeout=30)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(err) == "regions"


# ---- SearchContext ---------------------------------------------------------------------------

def test_search_context_sorts_matches_and_reports_the_threshold(generator, domain):
    request = gen.SearchContextRequest(model="tiny", layer="main.6", context=[images_pb2.Region(seed=2, box=BOX)],
                                       seed_range=gen.SeedRange(start=0, count=24), top=6, include_maps=True,
                                       stats=edit_pb2.StatisticsSpec(samples=32))
    r = generator.SearchContext(request, timeout=30)
    found = domain.search(SearchRequest("tiny/1", [Region(seed=2, box=(8, 8, 16, 16))], range(24), layer="main.6",
                                        top=6, samples=32))
    matches, threshold = found.matches, found.threshold
    assert r.version == "models/tiny/versions/1" and r.layer == "main.6"
    assert r.threshold == pytest.approx(threshold)
    scores = [m.score for m in r.matches]
    assert len(r.matches) == 6 and scores == sorted(scores, reverse=True)
    assert [m.seed for m in r.matches] == [m.seed for m in matches]
    assert scores == pytest.approx([m.score for m in matches])
    m0 = r.matches[0]
    assert len(m0.response) == m0.width * m0.height and max(m0.response) == pytest.approx(m0.score)
    assert all(0 <= m.above <= 1 for m in r.matches)
    plain = generator.SearchContext(gen.SearchContextRequest(
        model="tiny", layer="main.6", context=[images_pb2.Region(seed=2, box=BOX)], seeds=[5, 3, 9],
        stats=edit_pb2.StatisticsSpec(samples=32)), timeout=30)
    assert sorted(m.seed for m in plain.matches) == [3, 5, 9] and not plain.matches[0].response


def test_search_context_needs_exactly_one_candidate_set(generator):
    both = gen.SearchContextRequest(model="tiny", context=[images_pb2.Region(seed=2, box=BOX)], seeds=[1],
                                    seed_range=gen.SeedRange(start=0, count=3))
    err = fail(generator.SearchContext, both, timeout=30)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(err) == "seeds"
    err = fail(generator.SearchContext, gen.SearchContextRequest(model="tiny", seeds=[1]), timeout=30)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(err) == "context"


# ---- ComputeStatistics -----------------------------------------------------------------------

def test_compute_statistics_streams_progress_then_caches_the_moment(generator, domain, counting):
    request = gen.ComputeStatisticsRequest(model="tiny@production", layer="main.6",
                                           stats=edit_pb2.StatisticsSpec(samples=96, seed_start=4))
    events = list(generator.ComputeStatistics(request, timeout=60))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[-1] == "result" and kinds.count("result") == 1 and kinds.count("progress") == 3
    steps = [(e.progress.stage, e.progress.step, e.progress.steps) for e in events[:-1]]
    assert steps == [(gen.Progress.STAGE_STATISTICS, n, 96) for n in (32, 64, 96)]
    result = events[-1].result
    assert (result.version, result.layer, result.statistic) == ("models/tiny/versions/1", "main.6",
                                                                 gen.STATISTIC_KEY_MOMENT)
    assert (result.stats.samples, result.stats.seed_start, result.cached) == (96, 4, False)
    model = domain.generator(domain.resolve("tiny/1")).model
    key = moment_key(model, "main.6", range(4, 100))
    stored = domain.stats_cache.get(key)
    assert result.cache_key == key.digest() and result.size_bytes == len(stored)
    direct = key_moment(model, "main.6", range(4, 100))
    assert torch.allclose(load_stat(stored).moment(), direct.moment(), atol=1e-5)
    again = list(generator.ComputeStatistics(request, timeout=60))
    assert [e.WhichOneof("event") for e in again] == ["result"] and again[0].result.cached
    assert again[0].result.cache_key == result.cache_key and counting["key_moment"] == 1 and len(domain.stats_cache) == 1


def test_value_quantiles_statistic_feeds_dissect(generator, counting):
    request = gen.ComputeStatisticsRequest(model="tiny", layer="main.6", statistic=gen.STATISTIC_VALUE_QUANTILES,
                                           stats=edit_pb2.StatisticsSpec(samples=16))
    result = list(generator.ComputeStatistics(request, timeout=60))[-1].result
    assert result.statistic == gen.STATISTIC_VALUE_QUANTILES and not result.cached and result.size_bytes > 0
    generator.Dissect(gen.DissectRequest(model="tiny", layer="main.6", regions=[images_pb2.Region(seed=1, box=BOX)],
                                         thresholds=edit_pb2.StatisticsSpec(samples=16)), timeout=30)
    assert counting["value_quantiles"] == 1


def test_cancelled_or_expired_statistics_cache_nothing(generator, domain, server):
    # max_stats_samples, the most a request may ask for: long enough to cancel mid-way
    request = gen.ComputeStatisticsRequest(model="tiny", layer="main.6",
                                           stats=edit_pb2.StatisticsSpec(samples=100_000))
    call = generator.ComputeStatistics(request, timeout=60)
    for event in call:
        assert event.HasField("progress")
        call.cancel()
        break
    wait_idle(server)
    assert len(domain.stats_cache) == 0
    with pytest.raises(grpc.RpcError) as err:
        list(generator.ComputeStatistics(request, timeout=0.5))
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    wait_idle(server)
    assert len(domain.stats_cache) == 0
    small = gen.ComputeStatisticsRequest(model="tiny", stats=edit_pb2.StatisticsSpec(samples=8))
    assert list(generator.ComputeStatistics(small, timeout=30))[-1].result.layer    # still serving


def test_compute_statistics_errors(generator):
    err = fail(generator.ComputeStatistics, gen.ComputeStatisticsRequest(model="nope"), timeout=30)
    assert err.code() == grpc.StatusCode.NOT_FOUND
    err = fail(generator.ComputeStatistics, gen.ComputeStatisticsRequest(
        model="tiny", stats=edit_pb2.StatisticsSpec(samples=-3)), timeout=30)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(err) == "stats.samples"


# ---- ImportModel -----------------------------------------------------------------------------

def weights() -> bytes:
    return save({k: v.contiguous() for k, v in dcgan_state(z_dim=16, widths=(32, 16, 8, 3)).items()})


def upload(data: bytes, chunk: int = 4096, **meta):
    meta = {"model_id": "copy", "arch": "dcgan", **meta}
    yield reg.ImportModelRequest(metadata=reg.ImportModelMetadata(**meta))
    for i in range(0, len(data), chunk):
        yield reg.ImportModelRequest(chunk=data[i:i + chunk])


def test_import_model_round_trip(registry, generator):
    data = weights()
    metrics = struct_pb2.Struct()
    metrics.update({"fid": 12.5})
    r = registry.ImportModel(upload(data, config_json=json.dumps({"z_dim": 16}), description="a copy",
                                    spec_json='{"source": "test"}', metrics=metrics, size_bytes=len(data),
                                    sha256=hashlib.sha256(data).hexdigest(), request_id="imp-1"), timeout=30)
    assert r.model.name == "models/copy" and r.model.arch == "dcgan" and r.version.name == "models/copy/versions/1"
    assert json.loads(r.model.config_json)["widths"] == [32, 16, 8, 3] and r.version.metrics["fid"] == 12.5
    assert r.version.blobs[0].sha256 == hashlib.sha256(data).hexdigest()
    got = registry.GetModel(reg.GetModelRequest(name="models/copy"), timeout=30)
    assert got.latest_version == 1 and got.description == "a copy"
    a = generator.Sample(gen.SampleRequest(model="copy", seeds=[3]), timeout=30).images[0].data
    b = generator.Sample(gen.SampleRequest(model="tiny", seeds=[3]), timeout=30).images[0].data
    assert a == b
    replay = registry.ImportModel(upload(data, request_id="imp-1"), timeout=30)
    assert replay.version.name == r.version.name
    err = fail(registry.ImportModel, upload(data, model_id="tiny"), timeout=30)
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and error_info(err).reason == "MODEL_EXISTS"


@pytest.mark.parametrize("data, meta, field", [
    (b"\x80\x02garbage" * 50, {}, "chunk"),
    (b"", {}, "chunk"),
    (None, {"arch": "progan"}, "metadata.arch"),
    (None, {"arch": ""}, "metadata.arch"),
    (None, {"config_json": '{"z_dim": 64}'}, "metadata.config_json"),
    (None, {"config_json": "[1"}, "metadata.config_json"),
    (None, {"sha256": "0" * 64}, "metadata.sha256"),
    (None, {"size_bytes": 10}, "metadata.size_bytes"),
    (None, {"model_id": "Bad Name"}, "metadata.model_id"),
])
def test_import_model_refuses_bad_uploads(registry, data, meta, field):
    data = weights() if data is None else data
    err = fail(registry.ImportModel, upload(data, **meta), timeout=30)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(err) == field, err.details()
    assert [m.name for m in registry.ListModels(reg.ListModelsRequest(), timeout=30).models] == ["models/tiny"]


def test_import_model_first_message_must_be_metadata(registry):
    err = fail(registry.ImportModel, iter([reg.ImportModelRequest(chunk=b"x")]), timeout=30)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and field_of(err) == "metadata"


@pytest.fixture
def small_limit(domain):
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    reg_grpc.add_RegistryServiceServicer_to_server(RegistryServicer(domain, max_import_bytes=10_000), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        yield reg_grpc.RegistryServiceStub(ch)
    server.stop(0).wait()


def test_import_model_over_the_limit_is_resource_exhausted(small_limit):
    data = weights()
    assert len(data) > 10_000
    for meta in ({"size_bytes": len(data)}, {}):
        err = fail(small_limit.ImportModel, upload(data, **meta), timeout=30)
        assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert error_info(err).reason == "IMPORT_TOO_LARGE" and error_info(err).metadata["limit"] == "10000"
    assert [m.name for m in small_limit.ListModels(reg.ListModelsRequest(), timeout=30).models] == ["models/tiny"]
