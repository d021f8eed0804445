"""The blob-store contract, run against every backend (filesystem, and S3 on a real moto_server)."""

from __future__ import annotations

import hashlib
import io
import os

import pytest

from rulewright.registry import errors
from rulewright.registry.blobstore import BlobRef
from rulewright.registry.stores import open_store
from rulewright.registry.errors import Reason
from rulewright.registry.filestore import FileStore
from rulewright.registry.s3store import S3Config, S3Store


def corrupt_blob(store, sha: str, data: bytes) -> None:
    """Overwrite a stored blob's bytes behind the store's back (bit rot, a bad disk, a bad upload)."""
    if isinstance(store, FileStore):
        path = store.root / "blobs" / "sha256" / sha[:2] / sha
        path.write_bytes(data)
    else:
        store._client.put_object(Bucket=store.bucket, Key=store._blob_key(sha), Body=data)


def test_blob_round_trip_is_content_addressed(store):
    data = b"weights" * 1000
    ref = store.put_blob(data)
    assert ref == BlobRef(hashlib.sha256(data).hexdigest(), len(data))
    assert store.get_blob(ref.sha256) == data
    assert store.has_blob(ref.sha256)
    assert store.stat_blob(ref.sha256).size == len(data)
    assert store.put_blob(data) == ref  # same content, same blob
    assert [b.sha256 for b in store.iter_blobs()] == [ref.sha256]


def test_blob_from_a_stream_and_streamed_out(store):
    data = os.urandom(3 << 20)  # several read chunks
    ref = store.put_blob(io.BytesIO(data))
    assert ref.sha256 == hashlib.sha256(data).hexdigest() and ref.size == len(data)
    out = io.BytesIO()
    assert store.read_blob_into(ref.sha256, out) == len(data)
    assert out.getvalue() == data


def test_corrupt_blob_is_data_loss_on_every_read(store):
    ref = store.put_blob(b"the real bytes")
    corrupt_blob(store, ref.sha256, b"the rotten bytes")
    with pytest.raises(errors.DataLoss) as info:
        store.get_blob(ref.sha256)
    assert info.value.reason is Reason.BLOB_CORRUPT and info.value.metadata["sha256"] == ref.sha256
    with pytest.raises(errors.DataLoss):
        store.read_blob_into(ref.sha256, io.BytesIO())
    store.put_blob(b"the real bytes")  # re-storing the content heals it
    assert store.get_blob(ref.sha256) == b"the real bytes"


def test_missing_blob_is_not_found(store):
    sha = hashlib.sha256(b"never stored").hexdigest()
    with pytest.raises(errors.NotFound) as info:
        store.get_blob(sha)
    assert info.value.reason is Reason.BLOB_NOT_FOUND
    assert not store.has_blob(sha) and store.stat_blob(sha) is None
    store.delete_blob(sha)  # idempotent


def test_blob_digest_is_validated(store):
    with pytest.raises(errors.InvalidArgument):
        store.get_blob("../../etc/passwd")


def test_delete_blob(store):
    ref = store.put_blob(b"x")
    store.delete_blob(ref.sha256)
    assert not store.has_blob(ref.sha256)
    assert list(store.iter_blobs()) == []


def test_conditional_create_refuses_an_existing_key_and_keeps_the_first(store):
    store.create("models/a/versions/0000000001.json", b"first")
    with pytest.raises(errors.AlreadyExists) as info:
        store.create("models/a/versions/0000000001.json", b"second")
    assert info.value.reason is Reason.OBJECT_EXISTS
    assert store.read("models/a/versions/0000000001.json") == b"first"


def test_conditional_create_of_the_same_bytes_by_someone_else_still_fails_on_file(file_store):
    # The filesystem has no retried requests, so even identical bytes are someone else's create.
    file_store.create("k/a.json", b"same")
    with pytest.raises(errors.AlreadyExists):
        file_store.create("k/a.json", b"same")


def test_read_and_delete_documents(store):
    with pytest.raises(errors.NotFound) as info:
        store.read("models/none/model.json")
    assert info.value.reason is Reason.OBJECT_NOT_FOUND
    store.create("models/a/model.json", b"{}")
    store.delete("models/a/model.json")
    store.delete("models/a/model.json")  # idempotent
    with pytest.raises(errors.NotFound):
        store.read("models/a/model.json")
    store.create("models/a/model.json", b"again")  # a deleted key can be created again
    assert store.read("models/a/model.json") == b"again"


