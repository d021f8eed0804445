"""The S3 store: blobs and documents in one bucket under a prefix; works against MinIO and AWS S3.

- ``S3Config``: endpoint, credentials, region, TLS and addressing; ``S3Config.from_env()`` reads
  ``RULEWRIGHT_S3_ENDPOINT``, ``RULEWRIGHT_S3_ACCESS_KEY``, ``RULEWRIGHT_S3_SECRET_KEY``,
  ``RULEWRIGHT_S3_REGION``, ``RULEWRIGHT_S3_SECURE``, ``RULEWRIGHT_S3_CA_BUNDLE``,
  ``RULEWRIGHT_S3_ADDRESSING_STYLE``.
- ``S3Store(bucket, prefix, config)``: keys ``<prefix>/blobs/sha256/<sha>`` and ``<prefix>/docs/<key>``;
  ``ensure_bucket()`` creates the bucket (deployment setup and tests; the store never does it
  implicitly, so a typo in a bucket name fails loudly instead of writing somewhere new).

Every call is bounded: botocore's connect and read timeouts and a bounded number of attempts
(``S3Config``), and on top of them ``call_timeout_s`` for the whole call and whatever is left of
the caller's deadline (``blobstore.call_deadline``, which the gRPC servicers set from the RPC's deadline):
the call runs on a small thread pool and the caller stops waiting when its time is up
(``STORE_UNAVAILABLE``). After such a failure the store counts as *down*: calls fail at once,
except ``probe()`` (the server's store watch calls it every few seconds) and, when nothing has
tried for ``RETRY_S``, one caller; the first success brings it back (``available()``), so a hung
server cannot hold every request thread.

Why boto3 and not the ``minio`` client: the registry's correctness rests on *real* conditional
creates (``If-None-Match: *``): version numbers and alias history entries are allocated by them.
``minio.Minio.put_object`` cannot send that header: it turns unknown headers into
``x-amz-meta-*`` user metadata, so the PUT overwrites (measured). Its lower-level ``_execute``
does send it, but it is private API that may change in any release. boto3's
``put_object(IfNoneMatch="*")`` is public, documented by AWS and MinIO, and enforced by
``moto_server`` (the tests check that a second create of a key fails with 412 and leaves the first
content). Against MinIO it needs path-style addressing (the default here) and SigV4.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import threading
import time
from typing import Any, BinaryIO, Callable, Iterator

from rulewright.registry import errors
from rulewright.registry.blobstore import (
    CHUNK,
    BlobInfo,
    BlobRef,
    BlobStore,
    call_deadline,
    check_key,
    check_sha256,
    deadline_left,
)
from rulewright.registry.errors import Reason

log = logging.getLogger(__name__)

# Above this size a blob goes up in parts (S3 refuses single PUTs over 5 GB; parts also retry
# separately). Manifests and deltas are far below it; only large base weights use it.
_MULTIPART_THRESHOLD = 256 << 20
# Uploads up to this size (deltas, kilobytes) are bounded like every other call; larger ones (base
# weights) only by the caller's deadline and botocore's timeouts, since their time grows with size.
_BOUNDED_UPLOAD = 1 << 20
# AWS answers 409 ConditionalRequestConflict while another conditional write to the same key is
# in flight; the outcome is then decided by retrying.
_CONFLICT_RETRIES = 6

_NOT_FOUND_CODES = {"NoSuchKey", "NotFound", "404"}
_PRECONDITION_CODES = {"PreconditionFailed", "412"}
_CONFLICT_CODES = {"ConditionalRequestConflict", "OperationAborted"}
_MISCONFIGURED_CODES = {
    "NoSuchBucket",
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "AuthorizationHeaderMalformed",
    "InvalidBucketName",
    "PermanentRedirect",
    "InvalidArgument",
    "InvalidRequest",
    "NotImplemented",
}


_POOL_THREADS = 16         # concurrent S3 calls per store; a hung server holds at most these (and only briefly)


def _truthy(text: str | None, default: bool) -> bool:
    if text is None or text == "":
        return default
    return text.strip().lower() in ("1", "true", "yes", "on")


@dataclasses.dataclass
class S3Config:
    """How to reach an S3-compatible server (MinIO, AWS S3, moto_server)."""

    endpoint: str | None = None    # "host:port" or a URL; None: AWS's regional endpoint
    access_key: str | None = None  # None: boto3's default chain (env, profile, instance role)
    secret_key: str | None = None
    region: str = "us-east-1"       # MinIO ignores it, but SigV4 signs it
    secure: bool = True             # https for an endpoint given without a scheme
    ca_bundle: str | None = None    # PEM file to verify the server with (private CAs)
    addressing_style: str = "path"  # "path" for MinIO and most self-hosted servers; "virtual" for AWS
    connect_timeout_s: float = 2.0
    read_timeout_s: float = 5.0     # per socket read: a stalled response fails the attempt
    max_attempts: int = 2  # botocore retries of throttling, 5xx, timeouts and dropped connections
    call_timeout_s: float = 5.0     # one call, retries included; a caller's deadline may shorten it

    @classmethod
    def from_env(cls, environ: dict | None = None) -> "S3Config":
        """A config from the ``RULEWRIGHT_S3_*`` environment variables (unset ones keep the defaults)."""
        env = os.environ if environ is None else environ
        return cls(
            endpoint=env.get("RULEWRIGHT_S3_ENDPOINT") or None,
            access_key=env.get("RULEWRIGHT_S3_ACCESS_KEY") or None,
            secret_key=env.get("RULEWRIGHT_S3_SECRET_KEY") or None,
            region=env.get("RULEWRIGHT_S3_REGION") or "us-east-1",
            secure=_truthy(env.get("RULEWRIGHT_S3_SECURE"), True),
            ca_bundle=env.get("RULEWRIGHT_S3_CA_BUNDLE") or None,
            addressing_style=env.get("RULEWRIGHT_S3_ADDRESSING_STYLE") or "path",
        )

    def endpoint_url(self) -> str | None:
        """The endpoint as a URL (the scheme follows ``secure`` when none is given)."""
        if not self.endpoint:
            return None
        if "://" in self.endpoint:
            return self.endpoint
        return f"{'https' if self.secure else 'http'}://{self.endpoint}"

    def __repr__(self) -> str:  # never print the secret
        return f"S3Config(endpoint={self.endpoint!r}, region={self.region!r}, secure={self.secure})"


class S3Store(BlobStore):
    """Blobs and documents in ``bucket`` under ``prefix``, through boto3 (see the module docstring)."""

    RETRY_S = 5.0     # while down, a caller tries the server itself at most this often (probes always may)

    def __init__(self, bucket: str, prefix: str = "", config: S3Config | None = None):
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.config = config or S3Config.from_env()
        self.uri = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._base = f"{self.prefix}/" if self.prefix else ""
        botocfg = Config(
            signature_version="s3v4",
            s3={"addressing_style": self.config.addressing_style},
            connect_timeout=self.config.connect_timeout_s,
            read_timeout=self.config.read_timeout_s,
            retries={"max_attempts": self.config.max_attempts, "mode": "standard"},
            # botocore >= 1.36 adds CRC trailers to every upload by default, which several
            # S3-compatible servers (older MinIO releases among them) reject; reads are verified
            # by sha256 here anyway.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self._pool = concurrent.futures.ThreadPoolExecutor(_POOL_THREADS, thread_name_prefix="s3")
        self._down_since: float | None = None       # monotonic time of the failure that took it down
        self._down_reason = ""
        self._trial = threading.Lock()              # held by the one call that tries a down server
        self._last_try = 0.0                        # monotonic time a try of the down server last ended
        secure = (self.config.endpoint_url() or "https://").startswith("https://")
        self._client = boto3.session.Session().client(
            "s3",
            endpoint_url=self.config.endpoint_url(),
            aws_access_key_id=self.config.access_key,
            aws_secret_access_key=self.config.secret_key,
            region_name=self.config.region,
            use_ssl=secure,
            verify=(self.config.ca_bundle or True) if secure else None,
            config=botocfg,
        )

    def __repr__(self) -> str:
        return f"S3Store({self.uri!r}, {self.config!r})"

    # ---- bounded calls -----------------------------------------------------------------------

    def available(self) -> bool:
        """False from a call that timed out or could not connect until the next one that succeeds."""
        return self._down_since is None

    def probe(self, timeout_s: float = 2.0) -> bool:
        """One cheap call (HEAD the bucket) that may bring a down store back; whether it answered."""
        try:
            with call_deadline(timeout_s):
                self._call(self._client.head_bucket, Bucket=self.bucket, always_try=True)
        except Exception:  # noqa: BLE001 -- a refusal (403, 404) is an answer; _call marked a silence down
            pass
        return self.available()

    def _call(self, fn: Callable[..., Any], *args: Any, whole_call_bound: bool = True, always_try: bool = False,
              **kw: Any) -> Any:
        """``fn(*args, **kw)`` on the pool, waited for at most ``call_timeout_s`` and the caller's deadline.

        ``whole_call_bound`` False (large uploads) leaves only the caller's deadline and botocore's
        own timeouts. While the store is down a call fails at once, unless no call has tried the
        server for ``RETRY_S`` (or ``always_try``: a probe) and no other is trying it now. Raises
        ``Unavailable`` when the time is up or the store is down; botocore's exceptions pass
        through for ``_translate``.
        """
        from botocore.exceptions import ClientError, ConnectionClosedError, ReadTimeoutError
        from botocore.exceptions import ConnectionError as BotoConnectionError

        budget = self.config.call_timeout_s if whole_call_bound else None
        left = deadline_left()
        if left is not None:
            left -= min(0.5, 0.1 * left)            # give up a moment early: the caller can still answer UNAVAILABLE
            budget = left if budget is None else min(budget, left)
        if budget is not None and budget <= 0:
            raise errors.Unavailable(Reason.STORE_UNAVAILABLE, "no time left for an S3 call before the deadline")
        trial = False
        if self._down_since is not None:
            if always_try or time.monotonic() - self._last_try >= self.RETRY_S:
                trial = self._trial.acquire(blocking=False)
            if not trial:
                raise errors.Unavailable(
                    Reason.STORE_UNAVAILABLE,
                    f"S3 has been unreachable for {time.monotonic() - self._down_since:.0f} s ({self._down_reason})",
                )
        if trial:
            self._last_try = time.monotonic()
        try:
            future = self._pool.submit(fn, *args, **kw)
            try:
                result = future.result(timeout=budget)
            except concurrent.futures.TimeoutError:
                self._mark_down(f"no answer within {budget:.1f} s")
                raise errors.Unavailable(
                    Reason.STORE_UNAVAILABLE, f"S3 did not answer within {budget:.1f} s", timeout_s=f"{budget:.1f}"
                ) from None
            except (BotoConnectionError, ReadTimeoutError, ConnectionClosedError) as exc:   # no answer
                self._mark_down(type(exc).__name__)
                raise
            except ClientError:               # an answer, if a refusal: the server is there
                self._mark_up()
                raise
            self._mark_up()
            return result
        finally:
            if trial:
                self._last_try = time.monotonic()   # from its end: a caller after a failed try fails fast
                self._trial.release()

    def _mark_up(self) -> None:
        if self._down_since is not None:
            log.warning("S3 reachable again", extra={"event": "store_up", "store": self.uri})
        self._down_since = None

    def _mark_down(self, reason: str) -> None:
        if self._down_since is None:
            log.warning("S3 unreachable", extra={"event": "store_down", "store": self.uri, "reason": reason})
            self._down_since = time.monotonic()
        self._down_reason = reason
        self._last_try = time.monotonic()

    # ---- helpers -----------------------------------------------------------------------------

    def _blob_key(self, sha: str) -> str:
        return f"{self._base}blobs/sha256/{sha}"

    def _doc_key(self, key: str) -> str:
        return f"{self._base}docs/{check_key(key)}"

    def _translate(
        self, exc: Exception, what: str, not_found: Reason = Reason.OBJECT_NOT_FOUND, **meta
    ) -> errors.RegistryError:
        """A botocore exception as the registry error it means (the store boundary)."""
        from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            message = exc.response.get("Error", {}).get("Message", "") or code
            if code in _NOT_FOUND_CODES or (status == 404 and code not in _MISCONFIGURED_CODES):
                return errors.error(not_found, f"{what}: not found", **meta)
            if code in _MISCONFIGURED_CODES or (400 <= status < 500 and status not in (408, 429)):
                return errors.Internal(
                    Reason.STORE_MISCONFIGURED,
                    f"S3 refused to {what}: {code} {message}",
                    s3_code=code,
                    bucket=self.bucket,
                )
            return errors.Unavailable(Reason.STORE_UNAVAILABLE, f"S3 failed to {what}: {code} {message}", s3_code=code)
        if isinstance(exc, NoCredentialsError):
            return errors.Internal(Reason.STORE_MISCONFIGURED, f"no S3 credentials to {what}")
        if isinstance(exc, BotoCoreError):
            return errors.Unavailable(Reason.STORE_UNAVAILABLE, f"S3 unreachable to {what}: {exc}")
        raise exc

    @staticmethod
    def _code(exc: Exception) -> str:
        from botocore.exceptions import ClientError

        if isinstance(exc, ClientError):
            return str(exc.response.get("Error", {}).get("Code", ""))
        return ""

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (setup, not used by the store's operations)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._call(self._client.head_bucket, Bucket=self.bucket)
            return
        except ClientError as exc:
            if self._code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                raise self._translate(exc, f"check bucket {self.bucket}") from exc
        except BotoCoreError as exc:
            raise self._translate(exc, f"check bucket {self.bucket}") from exc
        try:
            kwargs = {}
            if self.config.region and self.config.region != "us-east-1":
                kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.config.region}
            self._call(self._client.create_bucket, Bucket=self.bucket, **kwargs)
        except ClientError as exc:
            if self._code(exc) not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                raise self._translate(exc, f"create bucket {self.bucket}") from exc
        except BotoCoreError as exc:
            raise self._translate(exc, f"create bucket {self.bucket}") from exc

    # ---- blobs -------------------------------------------------------------------------------

    def _write_blob(self, ref: BlobRef, body: bytes | BinaryIO) -> None:
        # No existence check first: re-uploading refreshes LastModified, which keeps a GC running
        # right now from deleting a blob our manifest is about to reference, and replaces a copy
        # that rotted. Content-addressing makes the overwrite harmless.
        from botocore.exceptions import BotoCoreError, ClientError

        key = self._blob_key(ref.sha256)
        try:
            if isinstance(body, bytes) or ref.size <= _MULTIPART_THRESHOLD:
                self._call(self._client.put_object, Bucket=self.bucket, Key=key, Body=body,
                           whole_call_bound=ref.size <= _BOUNDED_UPLOAD)
            else:
                from boto3.s3.transfer import TransferConfig

                self._call(self._client.upload_fileobj, body, self.bucket, key, whole_call_bound=False,
                           Config=TransferConfig(multipart_threshold=_MULTIPART_THRESHOLD))
        except (ClientError, BotoCoreError) as exc:
            raise self._translate(exc, f"write blob {ref.sha256}") from exc

    def _blob_chunks(self, sha256: str) -> Iterator[bytes]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            body = self._call(self._client.get_object, Bucket=self.bucket, Key=self._blob_key(sha256))["Body"]
        except (ClientError, BotoCoreError) as exc:
            raise self._translate(exc, f"read blob {sha256}", Reason.BLOB_NOT_FOUND, sha256=sha256) from exc
        return self._stream(body, sha256)

    def _stream(self, body, sha256: str) -> Iterator[bytes]:
        from botocore.exceptions import BotoCoreError

        try:
            with body:
                yield from body.iter_chunks(CHUNK)
        except (BotoCoreError, OSError) as exc:
            raise errors.Unavailable(Reason.STORE_UNAVAILABLE, f"S3 read of blob {sha256} broke off: {exc}") from exc

    def has_blob(self, sha256: str) -> bool:
        """HEAD the blob."""
        return self.stat_blob(sha256) is not None

    def stat_blob(self, sha256: str) -> BlobInfo | None:
        """HEAD the blob: its size and LastModified."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            head = self._call(self._client.head_object, Bucket=self.bucket, Key=self._blob_key(check_sha256(sha256)))
        except (ClientError, BotoCoreError) as exc:
            err = self._translate(exc, f"check blob {sha256}", Reason.BLOB_NOT_FOUND)
            if isinstance(err, errors.NotFound):
                return None
            raise err from exc
        return BlobInfo(sha256, int(head["ContentLength"]), head["LastModified"].timestamp())

    def delete_blob(self, sha256: str) -> None:
        """DELETE the blob (S3 deletes are idempotent)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._call(self._client.delete_object, Bucket=self.bucket, Key=self._blob_key(check_sha256(sha256)))
        except (ClientError, BotoCoreError) as exc:
            raise self._translate(exc, f"delete blob {sha256}") from exc

    def iter_blobs(self) -> Iterator[BlobInfo]:
        """List the blob prefix."""
        base = self._blob_key("")
        for obj in self._list(base):
            sha = obj["Key"][len(base) :]
            if len(sha) == 64:
                yield BlobInfo(sha, int(obj["Size"]), obj["LastModified"].timestamp())

    def _list(self, prefix: str, start_after: str = "", delimiter: str = "") -> Iterator[dict]:
        from botocore.exceptions import BotoCoreError, ClientError

        kwargs = {"Bucket": self.bucket, "Prefix": prefix}
        if start_after:
            kwargs["StartAfter"] = start_after
        if delimiter:
            kwargs["Delimiter"] = delimiter
        while True:     # page by page, each page one bounded call (a paginator's calls would not be)
            try:
                page = self._call(self._client.list_objects_v2, **kwargs)
            except (ClientError, BotoCoreError) as exc:
                raise self._translate(exc, f"list {prefix}") from exc
            yield from page.get("CommonPrefixes" if delimiter else "Contents", [])
            if not page.get("IsTruncated") or not page.get("NextContinuationToken"):
                return
            kwargs["ContinuationToken"] = page["NextContinuationToken"]

    # ---- documents ---------------------------------------------------------------------------

    def create(self, key: str, data: bytes) -> None:
        """``PutObject`` with ``If-None-Match: *``: S3, MinIO and moto refuse it (412) when the key exists."""
        from botocore.exceptions import BotoCoreError, ClientError

        full = self._doc_key(key)
        for attempt in range(_CONFLICT_RETRIES):
            try:
                self._call(self._client.put_object, Bucket=self.bucket, Key=full, Body=bytes(data), IfNoneMatch="*")
                return
            except ClientError as exc:
                code = self._code(exc)
                if code in _PRECONDITION_CODES:
                    # botocore retries a PUT whose response was lost; the retry then meets our own
                    # first write. Same bytes means it was us: the create succeeded.
                    if self._read_or_none(full) == bytes(data):
                        log.info("conditional create met its own earlier attempt", extra={"key": key})
                        return
                    raise errors.AlreadyExists(Reason.OBJECT_EXISTS, f"{key} already exists", key=key) from None
                if code in _CONFLICT_CODES and attempt < _CONFLICT_RETRIES - 1:
                    time.sleep(0.01 * 2**attempt)
                    continue
                raise self._translate(exc, f"create {key}") from exc
            except BotoCoreError as exc:
                raise self._translate(exc, f"create {key}") from exc
        raise errors.Unavailable(Reason.STORE_UNAVAILABLE, f"create {key}: conflicting writes did not settle")

    def _read_or_none(self, full: str) -> bytes | None:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return self._call(lambda: self._client.get_object(Bucket=self.bucket, Key=full)["Body"].read())
        except (ClientError, BotoCoreError):
            return None

    def read(self, key: str) -> bytes:
        """``GetObject``."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            full = self._doc_key(key)
            return self._call(lambda: self._client.get_object(Bucket=self.bucket, Key=full)["Body"].read())
        except (ClientError, BotoCoreError) as exc:
            raise self._translate(exc, f"read {key}", key=key) from exc

    def delete(self, key: str) -> None:
        """``DeleteObject`` (idempotent)."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self._call(self._client.delete_object, Bucket=self.bucket, Key=self._doc_key(key))
        except (ClientError, BotoCoreError) as exc:
            raise self._translate(exc, f"delete {key}") from exc

    def document_uri(self, key: str) -> str:
        """``s3://bucket/...`` URI of document ``key``."""
        return f"s3://{self.bucket}/{self._doc_key(key)}"

    def list_keys(self, prefix: str, start_after: str = "", limit: int | None = None) -> list[str]:
        """``ListObjectsV2`` from ``StartAfter`` (S3 lists in byte order, as the contract requires)."""
        base = f"{self._base}docs/"
        out = []
        for obj in self._list(base + prefix, base + start_after if start_after else ""):
            out.append(obj["Key"][len(base) :])
            if limit is not None and len(out) >= limit:
                break
        return out

    def list_children(self, prefix: str) -> list[str]:
        """``ListObjectsV2`` with ``Delimiter="/"``: the common prefixes are the folders."""
        base = f"{self._base}docs/"
        folder = prefix.strip("/")
        full = f"{base}{folder}/" if folder else base
        names = [p["Prefix"][len(full) :].rstrip("/") for p in self._list(full, delimiter="/")]
        return sorted(n for n in names if n)

    # ---- writes that never finished ----------------------------------------------------------

    def abandoned_uploads(self, older_than_s: float) -> list[str]:
        """Multipart uploads under the prefix started more than ``older_than_s`` ago (``key#upload-id``)."""
        from botocore.exceptions import BotoCoreError, ClientError

        now, out = time.time(), []
        try:
            for page in self._client.get_paginator("list_multipart_uploads").paginate(
                Bucket=self.bucket, Prefix=self._base
            ):
                for up in page.get("Uploads", []):
                    if now - up["Initiated"].timestamp() >= older_than_s:
                        out.append(f"{up['Key']}#{up['UploadId']}")
        except (ClientError, BotoCoreError) as exc:
            raise self._translate(exc, "list multipart uploads") from exc
        return sorted(out)

    def remove_upload(self, name: str) -> None:
        """Abort one multipart upload named by ``abandoned_uploads``."""
        from botocore.exceptions import BotoCoreError, ClientError

        key, sep, upload_id = name.rpartition("#")
        if not sep or not key.startswith(self._base):
            raise errors.invalid(Reason.INVALID_ARGUMENT, "", f"not an upload name: {name!r}")
        try:
            self._call(self._client.abort_multipart_upload, Bucket=self.bucket, Key=key, UploadId=upload_id)
        except (ClientError, BotoCoreError) as exc:
            err = self._translate(exc, f"abort upload {name}")
            if not isinstance(err, errors.NotFound):
                raise err from exc

    def close(self) -> None:
        """Close the client's connection pool."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        close = getattr(self._client, "close", None)
        if close is not None:
            close()
