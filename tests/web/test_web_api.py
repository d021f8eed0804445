"""The editor's HTTP JSON API (docs/web-api.md) over real HTTP against ``service/server/web/``.

Every endpoint; images equal gRPC Sample's bytes; ablation; rewrite jobs as server-sent events
(progress, then the result; replay to late subscribers; cancel creates nothing; request_id
replay); errors as JSON with the gRPC code, reason and field violations, and the server still
serving after each; auth with the gRPC roles; static files without path traversal; the
``web_address`` setting and ``rulewright serve`` starting the HTTP side.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image
from starlette.routing import Match

from rulewright.service.engine.dissect import Intervention
from rulewright.service.engine.regions import Region
from rulewright.service.domain.requests import SampleRequest, SearchRequest
from rulewright.service.server.app import create_server, web_address
from rulewright.service.server.auth import AuthConfigError, parse_tokens
from rulewright.service.server.config import ConfigError, resolve
from rulewright.service.server.web import ROUTES
from rulewright.v1 import generator_service_pb2 as gen, generator_service_pb2_grpc as gen_grpc
from tests.builders import TINY_SPEC
from tests.support import free_port, missing
from tests.web.conftest import events, request

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
IMG = "/api/models/tiny/versions/{v}/images/{seed}.png"


def pixels(data: bytes) -> np.ndarray:
    assert data.startswith(PNG_MAGIC)
    return np.asarray(Image.open(io.BytesIO(data)))


def serving(base: str) -> None:
    """The server still answers, and correctly: health, and a sample."""
    assert request(base, "GET", "/healthz").json() == {"status": "SERVING"}
    assert request(base, "GET", IMG.format(v=1, seed=0)).status == 200


def empty_mask(size: int = 32) -> dict:
    raw = bytes(size * size)
    return {"encoding": "zlib-base64-u8", "size": [size, size], "data": base64.b64encode(zlib.compress(raw)).decode()}


def rewrite(base: str, spec=None, headers=None, **body):
    return request(base, "POST", "/api/rewrites", {"model": "tiny", "version": 1, "spec": spec or TINY_SPEC, **body},
                   headers=headers)


def run_job(base: str, spec=None, **body) -> tuple[dict, list]:
    resp = rewrite(base, spec, **body)
    assert resp.status == 202, resp
    job = resp.json()
    return job, events(base, job["events_url"])


# ---- reading -------------------------------------------------------------------------------------


def test_healthz_follows_the_serving_check(web_server):
    state = {"serving": False}
    server = web_server(serving=lambda: state["serving"])
    resp = request(server.url, "GET", "/healthz")
    assert (resp.status, resp.json()) == (503, {"status": "NOT_SERVING"})
    state["serving"] = True
    resp = request(server.url, "GET", "/healthz")
    assert (resp.status, resp.json()) == (200, {"status": "SERVING"})


def test_models_lists_the_model_with_its_aliases(web):
    base, _ = web
    resp = request(base, "GET", "/api/models")
    assert resp.status == 200 and resp.headers["Content-Type"] == "application/json"
    (model,) = resp.json()["models"]
    assert (model["name"], model["arch"], model["latest_version"], model["resolution"], model["z_dim"]) == \
        ("tiny", "dcgan", 1, 32, 16)
    assert model["aliases"] == {"production": 1}
    assert resp.json()["default_alias"] == "production"          # what the bare name means, opened first


def test_versions_and_layers(web):
    base, _ = web
    body = request(base, "GET", "/api/models/tiny/versions").json()
    (v1,) = body["versions"]
    assert (v1["number"], v1["parent"], v1["lineage"], v1["kind"]) == (1, None, [1], "import")
    (alias,) = body["aliases"]
    assert (alias["alias"], alias["version"]) == ("production", 1) and alias["etag"]
    assert [(h["from"], h["to"], h["reason"]) for h in alias["history"]] == [(None, 1, "bootstrap")]

    layers = request(base, "GET", "/api/models/tiny/versions/1/layers").json()
    assert (layers["default_layer"], layers["image_resolution"], layers["z_dim"]) == ("main.6", 32, 16)
    by_name = {layer["name"]: layer for layer in layers["layers"]}
    assert (by_name["main.6"]["in_channels"], by_name["main.6"]["out_channels"], by_name["main.6"]["resolution"]) \
        == (16, 8, 8)
    assert request(base, "GET", "/api/models/nope/versions").status == 404


def test_image_is_the_png_grpc_sample_returns(web):
    base, domain = web
    server, port = create_server(domain)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            r = gen_grpc.GeneratorServiceStub(ch).Sample(gen.SampleRequest(model="tiny/1", seeds=[0, 5, 7]),
                                                         timeout=30)
    finally:
        server.stop(0).wait()
    images = domain.sample(SampleRequest("tiny/1", seeds=[5])).images
    for seed, image in zip((0, 5, 7), r.images):
        resp = request(base, "GET", IMG.format(v=1, seed=seed))
        assert resp.status == 200 and resp.headers["Content-Type"] == "image/png"
        assert "immutable" in resp.headers["Cache-Control"]
        assert resp.data == image.data                      # the same bytes as gRPC Sample
    assert np.array_equal(pixels(request(base, "GET", IMG.format(v=1, seed=5)).data), images[0].numpy())
    assert not np.array_equal(pixels(r.images[0].data), pixels(r.images[1].data))


def test_an_edited_versions_image_is_the_png_grpc_sample_returns(web):
    from tests.builders import store_edited_versions

    base, domain = web
    ref = store_edited_versions(domain, 1)[0]
    server, port = create_server(domain)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            r = gen_grpc.GeneratorServiceStub(ch).Sample(gen.SampleRequest(model=ref, seeds=[4]), timeout=30)
    finally:
        server.stop(0).wait()
    resp = request(base, "GET", IMG.format(v=ref.split("/")[1], seed=4))
    assert resp.status == 200 and resp.data == r.images[0].data          # the editor draws the same bytes
    assert resp.data != request(base, "GET", IMG.format(v=1, seed=4)).data


def test_ablation_changes_pixels_as_the_domain_does(web):
    base, domain = web
    plain = pixels(request(base, "GET", IMG.format(v=1, seed=3)).data)
    resp = request(base, "GET", IMG.format(v=1, seed=3) + "?layer=main.6&ablate=0,1,2,3")
    assert resp.status == 200
    ablated = pixels(resp.data)
    assert not np.array_equal(plain, ablated)
    expected = domain.sample(SampleRequest("tiny/1", seeds=[3], layer="main.6", interventions=[Intervention(units=[0, 1, 2, 3])])).images
    assert np.array_equal(ablated, expected[0].numpy())

    bad = request(base, "GET", IMG.format(v=1, seed=3) + "?layer=main.6&ablate=99")
    assert bad.status == 400 and bad.error["code"] == "INVALID_ARGUMENT"
    assert list(bad.violations()) == ["ablate"] and "99" in bad.violations()["ablate"]
    bad = request(base, "GET", IMG.format(v=1, seed=3) + "?ablate=a,b")
    assert bad.status == 400 and list(bad.violations()) == ["ablate"]
    assert request(base, "GET", IMG.format(v=1, seed="x")).status == 400
    serving(base)


def test_search_ranks_seeds_and_serves_heatmaps(web):
    base, domain = web
    body = {"model": "tiny", "version": 1, "layer": "main.6", "context": [{"seed": 1, "box": [8, 8, 16, 16]}],
            "seeds": [1, 2, 3, 4, 5, 6], "rank": 1, "quantile": 0.9}
    resp = request(base, "POST", "/api/search", body)
    assert resp.status == 200, resp
    out = resp.json()
    assert isinstance(out["threshold"], float) and out["layer"] == "main.6" and out["version"] == 1
    assert sorted(m["seed"] for m in out["matches"]) == [1, 2, 3, 4, 5, 6]
    scores = [m["score"] for m in out["matches"]]
    assert scores == sorted(scores, reverse=True)
    found = domain.search(SearchRequest("tiny/1", [Region(seed=1, box=(8, 8, 16, 16))], [1, 2, 3, 4, 5, 6],
                                        layer="main.6", quantile=0.9))
    expected, threshold = found.matches, found.threshold
    assert [(m["seed"], m["score"]) for m in out["matches"]] == [(m.seed, pytest.approx(m.score)) for m in expected]
    assert out["threshold"] == pytest.approx(threshold)
    for m in out["matches"]:
        heat = request(base, "GET", m["map_url"])
        assert heat.status == 200 and heat.headers["Content-Type"] == "image/png"
        rgba = pixels(heat.data)
        assert rgba.shape == (32, 32, 4)
        # shaded exactly where the response is above the threshold
        assert (rgba[..., 3] > 0).mean() == pytest.approx(m["above"])
    assert any(0 < m["above"] < 1 for m in out["matches"])

    ranged = request(base, "POST", "/api/search", {**body, "seeds": None, "seed_range": [0, 10], "top": 3}).json()
    assert len(ranged["matches"]) == 3 and all(0 <= m["seed"] < 10 for m in ranged["matches"])

    resp = request(base, "POST", "/api/search", {**body, "context": [{"seed": 1, "mask": empty_mask()}]})
    assert resp.status == 400 and resp.error["code"] == "INVALID_ARGUMENT"
    assert "context[0].mask" in resp.violations() and "empty" in resp.violations()["context[0].mask"]
    resp = request(base, "POST", "/api/search", {**body, "seed_range": [2, 5]})
    assert resp.status == 400 and list(resp.violations()) == ["seeds"]   # both seeds and a range
    resp = request(base, "POST", "/api/search", {**body, "seeds": None, "seed_range": [5, 2]})
    assert resp.status == 400 and list(resp.violations()) == ["seed_range"]
    assert request(base, "GET", "/api/renders/not-there.png").status == 404
    serving(base)


def test_dissect_ranks_units_with_heatmaps(web):
    base, _ = web
    body = {"model": "tiny", "version": 1, "layer": "main.6", "region": {"seed": 2, "box": [4, 4, 20, 20]}, "top": 5}
    resp = request(base, "POST", "/api/dissect", body)
    assert resp.status == 200, resp
    out = resp.json()
    assert out["layer"] == "main.6" and out["seed"] == 2 and len(out["units"]) == 5
    ious = [u["iou"] for u in out["units"]]
    assert ious == sorted(ious, reverse=True) and len({u["unit"] for u in out["units"]}) == 5
    heat = pixels(request(base, "GET", out["units"][0]["map_url"]).data)
    assert heat.shape == (32, 32, 4)

    resp = request(base, "POST", "/api/dissect", {**body, "region": {"seed": 2, "mask": empty_mask()}})
    assert resp.status == 400 and list(resp.violations()) == ["region.mask"]
    resp = request(base, "POST", "/api/dissect", {**body, "region": {"seed": 2, "box": [4, 4, 99, 20]}})
    assert resp.status == 400 and list(resp.violations()) == ["region.box"]
    resp = request(base, "POST", "/api/dissect", {**body, "region": None})
    assert resp.status == 400 and list(resp.violations()) == ["region"]
    serving(base)


# ---- rewrite jobs ----------------------------------------------------------------------------------


def test_rewrite_streams_progress_then_the_result_and_creates_the_version(web):
    base, domain = web
    job, stream = run_job(base)
    assert job["state"] == "running" and job["events_url"] == f"/api/rewrites/{job['job']}/events"
    names = [name for _, name, _ in stream]
    assert names[-1] == "result" and set(names[:-1]) == {"progress"}
    stages = [data["stage"] for _, name, data in stream if name == "progress"]
    assert stages[0] == "statistics" and "optimize" in stages
    optimize = [data for _, name, data in stream if name == "progress" and data["stage"] == "optimize"]
    assert all(isinstance(p["loss"], float) for p in optimize) and optimize[-1]["step"] == optimize[-1]["steps"] == 60
    assert [i for i, _, _ in stream] == list(range(1, len(stream) + 1))
    result = stream[-1][2]
    assert (result["version"], result["parent"], result["dry_run"], result["replayed"]) == (2, 1, False, False)
    v2 = domain.registry.get_version("tiny", 2)
    assert (v2.parent, v2.kind) == (1, "edit")

    before = pixels(request(base, "GET", IMG.format(v=1, seed=2)).data)
    after = pixels(request(base, "GET", IMG.format(v=2, seed=2)).data)
    assert not np.array_equal(before, after)                            # the paste target changed
    expected = domain.sample(SampleRequest("tiny/2", seeds=[2])).images
    assert np.array_equal(after, expected[0].numpy())

    # a late subscriber gets every event again; one that saw them all is told to stop (204)
    assert events(base, job["events_url"]) == stream
    tail = events(base, job["events_url"], headers={"Last-Event-ID": str(len(stream) - 1)})
    assert tail == stream[-1:]
    assert events(base, job["events_url"], headers={"Last-Event-ID": str(len(stream))})[0][:2] == ("status", 204)
    status = request(base, "GET", f"/api/rewrites/{job['job']}").json()
    assert status["state"] == "succeeded" and status["result"]["version"] == 2

    versions = request(base, "GET", "/api/models/tiny/versions").json()["versions"]
    assert [(v["number"], v["lineage"]) for v in versions] == [(1, [1]), (2, [1, 2])]


def test_rewrite_dry_run_returns_previews_and_creates_nothing(web):
    base, domain = web
    _, stream = run_job(base, dry_run=True, preview_seeds=[2, 3])
    result = stream[-1][2]
    assert stream[-1][1] == "result" and result["dry_run"] is True and result["version"] is None
    previews = {p["seed"]: pixels(request(base, "GET", p["url"]).data) for p in result["previews"]}
    assert sorted(previews) == [2, 3]
    assert not np.array_equal(previews[2], pixels(request(base, "GET", IMG.format(v=1, seed=2)).data))
    assert [v.number for v in domain.registry.list_versions("tiny").items] == [1]


def test_request_id_replays_the_same_version(web):
    base, domain = web
    first, stream = run_job(base, request_id="edit-42")
    assert stream[-1][2]["version"] == 2
    again = rewrite(base, request_id="edit-42").json()            # the very same request: the same job
    assert again["job"] == first["job"] and again["state"] == "succeeded"
    other, stream = run_job(base, request_id="edit-42", preview_seeds=[1])   # a new job, replayed by the domain
    assert other["job"] != first["job"]
    assert (stream[-1][1], stream[-1][2]["version"], stream[-1][2]["replayed"]) == ("result", 2, True)
    assert [v.number for v in domain.registry.list_versions("tiny").items] == [1, 2]


def test_cancel_ends_the_job_with_cancelled_and_creates_nothing(web):
    base, domain = web
    spec = {**TINY_SPEC, "steps": 100_000}
    job = rewrite(base, spec).json()
    cancelled = []

    def on_event(name, data):
        if name == "progress" and data["stage"] == "optimize" and not cancelled:
            cancelled.append(request(base, "POST", job["cancel_url"], {}))

    stream = events(base, job["events_url"], on_event=on_event)
    assert cancelled and cancelled[0].status == 202
    name, data = stream[-1][1:]
    assert name == "error" and data["error"]["code"] == "CANCELLED"
    assert request(base, "GET", f"/api/rewrites/{job['job']}").json()["state"] == "cancelled"
    assert [v.number for v in domain.registry.list_versions("tiny").items] == [1]
    assert request(base, "POST", job["cancel_url"], {}).json()["state"] == "cancelled"   # idempotent
    assert request(base, "POST", "/api/rewrites/nope/cancel", {}).status == 404
    serving(base)


def test_one_failing_job_leaves_the_others_alone(web, monkeypatch):
    base, domain = web
    original = domain.rewrite

    def flaky(request, progress=None):
        if request.spec.settings.get("description") == "boom":     # the typed spec, parsed once
            raise RuntimeError("boom: a bug in the engine")
        return original(request, progress)

    monkeypatch.setattr(domain, "rewrite", flaky)
    bad = rewrite(base, {**TINY_SPEC, "description": "boom"}).json()
    good = rewrite(base).json()
    failed = events(base, bad["events_url"])
    assert failed[-1][1] == "error" and failed[-1][2]["error"]["code"] == "INTERNAL"
    assert "boom" not in json.dumps(failed)                  # internals stay in the server log
    assert request(base, "GET", f"/api/rewrites/{bad['job']}").json()["state"] == "failed"
    assert events(base, good["events_url"])[-1][1] == "result"
    assert domain.registry.get_version("tiny", 2).parent == 1
    serving(base)


# ---- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, field, words", [
    ({"strength": "high"}, "spec.strength", "must be a number, got 'high'"),
    ({"strenght": 1.0}, "spec.strenght", "unknown field"),
    ({"paste": [{"seed": 2, "bbox": [4, 4, 28, 28]}]}, "spec.paste[0].bbox", "unknown field"),
    ({"copy": {"seed": 1, "box": [4, 4, "x", 28]}}, "spec.copy.box[2]", "must be an integer"),
    ({"fit": {"feather": "soft"}}, "spec.fit.feather", "must be a number"),
    ({"paste": {"seed": 2}}, "spec.paste", "must be a list"),
])
def test_a_mistyped_or_unknown_spec_field_is_named_by_its_path(web, change, field, words):
    base, domain = web
    resp = rewrite(base, {**TINY_SPEC, **change})
    assert resp.status == 400 and resp.error["code"] == "INVALID_ARGUMENT"
    assert list(resp.violations()) == [field] and words in resp.violations()[field], resp.error
    assert [v.number for v in domain.registry.list_versions("tiny").items] == [1]   # no job ran


def test_spec_errors_answer_400_naming_the_field(web):
    base, domain = web
    spec = copy.deepcopy(TINY_SPEC)
    spec["paste"][0] = {"seed": 2, "mask": empty_mask()}
    resp = rewrite(base, spec)
    assert resp.status == 400 and resp.error["code"] == "INVALID_ARGUMENT"
    assert "spec.paste[0].mask" in resp.violations() and "empty" in resp.error["message"]

    no_copy = {k: v for k, v in TINY_SPEC.items() if k != "copy"}          # paste without a copy
    resp = rewrite(base, no_copy)
    assert resp.status == 400 and list(resp.violations()) == ["spec.copy"]
    assert "copy region" in resp.violations()["spec.copy"]

    resp = rewrite(base, {**TINY_SPEC, "rank": -1})   # 0 is the default, as on every wire
    assert resp.status == 400 and list(resp.violations()) == ["spec.rank"]
    resp = rewrite(base, {**TINY_SPEC, "layer": "main.99"})
    assert resp.status == 400 and list(resp.violations()) == ["spec.layer"]
    resp = request(base, "POST", "/api/rewrites", {"model": "tiny", "version": 1})
    assert resp.status == 400 and list(resp.violations()) == ["spec"]
    resp = request(base, "POST", "/api/rewrites", {"model": "tiny", "version": "1", "spec": TINY_SPEC})
    assert resp.status == 400 and list(resp.violations()) == ["version"]
    resp = rewrite(base, preview_seeds=[-1])
    assert resp.status == 400 and list(resp.violations()) == ["preview_seeds[0]"]
    assert [v.number for v in domain.registry.list_versions("tiny").items] == [1]   # no job ran
    serving(base)


def test_unknown_and_deleted_versions_answer_404(web):
    base, domain = web
    resp = request(base, "GET", IMG.format(v=9, seed=0))
    assert resp.status == 404 and resp.error["code"] == "NOT_FOUND"
    assert resp.error["reason"] == "VERSION_NOT_FOUND" and "9" in resp.error["message"]
    _, stream = run_job(base)
    assert stream[-1][2]["version"] == 2
    domain.registry.delete_version("tiny", 2, reason="test")
    for resp in (request(base, "GET", IMG.format(v=2, seed=0)),
                 request(base, "GET", "/api/models/tiny/versions/2/layers"),
                 rewrite(base, version=2),
                 request(base, "POST", "/api/dissect", {"model": "tiny", "version": 2,
                                                        "region": {"seed": 1, "box": [0, 0, 8, 8]}})):
        assert resp.status == 404, resp
        assert resp.error["reason"] == "VERSION_NOT_FOUND" and "2" in resp.error["message"]
    resp = request(base, "GET", "/api/models/ghost/versions/1/layers")
    assert resp.status == 404 and resp.error["reason"] == "MODEL_NOT_FOUND"
    serving(base)


def test_malformed_requests(web_server):
    server = web_server(max_body_bytes=4096)
    base = server.url
    resp = request(base, "POST", "/api/search", raw=b'{"model": "tiny",', headers={"Content-Type": "application/json"})
    assert resp.status == 400 and resp.error["code"] == "INVALID_ARGUMENT" and list(resp.violations()) == ["body"]
    resp = request(base, "POST", "/api/search", raw=b"[1, 2]", headers={"Content-Type": "application/json"})
    assert resp.status == 400 and "object" in resp.error["message"]
    resp = request(base, "POST", "/api/search", raw=b'{"x": NaN}', headers={"Content-Type": "application/json"})
    assert resp.status == 400 and list(resp.violations()) == ["body"]
    resp = request(base, "POST", "/api/search", raw=b"{}", headers={"Content-Type": "text/plain"})
    assert resp.status == 400 and "application/json" in resp.error["message"]
    resp = request(base, "POST", "/api/search", raw=b"{" + b" " * 5000 + b"}",
                   headers={"Content-Type": "application/json"})
    assert resp.status == 413 and resp.error["code"] == "RESOURCE_EXHAUSTED" and resp.error["reason"] == \
        "BODY_TOO_LARGE"
    resp = request(base, "POST", "/api/search", {"model": "tiny", "version": 1, "context": [], "bogus": 1})
    assert resp.status == 400 and "bogus" in resp.error["message"]
    resp = request(base, "GET", "/api/nothing")
    assert resp.status == 404 and resp.error["code"] == "NOT_FOUND"
    resp = request(base, "DELETE", "/api/models")
    assert resp.status == 405 and resp.headers["Allow"] == "GET"
    resp = request(base, "POST", "/api/models/tiny/aliases/production/rollback", {})
    assert resp.status == 412 and resp.error["reason"] == "NO_EARLIER_VERSION"
    serving(base)


def test_static_files_and_no_path_traversal(web_server, tmp_path):
    unbuilt = web_server(static_dir=tmp_path / "missing")
    resp = request(unbuilt.url, "GET", "/")
    assert resp.status == 503 and resp.data == b"the editor is not built: run make web\n"

    site = tmp_path / "webui"
    (site / "assets").mkdir(parents=True)
    (site / "index.html").write_text("<!doctype html><title>editor</title>")
    (site / "assets" / "app.js").write_text("console.log('editor')")
    (site / "assets" / "app-3f9a1c2b.css").write_text("body{}")
    (site / "assets" / ".hidden").write_text("no")
    (tmp_path / "secret.txt").write_text("SECRET")
    (site / "assets" / "link.txt").symlink_to(tmp_path / "secret.txt")
    base = web_server(static_dir=site).url
    page = request(base, "GET", "/")
    assert page.status == 200 and b"<title>editor</title>" in page.data
    assert page.headers["Content-Type"] == "text/html; charset=utf-8"
    js = request(base, "GET", "/assets/app.js")
    assert js.status == 200 and js.headers["Content-Type"].startswith("text/javascript") and js.data.startswith(b"con")
    assert "immutable" in request(base, "GET", "/assets/app-3f9a1c2b.css").headers["Cache-Control"]
    for path in ("/assets/../index.html", "/assets/../../secret.txt", "/assets/..%2f..%2fsecret.txt",
                 "/assets/%2e%2e/%2e%2e/secret.txt", "/assets/.hidden", "/assets/link.txt", "/assets//etc/passwd",
                 "/assets/%2fetc%2fpasswd", "/../secret.txt", "/assets/..\\..\\secret.txt", "/assets/nope.js"):
        resp = request(base, "GET", path)
        assert resp.status == 404, path
        assert b"SECRET" not in resp.data and b"root:" not in resp.data, path
    serving(base)


def test_foreign_host_and_cross_origin_posts_are_refused(web):
    base, _ = web
    port = base.rsplit(":", 1)[1]
    resp = request(base, "GET", "/api/models", headers={"Host": f"evil.example:{port}"})
    assert resp.status == 403 and resp.error["reason"] == "HOST_REFUSED"
    assert request(base, "GET", "/api/models", headers={"Host": f"localhost:{port}"}).status == 200
    resp = request(base, "POST", "/api/dissect", {"model": "tiny", "version": 1},
                   headers={"Origin": "http://evil.example"})
    assert resp.status == 403 and resp.error["reason"] == "ORIGIN_REFUSED"
    serving(base)


# ---- aliases -------------------------------------------------------------------------------------


def test_alias_compare_and_set_and_rollback(web):
    base, _ = web
    _, stream = run_job(base)
    assert stream[-1][2]["version"] == 2
    path = "/api/models/tiny/aliases/production"
    old_etag = request(base, "GET", "/api/models/tiny/versions").json()["aliases"][0]["etag"]
    resp = request(base, "PUT", path, {"version": 2, "expected_version": 1, "reason": "ship it"})
    assert resp.status == 200, resp
    moved = resp.json()
    assert (moved["alias"], moved["version"]) == ("production", 2)
    assert [(h["from"], h["to"]) for h in moved["history"]] == [(None, 1), (1, 2)]
    assert moved["history"][-1]["reason"] == "ship it"

    stale = request(base, "PUT", path, {"version": 2, "expected_version": 1})
    assert stale.status == 409 and stale.error["code"] == "ABORTED" and stale.error["reason"] == "ALIAS_CONFLICT"
    stale = request(base, "PUT", path, {"version": 1, "etag": old_etag})
    assert stale.status == 409 and stale.error["metadata"]["current_version"] == "2"
    resp = request(base, "PUT", path, {"version": 1, "etag": "not-an-etag"})
    assert resp.status == 400 and list(resp.violations()) == ["etag"]
    resp = request(base, "PUT", path, {"version": 1})
    assert resp.status == 400 and list(resp.violations()) == ["expected_version"]
    resp = request(base, "PUT", path, {"version": 9, "etag": moved["etag"]})
    assert resp.status == 404

    back = request(base, "POST", path + "/rollback", {"etag": moved["etag"]})
    assert back.status == 200 and back.json()["version"] == 1
    assert request(base, "GET", "/api/models").json()["models"][0]["aliases"] == {"production": 1}
    stale = request(base, "POST", path + "/rollback", {"etag": moved["etag"]})
    assert stale.status == 409
    new = request(base, "PUT", "/api/models/tiny/aliases/staging", {"version": 2, "expected_version": None})
    assert new.status == 200 and new.json()["version"] == 2


# ---- auth ----------------------------------------------------------------------------------------

TOKENS = "r-token reader rita\ne-token editor eddie\na-token admin ada\n"


def test_tokens_and_roles(web_server, tiny):
    base = web_server(tokens=parse_tokens(TOKENS)).url
    resp = request(base, "GET", "/api/models")
    assert resp.status == 401 and resp.error["reason"] == "TOKEN_MISSING"
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    resp = request(base, "GET", "/api/models", headers={"Authorization": "Bearer wrong"})
    assert resp.status == 401 and resp.error["reason"] == "TOKEN_INVALID"
    assert request(base, "GET", "/api/models", headers={"Authorization": "Bearer r-token"}).status == 200
    assert request(base, "GET", IMG.format(v=1, seed=0) + "?token=r-token").status == 200   # <img> URLs
    assert request(base, "GET", "/healthz").status == 200                                    # public

    reader = {"Authorization": "Bearer r-token"}
    resp = rewrite(base, headers=reader)
    assert resp.status == 403 and resp.error["code"] == "PERMISSION_DENIED"
    assert resp.error["reason"] == "ROLE_INSUFFICIENT" and resp.error["metadata"]["required_role"] == "editor"
    editor = {"Authorization": "Bearer e-token"}
    job = rewrite(base, headers=editor)
    assert job.status == 202
    assert request(base, "GET", job.json()["events_url"]).status == 401
    stream = events(base, job.json()["events_url"] + "?token=e-token")
    assert stream[-1][1] == "result"
    assert tiny.registry.get_version("tiny", 2).author == "eddie"

    path = "/api/models/tiny/aliases/production"
    resp = request(base, "PUT", path, {"version": 2, "expected_version": 1}, headers=editor)
    assert resp.status == 403 and resp.error["metadata"]["required_role"] == "admin"
    resp = request(base, "PUT", path, {"version": 2, "expected_version": 1}, headers={"Authorization": "Bearer a-token"})
    assert resp.status == 200 and resp.json()["history"][-1]["author"] == "ada"
    (route,) = [r for r in ROUTES if r.matches({"type": "http", "method": "POST", "path": path + "/rollback"})[0]
                is Match.FULL]                            # authorized as the gRPC method it shares
    assert route.rpc == "/rulewright.v1.RegistryService/RollbackAlias"
    resp = request(base, "POST", path + "/rollback", {"reason": "bad edit"}, headers=editor)
    assert resp.status == 403 and resp.error["metadata"]["required_role"] == "admin"
    resp = request(base, "POST", path + "/rollback", {"reason": "bad edit"}, headers={"Authorization": "Bearer a-token"})
    assert resp.status == 200 and resp.json()["version"] == 1
    assert (resp.json()["history"][-1]["author"], resp.json()["history"][-1]["reason"]) == ("ada", "bad edit")
    # with auth on, the token (not the Host header) is what protects: any Host is answered
    assert request(base, "GET", "/api/models", headers={**reader, "Host": "editor.example"}).status == 200


def test_public_address_without_tokens_is_refused(tiny):
    from rulewright.service.server.web import WebServer

    with pytest.raises(AuthConfigError, match="without auth"):
        WebServer(tiny, "0.0.0.0:0")


# ---- configuration and the real command -------------------------------------------------------------


def test_web_address_setting():
    assert resolve(None, {}).web_address == "auto"
    assert web_address(resolve(None, {})) == "127.0.0.1:8080"
    assert web_address(resolve(None, {"RULEWRIGHT_ADDRESS": "0.0.0.0:50051"})) is None
    assert web_address(resolve(None, {"RULEWRIGHT_TLS_CERT": "c.pem", "RULEWRIGHT_TLS_KEY": "k.pem"})) is None
    assert web_address(resolve(None, {"RULEWRIGHT_WEB_ADDRESS": "off"})) is None
    assert web_address(resolve(None, {"RULEWRIGHT_WEB_ADDRESS": "127.0.0.1:9000",
                                      "RULEWRIGHT_ADDRESS": "0.0.0.0:1"})) == "127.0.0.1:9000"
    with pytest.raises(ConfigError, match="web_address must be host:port, auto or off"):
        resolve(None, {"RULEWRIGHT_WEB_ADDRESS": "on"})


def test_rulewright_serve_starts_and_stops_the_web_side(tmp_path):
    exe = Path(sys.executable).with_name("rulewright-engine")
    if not exe.exists():
        missing(f"{exe} (pip install -e .)")
    port, web_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RULEWRIGHT_")}
    proc = subprocess.Popen([str(exe), "serve", "--data-dir", str(tmp_path / "data"), "--bootstrap", "none",
                             "--address", f"127.0.0.1:{port}", "--web-address", f"127.0.0.1:{web_port}",
                             "--device", "cpu", "--grace-s", "2"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        base = f"http://127.0.0.1:{web_port}"
        deadline = time.monotonic() + 60
        health = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                health = request(base, "GET", "/healthz", timeout=5).json()
            except OSError:
                health = None
            if health == {"status": "SERVING"}:
                break
            time.sleep(0.2)
        assert health == {"status": "SERVING"}, proc.poll()
        assert request(base, "GET", "/api/models").json() == {"models": [], "default_alias": "production"}
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0
        _, err = proc.communicate(timeout=5)
        records = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
        web = [r for r in records if r.get("event") == "web"]
        assert len(web) == 1 and (web[0]["address"], web[0]["port"]) == (f"127.0.0.1:{web_port}", web_port)
        with pytest.raises(OSError):
            request(base, "GET", "/healthz", timeout=5)                  # stopped with the server
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ---- the faces model ------------------------------------------------------------------------------


def test_faces_image_and_search(faces_web):
    base, domain = faces_web
    (model,) = request(base, "GET", "/api/models").json()["models"]
    assert (model["name"], model["resolution"], model["aliases"]) == ("faces", 64, {"production": 1})
    image = pixels(request(base, "GET", "/api/models/faces/versions/1/images/35.png").data)
    expected = domain.sample(SampleRequest("faces/1", seeds=[35])).images
    assert image.shape == (64, 64, 3) and np.array_equal(image, expected[0].numpy())
    threads, out = [], []
    for seed in (1, 9):     # concurrent requests are served side by side
        t = threading.Thread(target=lambda s=seed: out.append(request(base, "GET", f"/api/models/faces/versions/1/"
                                                                                    f"images/{s}.png")))
        threads.append(t)
        t.start()
    for t in threads:
        t.join()
    assert sorted(r.status for r in out) == [200, 200]


def test_editor_requests_are_counted_in_the_metrics(web):
    from prometheus_client.parser import text_string_to_metric_families

    from rulewright.service.server.metrics import Metrics

    base, domain = web
    Metrics().bind(domain)
    assert request(base, "GET", "/api/models/tiny/versions/1/images/3.png").status == 200
    assert request(base, "GET", "/api/models/tiny/versions/9/images/3.png").status == 404
    def samples():
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for family in text_string_to_metric_families(domain.metrics.render().decode())
                for s in family.samples}
    key = ("rulewright_http_request_duration_seconds_count", (("route", "image"),))
    deadline = time.monotonic() + 10      # recorded once the response is out: the client can be faster
    while samples().get(key) != 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    samples = samples()
    assert samples[("rulewright_http_requests_total", (("route", "image"), ("status", "200")))] == 1
    assert samples[("rulewright_http_requests_total", (("route", "image"), ("status", "404")))] == 1
    assert samples[("rulewright_http_request_duration_seconds_count", (("route", "image"),))] == 2


def test_the_icon_is_served_and_every_answer_is_logged_under_a_route_name(web, caplog):
    base, _ = web
    icon = request(base, "GET", "/favicon.ico")
    assert icon.status == 200 and icon.headers["Content-Type"].startswith("image/svg+xml")
    assert icon.data.startswith(b"<svg")
    with caplog.at_level(logging.INFO, logger="rulewright.service.server.web.app"):
        assert request(base, "GET", "/no/such/page").status == 404
        assert request(base, "DELETE", "/api/models").status == 405
        deadline = time.monotonic() + 10          # logged once the response is out (the icon's too, maybe now)
        answered = lambda: [(r.route, r.status) for r in caplog.records  # noqa: E731
                            if getattr(r, "event", None) == "http" and r.status >= 400]
        while len(answered()) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert answered() == [("not_found", 404), ("method_not_allowed", 405)], answered()


def test_a_rewrite_result_lists_the_found_targets_and_a_pruned_list_is_used_as_given(web):
    base, domain = web
    spec = {"layer": "main.6", "steps": 20, "stats": {"samples": 64}, "copy": {"seed": 1, "box": [4, 4, 28, 28]},
            "paste": [{"seed": 2, "box": [4, 4, 28, 28]}], "search": {"targets": 3, "candidates": 30}}
    _, stream = run_job(base, spec)
    found = stream[-1][2]["found"]
    assert stream[-1][1] == "result" and len(found) == 3 and all(set(f) == {"seed", "box"} for f in found)
    assert domain.registry.get_version("tiny", 2).spec["found"] == found
    _, stream = run_job(base, {**spec, "found": found[1:]})
    assert stream[-1][2]["found"] == found[1:]
    assert domain.registry.get_version("tiny", 3).spec["found"] == found[1:]
