"""rulewright.client.Client against a live server: every method, errors, retries and deadlines.

The server is the real one (``live``: "tiny", a random 32x32 DCGAN, and "faces"); "tiny" keeps
the edits fast, "faces" is used where a call must take long enough to outlive a deadline.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time

import grpc
import numpy as np
import pytest

from rulewright.client import (Client, ContextSearch, Dissection, Preview, Progress, RewriteResult, RulewrightError,
                               StatisticsResult)
from rulewright.service.server.app import create_server
from rulewright.service.server.auth import Token
from tests.builders import TINY_SPEC


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(events) -> tuple[list, RewriteResult]:
    """All events of a rewrite, and its result (which must come last)."""
    events = list(events)
    assert isinstance(events[-1], RewriteResult), events[-1]
    return events, events[-1]


@pytest.fixture
def client(live):
    address, _ = live
    with Client(address, timeout=60) as c:
        yield c


# ---- GeneratorService ------------------------------------------------------------------------

def test_sample_png_and_raw_are_the_same_pixels(client):
    png = client.sample("tiny@production", [0, 1, 2])
    raw = client.sample("tiny/1", [0, 1, 2], format="raw")
    assert [im.seed for im in png] == [0, 1, 2]
    assert {im.version for im in png + raw} == {"models/tiny/versions/1"}
    assert png[0].format == "png" and raw[0].format == "raw"
    for a, b in zip(png, raw):
        assert a.array.shape == (32, 32, 3) and a.array.dtype == np.uint8
        assert np.array_equal(a.array, b.array)            # PNG is lossless: decoding must give the raw bytes
        assert a.image.size == (32, 32)
        assert b.png.startswith(b"\x89PNG")
    assert not np.array_equal(png[0].array, png[1].array)  # seeds really differ


def test_sample_latents(client):
    z = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)
    images = client.sample("tiny", latents=z, format="raw")
    assert len(images) == 2 and images[0].seed is None


def test_layers(client):
    info = client.layers("tiny")
    assert info.version == "models/tiny/versions/1"
    assert info.z_dim == 16 and info.image_resolution == 32
    names = [layer.name for layer in info.layers]
    assert "main.6" in names and info.default_layer in names
    layer = info.layers[names.index("main.6")]
    assert layer.key_shape[0] == 16 and layer.value_shape[0] == 8


def test_dissect_ranks_units_and_returns_maps(client):
    regions = [{"seed": 1, "box": [0, 0, 16, 16]}, {"seed": 2, "box": [8, 8, 24, 24]}]
    result = client.dissect("tiny", regions, layer="main.6", top=3, include_maps=True, threshold_samples=64)
    assert isinstance(result, Dissection) and result.layer == "main.6"
    assert len(result.units) == 3
    ious = [u.iou for u in result.units]
    assert ious == sorted(ious, reverse=True)                 # best first
    assert {(m.unit, m.seed) for m in result.maps} == {(u.unit, s) for u in result.units for s in (1, 2)}
    assert result.maps[0].values.shape == (16, 16)           # main.6's value grid on a 32x32 model
    by_contrast = client.dissect("tiny", regions, layer="main.6", top=0, rank_by="contrast", threshold_samples=64)
    assert len(by_contrast.units) == 8                        # top 0: every unit of the layer
    assert [u.contrast for u in by_contrast.units] == sorted((u.contrast for u in by_contrast.units), reverse=True)


def test_search_context(client):
    result = client.search_context("tiny", [{"seed": 2, "box": [8, 8, 16, 16]}], seeds=range(8), layer="main.6",
                                   top=4, stats_samples=64, include_maps=True)
    assert isinstance(result, ContextSearch) and len(result.matches) == 4
    scores = [m.score for m in result.matches]
    assert scores == sorted(scores, reverse=True)
    assert result.matches[0].response is not None and result.matches[0].response.ndim == 2
    ranged = client.search_context("tiny", [{"seed": 2, "box": [8, 8, 16, 16]}], seed_range=(0, 8), layer="main.6",
                                   top=4, stats_samples=64)
    assert [m.seed for m in ranged.matches] == [m.seed for m in result.matches]   # same candidates, same ranking


def test_statistics_progress_then_cached(client):
    events = list(client.statistics("tiny", layer="main.6", samples=64))
    assert isinstance(events[-1], StatisticsResult) and not events[-1].cached
    assert all(isinstance(e, Progress) and e.stage == "statistics" for e in events[:-1]) and len(events) > 1
    again = list(client.statistics("tiny", layer="main.6", samples=64))
    assert again[-1].cached and again[-1].cache_key == events[-1].cache_key


def test_rewrite_streams_progress_preview_then_version(client):
    events, result = run(client.rewrite("tiny@production", TINY_SPEC, preview_seeds=[5, 6]))
    optimize = [e for e in events if isinstance(e, Progress) and e.stage == "optimize"]
    assert optimize and optimize[-1].steps == 60 and optimize[-1].loss is not None
    previews = [e for e in events if isinstance(e, Preview)]
    assert len(previews) == 1 and [im.seed for im in previews[0].images] == [5, 6]
    assert result.version is not None and result.version.number == 2 and result.version.kind == "edit"
    assert result.parent == "models/tiny/versions/1" and result.spec["rank"] == 2
    assert result.version.request_id.startswith("rwc-")      # generated, so a retry is safe
    # the preview is what the committed version renders
    after = client.sample("tiny/2", [5, 6])
    assert [im.array.tobytes() for im in after] == [im.array.tobytes() for im in previews[0].images]
    before = client.sample("tiny/1", [2])[0]
    assert not np.array_equal(before.array, client.sample("tiny/2", [2])[0].array)   # the pasted seed changed


def test_rewrite_request_id_makes_a_retry_return_the_same_version(client):
    _, first = run(client.rewrite("tiny", TINY_SPEC, request_id="client-test-1"))
    events, second = run(client.rewrite("tiny/1", TINY_SPEC, request_id="client-test-1"))
    assert second.version.number == first.version.number
    assert events == [second]                                 # a replay sends only the result
    assert [v.number for v in client.versions("tiny")] == [1, 2]


def test_rewrite_result_carries_the_strength_curve_and_a_retry_returns_the_same(client):
    _, first = run(client.rewrite("tiny", TINY_SPEC, request_id="client-curve-1"))
    _, second = run(client.rewrite("tiny", TINY_SPEC, request_id="client-curve-1"))
    curve = first.strength_curve
    assert curve is not None and len(curve.points) >= 3 and curve.rule
    assert curve.chosen in [p.strength for p in curve.points]
    assert [p.side_effect for p in curve.points] == [p["side_effect"] for p in first.metrics["strength_curve"]["points"]]
    assert second.strength_curve == curve                     # the stored version's curve


def test_rewrite_dry_run_commits_nothing(client):
    _, result = run(client.rewrite("tiny", {**TINY_SPEC, "steps": 30}, dry_run=True))
    assert result.dry_run and result.version is None and result.metrics
    assert [v.number for v in client.versions("tiny")] == [1]


def test_rewrite_bad_box_names_the_field(client):
    bad = {**TINY_SPEC, "paste": [{"seed": 2, "box": [8, 8, 99, 99]}]}
    with pytest.raises(RulewrightError) as info:
        list(client.rewrite("tiny", bad))
    err = info.value
    assert err.code is grpc.StatusCode.INVALID_ARGUMENT and err.reason == "INVALID_ARGUMENT"
    assert [f for f, _ in err.field_violations] == ["spec.paste[0].box"]
    assert "99" in err.field_violations[0][1]
    assert "spec.paste[0].box" in str(err)


def test_rewrite_spec_errors_found_before_sending(client):
    with pytest.raises(ValueError, match="^colour: unknown field$"):
        list(client.rewrite("tiny", {**TINY_SPEC, "colour": "red"}))
    with pytest.raises(ValueError, match="goal"):
        list(client.rewrite("tiny", {**TINY_SPEC, "goal": "pixels"}))


def test_leaving_a_rewrite_early_cancels_it(client):
    stream = client.rewrite("tiny", {**TINY_SPEC, "steps": 100_000})   # minutes, if it ran to the end
    first = next(stream)
    assert isinstance(first, Progress)
    assert _rewrite_workers()
    stream.close()                                            # cancels the call: nothing may be committed
    deadline = time.time() + 30
    while time.time() < deadline and any(w.is_alive() for w in _rewrite_workers()):
        time.sleep(0.1)
    assert not any(w.is_alive() for w in _rewrite_workers())  # the server stopped the edit
    assert [v.number for v in client.versions("tiny")] == [1]


def _rewrite_workers():
    """The server's running Rewrite threads (its GeneratorServicer keeps them)."""
    import gc

    from rulewright.service.server.servicers import GeneratorServicer
    return [w for s in gc.get_objects() if type(s) is GeneratorServicer for w in s.workers]