def test_list_keys_is_sorted_paged_and_prefix_exact(store):
    keys = [
        "models/a/versions/0000000002.json",
        "models/a/versions/0000000001.json",
        "models/a/versions/0000000001.deleted.json",
        "models/a/versions/0000000010.json",
        "models/a/aliases/prod/0000000001.json",
        "models/ab/model.json",
        "models/a/model.json",
    ]
    for k in keys:
        store.create(k, b"{}")
    assert store.list_keys("models/a/versions/") == [
        "models/a/versions/0000000001.deleted.json",
        "models/a/versions/0000000001.json",
        "models/a/versions/0000000002.json",
        "models/a/versions/0000000010.json",
    ]
    assert store.list_keys("models/a/versions/0000000001.") == [
        "models/a/versions/0000000001.deleted.json",
        "models/a/versions/0000000001.json",
    ]
    assert store.list_keys("models/a/versions/", start_after="models/a/versions/0000000001.json", limit=1) == [
        "models/a/versions/0000000002.json"
    ]
    assert store.list_keys("models/a/") == sorted(k for k in keys if k.startswith("models/a/"))
    assert store.list_keys("models/nothing/") == []


def test_list_children_names_folders(store):
    for k in ("models/b/model.json", "models/a/model.json", "models/a/versions/0000000001.json"):
        store.create(k, b"{}")
    assert store.list_children("models/") == ["a", "b"]
    assert store.list_children("models/a/") == ["versions"]
    store.delete("models/b/model.json")  # a folder with nothing left disappears (as on S3)
    assert store.list_children("models/") == ["a"]
    assert store.list_children("nothing/") == []


@pytest.mark.parametrize("key", ["../escape.json", "models/../x", "/abs", "Models/A", "a//b", ""])
def test_unsafe_keys_are_refused(store, key):
    with pytest.raises(errors.InvalidArgument):
        store.create(key, b"{}")


def test_no_abandoned_uploads_on_a_clean_store(store):
    store.put_blob(b"x")
    assert store.abandoned_uploads(0) == []


def test_open_store_by_uri(tmp_path, moto_server):
    fs = open_store(tmp_path.as_uri())
    assert isinstance(fs, FileStore) and fs.root == tmp_path.resolve()
    assert isinstance(open_store(str(tmp_path / "bare")), FileStore)
    s3 = open_store("s3://some-bucket/deep/prefix", s3=moto_server.config())
    assert isinstance(s3, S3Store) and s3.bucket == "some-bucket" and s3.prefix == "deep/prefix"
    with pytest.raises(errors.InvalidArgument) as info:
        open_store("ftp://host/x")
    assert info.value.reason is Reason.INVALID_STORE_URI


def test_s3_config_from_env():
    cfg = S3Config.from_env(
        {
            "RULEWRIGHT_S3_ENDPOINT": "minio:9000",
            "RULEWRIGHT_S3_ACCESS_KEY": "ak",
            "RULEWRIGHT_S3_SECRET_KEY": "sk",
            "RULEWRIGHT_S3_SECURE": "false",
            "RULEWRIGHT_S3_REGION": "eu-west-1",
        }
    )
    assert cfg.endpoint_url() == "http://minio:9000" and cfg.region == "eu-west-1" and cfg.addressing_style == "path"
    assert "sk" not in repr(cfg)
    assert S3Config.from_env({"RULEWRIGHT_S3_ENDPOINT": "minio:9000"}).endpoint_url() == "https://minio:9000"


def test_s3_missing_bucket_is_a_configuration_error(moto_server):
    store = S3Store("no-such-bucket-here", "", moto_server.config())
    with pytest.raises(errors.Internal) as info:
        store.create("models/a/model.json", b"{}")
    assert info.value.reason is Reason.STORE_MISCONFIGURED


