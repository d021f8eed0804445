"""Adapters over the API, mixed into ``Client``: ``export_adapter`` and ``import_adapter``.

An adapter is a version's edit alone: the low-rank factors of every edit from its model's import
down to the version, their strengths and specs, and the fingerprint of the base weights, as one
safetensors file (docs/adapters.md). It imports onto any server holding the same base weights.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from rulewright.v1 import registry_service_pb2 as reg

from rulewright.client.spec import parse_reference
from rulewright.client.transfer import receive_file
from rulewright.client.types import Version

__all__ = ["AdapterCalls", "AdapterExport"]

CHUNK = 1 << 20


@dataclass(frozen=True)
class AdapterExport:
    """An adapter written to ``path``, ``size_bytes`` long, whose ``sha256`` matched what the server
    announced; ``base_fingerprint`` names the base weights it applies to."""

    path: str
    version: Version
    size_bytes: int
    sha256: str
    base_fingerprint: str


class AdapterCalls:
    """``export_adapter`` and ``import_adapter``; needs the ``Client``'s stub, retries and timeouts."""

    def _version_number(self, model: str, number: int | None, alias: str, timeout: float | None) -> int:
        """The number a reference names: as given, else where its alias points now."""
        return number if number is not None else self.alias(model, alias, timeout=timeout).version

    def export_adapter(self, ref: str, path: str | os.PathLike, *, timeout: float | None = None) -> AdapterExport:
        """Download the adapter of an edited version (``faces/3``, ``faces@staging``; a bare name:
        the server's default alias) to ``path``, checked against the announced size and sha256 and
        only then renamed into place. FAILED_PRECONDITION (``NOT_AN_EDIT``) for an import."""
        parse_reference(ref)                # a malformed reference fails here, before any call
        name = ref                          # the server resolves it, and names the version in the metadata
        path = Path(path)
        part = path.with_name(path.name + ".part")

        def download(left: float) -> AdapterExport:
            call = self._reg.ExportAdapter(reg.ExportAdapterRequest(name=name), timeout=left, metadata=self._metadata)
            meta, size = receive_file(call, part, path, f"adapter of {name}")
            return AdapterExport(str(path), Version.from_pb(meta.version), size, meta.sha256, meta.base_fingerprint)

        try:
            return self._retrying("ExportAdapter", download, self.long_timeout if timeout is None else timeout)
        finally:
            part.unlink(missing_ok=True)

    def import_adapter(self, model: str, path: str | os.PathLike, description: str | None = None, *,
                       request_id: str | None = None, timeout: float | None = None) -> Version:
        """Create a version of ``model`` from the adapter file at ``path`` and return it.

        ``model`` is a bare name (the adapter goes onto the model's import: the new version draws
        what the exported one drew) or names a version to stack it on (``faces/3``,
        ``faces@staging``). FAILED_PRECONDITION (``BASE_MISMATCH``) if the model's base weights are
        not those the adapter was made for; INVALID_ARGUMENT naming what is wrong with a malformed
        file. ``description`` replaces the one in the adapter's spec; a ``request_id`` (generated
        if not given) makes the retry after UNAVAILABLE safe.
        """
        name, number, alias = parse_reference(model)
        parent = f"models/{name}"
        if number is not None or alias is not None:
            parent += f"/versions/{self._version_number(name, number, alias, timeout)}"
        data = Path(path).read_bytes()
        meta = reg.ImportAdapterMetadata(parent=parent, description=description or "",
                                         request_id=request_id or f"rwc-{uuid.uuid4().hex}", size_bytes=len(data),
                                         sha256=hashlib.sha256(data).hexdigest())

        def messages() -> Iterator[reg.ImportAdapterRequest]:
            yield reg.ImportAdapterRequest(metadata=meta)
            for i in range(0, len(data), CHUNK):
                yield reg.ImportAdapterRequest(chunk=data[i:i + CHUNK])

        return Version.from_pb(self._retrying(
            "ImportAdapter", lambda left: self._reg.ImportAdapter(messages(), timeout=left, metadata=self._metadata),
            self.long_timeout if timeout is None else timeout))