# ---- RegistryService -------------------------------------------------------------------------

def test_models_model_versions_version(client):
    models = {m.id: m for m in client.models()}
    assert {"faces", "tiny"} <= set(models)
    tiny = client.model("tiny")
    assert tiny.arch == "dcgan" and tiny.latest_version == 1 and tiny.aliases["production"].version == 1
    assert tiny.config == models["tiny"].config and tiny.config
    [v1] = client.versions("tiny")
    assert v1.kind == "import" and v1.number == 1 and v1.lineage == [1]
    assert client.version("tiny", 1) == v1
    with pytest.raises(RulewrightError) as info:
        client.version("tiny", 9)
    assert info.value.code is grpc.StatusCode.NOT_FOUND and info.value.reason == "VERSION_NOT_FOUND"


def test_set_alias_compare_and_set_history_and_rollback(client):
    originals = client.sample("tiny@production", [3, 4])
    _, result = run(client.rewrite("tiny", TINY_SPEC))
    assert client.alias("tiny", "production").version == 1
    with pytest.raises(RulewrightError) as info:              # someone else's expectation: refused
        client.set_alias("tiny", "production", 2, expected_version=7)
    assert info.value.code is grpc.StatusCode.ABORTED and info.value.reason == "ALIAS_CONFLICT"
    moved = client.set_alias("tiny", "production", result.version.number, reason="promote")
    assert moved.version == 2 and client.aliases("tiny")["production"].etag == moved.etag
    staging = client.set_alias("tiny", "staging", 1, expected_version=0)
    assert staging.version == 1 and set(client.aliases("tiny")) == {"production", "staging"}

    back = client.rollback("tiny")
    assert back.version == 1
    rolled = client.sample("tiny@production", [3, 4])
    assert [im.png for im in rolled] == [im.png for im in originals]   # the original pixels, exactly
    history = client.alias_history("tiny", "production")
    assert [(m.from_version, m.to_version) for m in history][-2:] == [(1, 2), (2, 1)]
    assert history[-2].reason == "promote" and history[-1].reason == "rollback to version 1"
    assert client.rollback("tiny").version == 2                # like `cd -`: forward again

    with pytest.raises(RulewrightError) as info:               # staging has only ever been at 1
        client.rollback("tiny", "staging")
    assert info.value.code is grpc.StatusCode.FAILED_PRECONDITION and info.value.reason == "NO_EARLIER_VERSION"


