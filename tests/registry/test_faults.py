"""Faults: a writer killed midway, corrupt and missing blobs, and the check / gc command."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import multiprocessing
import os
import signal
import subprocess
import sys

import pytest

from rulewright.registry import Registry, errors
from rulewright.registry.errors import Reason
from rulewright.registry.gc import collect, scan
from rulewright.registry.manifests import dumps, format_time, utc_now

from .conftest import REPO, store_spec
from .test_registry import faces
from .test_store_contract import corrupt_blob
from .workers import killed_writer

CTX = multiprocessing.get_context("spawn")


def run_cli(store, *args: str) -> subprocess.CompletedProcess:
    """``python -m rulewright.registry ARGS --store URI`` with the store's S3 settings in the environment."""
    env = dict(os.environ)
    config = getattr(store, "config", None)
    if config is not None:
        env.update(
            {
                "RULEWRIGHT_S3_ENDPOINT": config.endpoint,
                "RULEWRIGHT_S3_ACCESS_KEY": config.access_key,
                "RULEWRIGHT_S3_SECRET_KEY": config.secret_key,
                "RULEWRIGHT_S3_SECURE": "false",
            }
        )
    return subprocess.run(
        [sys.executable, "-m", "rulewright.registry", *args, "--store", store.uri],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )


def test_writer_killed_between_blob_and_manifest_leaves_no_version_and_gc_removes_the_orphan(store):
    registry = faces(Registry(store))
    registry.create_version("faces", parent=1, delta=b"a good edit", spec={})
    doomed = b"the delta of a writer that dies"
    proc = CTX.Process(target=killed_writer, args=(store_spec(store), "faces", 2, doomed))
    proc.start()
    proc.join(timeout=60)
    assert proc.exitcode == -signal.SIGKILL  # it really died, at the injected point

    # No visible version: listing, lookup and the next allocation all behave as if it never ran.
    assert [v.number for v in registry.list_versions("faces").items] == [1, 2]
    with pytest.raises(errors.NotFound):
        registry.get_version("faces", 3)
    orphan = hashlib.sha256(doomed).hexdigest()
    assert store.has_blob(orphan)  # the blob did land before the kill

    report = scan(store)
    assert [b.sha256 for b in report.orphans] == [orphan] and report.ok

    kept = collect(store, grace_s=3600)  # young: maybe an upload in flight
    assert kept.kept == [orphan] and kept.removed == [] and store.has_blob(orphan)
    removed = collect(store, grace_s=0)  # past the grace period
    assert removed.removed == [orphan] and not store.has_blob(orphan)
    assert scan(store).orphans == []
    assert registry.create_version("faces", parent=2, delta=b"next", spec={}).number == 3
    for v in registry.list_versions("faces").items:  # nothing referenced was touched
        for ref in v.blobs.values():
            store.get_blob(ref.sha256)


def test_gc_never_removes_referenced_blobs_and_frees_deleted_ones(store):
    registry = faces(Registry(store))
    v2 = registry.create_version("faces", parent=1, delta=b"kept", spec={})
    v3 = registry.create_version("faces", parent=1, delta=b"deleted", spec={})
    registry.delete_version("faces", 3)
    report = collect(store, grace_s=0)
    assert report.removed == [v3.blobs["delta"].sha256]
    assert store.get_blob(v2.blobs["delta"].sha256) == b"kept"
    assert store.has_blob(registry.get_version("faces", 1).blobs["weights"].sha256)


def test_gc_dry_run_removes_nothing(store):
    registry = faces(Registry(store))
    orphan = store.put_blob(b"orphan")
    report = collect(store, grace_s=0, dry_run=True)
    assert report.removed == [orphan.sha256] and store.has_blob(orphan.sha256)
    assert registry.get_model("faces")


