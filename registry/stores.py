"""Blob stores by URI scheme: ``open_store(uri)`` picks the backend.

Apart from ``blobstore`` (the interface), so the interface knows no backend and the backends
import only the interface.
"""

from __future__ import annotations

import os

from rulewright.registry import errors
from rulewright.registry.blobstore import BlobStore, default_store_uri
from rulewright.registry.errors import Reason
from rulewright.registry.filestore import FileStore
from rulewright.registry.s3store import S3Config


def open_store(uri: str | os.PathLike | None = None, s3: S3Config | None = None) -> BlobStore:
    """The store a URI names: ``file:///abs/path`` or a bare path, or ``s3://bucket[/prefix]``.

    Args:
        uri: the store; None means ``default_store_uri()``.
        s3: endpoint, credentials, region and TLS for ``s3://``; None reads ``RULEWRIGHT_S3_*``.
    """
    text = os.fspath(uri) if uri is not None else default_store_uri()
    if text.startswith("s3://"):
        from rulewright.registry.s3store import S3Store  # boto3 is imported only when S3 is used

        bucket, _, prefix = text[len("s3://") :].partition("/")
        return S3Store(bucket, prefix.strip("/"), s3 or S3Config.from_env())
    if text.startswith("file://"):
        from urllib.parse import unquote, urlparse

        parsed = urlparse(text)
        if parsed.netloc not in ("", "localhost"):
            raise errors.invalid(Reason.INVALID_STORE_URI, "", f"file URI must name a local path: {text}", uri=text)
        path = unquote(parsed.path)
    elif "://" in text:
        raise errors.invalid(
            Reason.INVALID_STORE_URI, "", f"unknown store scheme in {text!r}; use file:// or s3://", uri=text
        )
    else:
        path = text
    return FileStore(path)