def test_rollback_refuses_if_the_alias_moved_meanwhile(client):
    run(client.rewrite("tiny", TINY_SPEC))
    seen = client.set_alias("tiny", "production", 2)
    client.set_alias("tiny", "production", 1, reason="someone else")
    with pytest.raises(RulewrightError) as info:
        client.rollback("tiny", etag=seen.etag)               # the state this caller saw is gone
    assert info.value.code is grpc.StatusCode.ABORTED and info.value.reason == "ALIAS_CONFLICT"
    assert client.alias("tiny", "production").version == 1    # nothing undone blindly
    assert [m.reason for m in client.alias_history("tiny")][-1] == "someone else"


def test_rollback_is_one_rollback_alias_call_pinned_to_the_state_read(client, monkeypatch):
    run(client.rewrite("tiny", TINY_SPEC))
    client.set_alias("tiny", "production", 2)
    calls = []
    send = client._unary
    monkeypatch.setattr(client, "_unary", lambda method, *a, **k: calls.append((method, a[1])) or send(method, *a, **k))
    back = client.rollback("tiny", reason="bad edit")
    assert [m for m, _ in calls] == ["GetModel", "RollbackAlias"]       # no history read, no SetAlias
    sent = calls[-1][1]
    assert (sent.name, sent.reason) == ("models/tiny/aliases/production", "bad edit") and sent.etag
    assert back.version == 1 and client.alias_history("tiny")[-1].reason == "bad edit"