def test_s3_unreachable_endpoint_is_unavailable():
    from tests.registry.conftest import free_port

    cfg = S3Config(
        endpoint=f"127.0.0.1:{free_port()}",
        access_key="a",
        secret_key="b",
        secure=False,
        connect_timeout_s=0.5,
        max_attempts=1,
    )
    with pytest.raises(errors.Unavailable) as info:
        S3Store("bucket", "", cfg).read("models/a/model.json")
    assert info.value.reason is Reason.STORE_UNAVAILABLE


def test_s3_sends_a_real_if_none_match(s3_store):
    # What the store's correctness rests on, checked at the wire: a plain boto3 PUT with
    # If-None-Match on an existing key is refused by the server (412) and the object is unchanged.
    import botocore.exceptions

    s3_store.create("models/a/model.json", b"first")
    with pytest.raises(botocore.exceptions.ClientError) as info:
        s3_store._client.put_object(
            Bucket=s3_store.bucket, Key=s3_store._doc_key("models/a/model.json"), Body=b"second", IfNoneMatch="*"
        )
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 412
    assert s3_store.read("models/a/model.json") == b"first"


def test_s3_retried_create_that_met_itself_succeeds(s3_store):
    # botocore retries a PUT whose response was lost; the retry's 412 must not read as a conflict.
    s3_store.create("models/a/model.json", b"mine")
    s3_store.create("models/a/model.json", b"mine")
    with pytest.raises(errors.AlreadyExists):
        s3_store.create("models/a/model.json", b"someone else's")


def test_file_store_leaves_no_temporary_files(file_store):
    file_store.put_blob(b"x")
    file_store.create("a/b.json", b"{}")
    with pytest.raises(errors.AlreadyExists):
        file_store.create("a/b.json", b"{}")
    assert list((file_store.root / "tmp").iterdir()) == []


def test_file_store_reports_and_removes_abandoned_temporaries(file_store):
    leftover = file_store.root / "tmp" / "upload-dead"
    leftover.write_bytes(b"half a blob")
    assert file_store.abandoned_uploads(3600) == []  # young: maybe still being written
    assert file_store.abandoned_uploads(0) == ["upload-dead"]
    file_store.remove_upload("upload-dead")
    assert not leftover.exists()


def test_s3_conflicting_conditional_write_is_retried(s3_store):
    # AWS answers 409 ConditionalRequestConflict while another conditional write of the key is in
    # flight. moto never does (it has no such window), so this one branch is driven by botocore's
    # Stubber: the first attempt conflicts, the retry succeeds.
    from botocore.stub import Stubber

    key = s3_store._doc_key("models/a/model.json")
    with Stubber(s3_store._client) as stub:
        stub.add_client_error("put_object", "ConditionalRequestConflict", http_status_code=409)
        stub.add_response("put_object", {"ETag": '"x"'}, {"Bucket": s3_store.bucket, "Key": key, "Body": b"{}",
                                                         "IfNoneMatch": "*"})
        s3_store.create("models/a/model.json", b"{}")
        stub.assert_no_pending_responses()


def test_s3_large_blob_goes_up_in_parts(s3_store, monkeypatch):
    import rulewright.registry.s3store as s3store

    monkeypatch.setattr(s3store, "_MULTIPART_THRESHOLD", 5 << 20)
    data = os.urandom(6 << 20)
    ref = s3_store.put_blob(io.BytesIO(data))
    head = s3_store._client.head_object(Bucket=s3_store.bucket, Key=s3_store._blob_key(ref.sha256))
    assert "-" in head["ETag"]                    # a multipart ETag: "<md5 of md5s>-<parts>"
    assert s3_store.get_blob(ref.sha256) == data


def test_s3_abandoned_multipart_uploads_are_found_and_aborted(s3_store):
    key = s3_store._blob_key("0" * 64)
    upload = s3_store._client.create_multipart_upload(Bucket=s3_store.bucket, Key=key)["UploadId"]
    # moto reports the same fixed "Initiated" time (2010) for every upload, so the grace period of
    # uploads cannot be exercised here (S3 and MinIO report the real time); the blob grace period
    # is exercised on both stores in test_faults.
    names = s3_store.abandoned_uploads(0)
    assert names == [f"{key}#{upload}"]
    s3_store.remove_upload(names[0])
    assert s3_store.abandoned_uploads(0) == []