def test_corrupt_blob_is_detected_on_read_and_reported_by_check(store):
    registry = faces(Registry(store))
    v2 = registry.create_version("faces", parent=1, delta=b"the delta", spec={})
    corrupt_blob(store, v2.blobs["delta"].sha256, b"the delta, bit-rotted")
    with pytest.raises(errors.DataLoss) as info:
        store.get_blob(v2.blobs["delta"].sha256)
    assert info.value.reason is Reason.BLOB_CORRUPT

    report = scan(store)
    assert [(p.kind, p.key, p.sha256) for p in report.problems] == [
        ("corrupt_blob", "models/faces/versions/0000000002.json", v2.blobs["delta"].sha256)
    ]
    result = run_cli(store, "check")
    assert result.returncode == 1, result.stderr
    assert "corrupt_blob" in result.stdout and "models/faces/versions/0000000002.json" in result.stdout

    # gc reports but never repairs: the corrupt blob and the manifest stay as they are.
    result = run_cli(store, "gc", "--grace", "0s", "--verify", "--json")
    assert result.returncode == 1, result.stderr
    body = json.loads(result.stdout)
    assert body["problems"][0]["kind"] == "corrupt_blob" and body["removed"] == []
    assert registry.get_version("faces", 2) == v2
    with pytest.raises(errors.DataLoss):
        store.get_blob(v2.blobs["delta"].sha256)


def test_missing_blob_is_reported(store):
    registry = faces(Registry(store))
    v2 = registry.create_version("faces", parent=1, delta=b"will vanish", spec={})
    store.delete_blob(v2.blobs["delta"].sha256)
    report = scan(store, verify=False)
    assert [(p.kind, p.sha256) for p in report.problems] == [("missing_blob", v2.blobs["delta"].sha256)]
    with pytest.raises(errors.NotFound):
        store.get_blob(v2.blobs["delta"].sha256)


def test_unreadable_manifest_is_reported_and_is_data_loss(store):
    registry = faces(Registry(store))
    store.create("models/faces/versions/0000000002.json", b"{not json")
    with pytest.raises(errors.DataLoss) as info:
        registry.get_version("faces", 2)
    assert info.value.reason is Reason.MANIFEST_CORRUPT
    assert [p.kind for p in scan(store).problems] == ["unreadable_manifest"]


def test_check_on_a_clean_store_exits_zero_and_orphans_make_it_fail(store):
    faces(Registry(store))
    result = run_cli(store, "check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip().endswith("ok")
    orphan = store.put_blob(b"left behind")
    result = run_cli(store, "check", "--json")
    assert result.returncode == 1
    assert [o["sha256"] for o in json.loads(result.stdout)["orphans"]] == [orphan.sha256]
    result = run_cli(store, "gc")  # default grace: an hour, so it stays
    assert result.returncode == 0 and store.has_blob(orphan.sha256)
    assert "kept (younger than grace)" in result.stdout


def test_cli_usage_errors_exit_two(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "rulewright.registry", "gc", "--grace", "soon"], capture_output=True, text=True, cwd=REPO
    )
    assert result.returncode == 2 and "not a duration" in result.stderr
    result = subprocess.run(
        [sys.executable, "-m", "rulewright.registry", "check", "--store", "ftp://x"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert result.returncode == 2 and "INVALID_STORE_URI" in result.stderr
    result = subprocess.run([sys.executable, "-m", "rulewright.registry", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "check" in result.stdout and "gc" in result.stdout


def test_stale_deletion_markers_are_collected(file_store):
    registry = faces(Registry(file_store))
    stale = "models/faces/versions/0000000001.deleting.0123abcd.json"
    file_store.create(stale, dumps({"author": "dead", "time": format_time(utc_now() - dt.timedelta(hours=2))}))
    fresh = "models/faces/versions/0000000001.deleting.4567abcd.json"
    file_store.create(fresh, dumps({"author": "busy", "time": format_time(utc_now())}))
    assert scan(file_store).stale_markers == [stale]
    collect(file_store, grace_s=0)
    assert file_store.list_keys("models/faces/versions/0000000001.deleting") == [fresh]
    assert registry.get_version("faces", 1).number == 1