def test_export_writes_verified_weights(client, tmp_path):
    done = client.export("tiny", 1, tmp_path / "tiny-v1.safetensors")
    data = (tmp_path / "tiny-v1.safetensors").read_bytes()
    assert len(data) == done.size_bytes and hashlib.sha256(data).hexdigest() == done.sha256
    assert done.version.number == 1 and not (tmp_path / "tiny-v1.safetensors.part").exists()
    from safetensors.numpy import load
    assert "main.6.weight" in load(data)


def test_export_refuses_corrupt_bytes(client, tmp_path, monkeypatch):
    real = client._reg.ExportVersion

    class Tampered:
        def __init__(self, call):
            self.call = call

        def __iter__(self):
            for msg in self.call:
                if msg.WhichOneof("content") == "chunk":
                    msg.chunk = msg.chunk[:-1] + bytes([msg.chunk[-1] ^ 1])   # one bit flipped in transit
                yield msg

        def cancel(self):
            self.call.cancel()

    monkeypatch.setattr(client._reg, "ExportVersion", lambda *a, **k: Tampered(real(*a, **k)))
    with pytest.raises(RulewrightError) as info:
        client.export("tiny", 1, tmp_path / "bad.safetensors")
    assert info.value.code is grpc.StatusCode.DATA_LOSS
    assert not (tmp_path / "bad.safetensors").exists() and not (tmp_path / "bad.safetensors.part").exists()


def test_import_model_then_delete(client, tmp_path):
    client.export("tiny", 1, tmp_path / "w.safetensors")
    tiny = client.model("tiny")
    made = client.import_model("tiny-copy", tmp_path / "w.safetensors", arch=tiny.arch, config=tiny.config,
                               description="a copy")
    assert made.model.id == "tiny-copy" and made.version.number == 1 and made.version.kind == "import"
    same = [im.png for im in client.sample("tiny-copy/1", [0, 1])]
    assert same == [im.png for im in client.sample("tiny/1", [0, 1])]   # the same weights render the same
    with pytest.raises(RulewrightError) as info:
        client.delete_model("tiny-copy")
    assert info.value.code is grpc.StatusCode.FAILED_PRECONDITION
    client.delete_model("tiny-copy", force=True)
    assert "tiny-copy" not in {m.id for m in client.models()}


def test_delete_version(client):
    _, result = run(client.rewrite("tiny", TINY_SPEC))
    client.delete_version("tiny", result.version.number, reason="bad edit")
    assert [v.number for v in client.versions("tiny")] == [1]


def test_errors_carry_code_reason_and_message(client):
    with pytest.raises(RulewrightError) as info:
        client.sample("nope", [0])
    err = info.value
    assert err.code is grpc.StatusCode.NOT_FOUND and err.reason == "MODEL_NOT_FOUND" and "nope" in err.message
    with pytest.raises(RulewrightError) as info:
        client.sample("tiny", [-1])
    assert info.value.field_violations and info.value.field_violations[0][0] == "seeds[0]"


def test_token_is_sent(live):
    _, domain = live
    server, port = create_server(domain, tokens=[Token(b"s3cret", "reader", "ci")])
    try:
        with Client(f"127.0.0.1:{port}") as anonymous:
            with pytest.raises(RulewrightError) as info:
                anonymous.layers("tiny")
            assert info.value.code is grpc.StatusCode.UNAUTHENTICATED and info.value.reason == "TOKEN_MISSING"
        with Client(f"127.0.0.1:{port}", "s3cret") as reader:
            assert reader.layers("tiny").z_dim == 16
            with pytest.raises(RulewrightError) as info:
                list(reader.rewrite("tiny", TINY_SPEC))
            assert info.value.code is grpc.StatusCode.PERMISSION_DENIED
    finally:
        server.stop(0).wait()


# ---- retries and deadlines -------------------------------------------------------------------

def test_retries_until_a_late_server_comes_up(live):
    _, domain = live
    port = free_port()
    started = []

    def start_later():
        time.sleep(1.5)
        started.append(create_server(domain, address=f"127.0.0.1:{port}")[0])

    threading.Thread(target=start_later, daemon=True).start()
    retries = []
    try:
        with Client(f"127.0.0.1:{port}", retries=30, backoff=0.1, max_backoff=0.4, on_retry=retries.append) as c:
            assert c.layers("tiny").z_dim == 16
        assert retries and {r.method for r in retries} == {"ListLayers"}
        assert all(r.error.code is grpc.StatusCode.UNAVAILABLE for r in retries)
        assert [r.attempt for r in retries] == list(range(1, len(retries) + 1))
    finally:
        for s in started:
            s.stop(0).wait()


def test_retries_across_a_restart_on_the_same_port(live):
    _, domain = live
    port = free_port()
    server, _ = create_server(domain, address=f"127.0.0.1:{port}")
    restarted = []
    retries = []
    with Client(f"127.0.0.1:{port}", retries=30, backoff=0.1, max_backoff=0.4, on_retry=retries.append) as c:
        before = c.sample("tiny", [7])[0].png
        server.stop(0).wait()

        def restart():
            time.sleep(1.0)
            restarted.append(create_server(domain, address=f"127.0.0.1:{port}")[0])

        threading.Thread(target=restart, daemon=True).start()
        try:
            _, result = run(c.rewrite("tiny", TINY_SPEC))       # a stream, retried with its request_id
            assert c.sample("tiny/1", [7])[0].png == before
        finally:
            for s in restarted:
                s.stop(0).wait()
    assert retries and retries[0].method == "Rewrite"
    assert result.version.number == 2


def test_retries_give_up_after_the_budget():
    retries = []
    started = time.monotonic()
    with Client(f"127.0.0.1:{free_port()}", retries=2, backoff=0.05, on_retry=retries.append) as c:
        with pytest.raises(RulewrightError) as info:
            c.models()
    assert info.value.code is grpc.StatusCode.UNAVAILABLE
    assert [r.attempt for r in retries] == [1, 2]             # 3 attempts in all, then the error
    assert time.monotonic() - started < 10


def test_deadline_bounds_the_retries_too():
    retries = []
    started = time.monotonic()
    with Client(f"127.0.0.1:{free_port()}", timeout=1.0, retries=1000, backoff=0.05, max_backoff=0.2,
                on_retry=retries.append) as c:
        with pytest.raises(RulewrightError) as info:
            c.models()
    elapsed = time.monotonic() - started
    assert info.value.code is grpc.StatusCode.UNAVAILABLE and len(retries) >= 2
    assert elapsed < 2.5                                      # not 1000 retries: the call's deadline wins


def test_deadline_is_honored_and_not_retried(live):
    address, _ = live
    retries = []
    with Client(address, timeout=0.05, on_retry=retries.append) as c:
        started = time.monotonic()
        with pytest.raises(RulewrightError) as info:
            c.sample("faces", list(range(64)))             # max_images: slower than 50 ms
        assert info.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 2.0
        started = time.monotonic()
        with pytest.raises(RulewrightError) as info:
            list(c.rewrite("faces", {"copy": {"seed": 35, "box": [8, 22, 56, 38]},
                                     "paste": [{"seed": 1, "box": [8, 22, 56, 38]}], "steps": 500}, timeout=1.0))
        assert info.value.code is grpc.StatusCode.DEADLINE_EXCEEDED
        assert time.monotonic() - started < 4.0
    assert retries == []
    with Client(address) as c:
        time.sleep(0.5)
        assert [v.number for v in c.versions("faces")] == [1]   # an expired rewrite commits nothing
