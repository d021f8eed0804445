"""RegistryService's adapter RPCs, mixed into ``RegistryServicer``: ExportAdapter and ImportAdapter.

- ``ExportAdapter``: metadata (the version, size, sha256, base fingerprint), then the file in chunks.
- ``ImportAdapter``: a client stream read like ImportModel's (size and sha256 checked, at most
  ``max_import_bytes``), its ``parent`` a model or a version; the new version comes back.

The file format and its checks are the domain's (``domain/adapters.py``).
"""

from __future__ import annotations

import hashlib
import re
from typing import Iterator

from rulewright.v1 import registry_service_pb2 as reg

from rulewright.service.errors import InvalidArgument
from rulewright.service.server import convert
from rulewright.service.server.auth import current_principal
from rulewright.service.server.errors import rpc

_PARENT = re.compile(r"^models/([^/]+)(?:/versions/([^/]+))?$")
# Domain fields of an import, as the request spells them.
IMPORT_FIELDS = {"parent": "metadata.parent", "model": "metadata.parent", "version": "metadata.parent",
                 "request_id": "metadata.request_id"}


def export_stream(version, data: bytes, fingerprint: str) -> Iterator[reg.ExportAdapterResponse]:
    """Metadata (``version`` as a message), then the adapter file in chunks."""
    yield reg.ExportAdapterResponse(metadata=reg.ExportAdapterMetadata(
        version=version, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest(), base_fingerprint=fingerprint))
    for i in range(0, len(data), convert.EXPORT_CHUNK):
        yield reg.ExportAdapterResponse(chunk=data[i:i + convert.EXPORT_CHUNK])


def parse_parent(name: str) -> tuple[str, int | None]:
    """``models/{model}`` → (model, None); ``models/{model}/versions/{n}`` → (model, n)."""
    m = _PARENT.match(name)
    if not m:
        raise InvalidArgument("metadata.parent", "must be models/{model} or models/{model}/versions/{version}, "
                              f"got {name!r}")
    if m.group(2) is None:
        return m.group(1), None
    return convert.parse_version(name, "metadata.parent")


class AdapterRpcs:
    """ExportAdapter and ImportAdapter over the ``Domain``; needs ``domain``, ``max_import_bytes``, ``_version_pb``."""

    @rpc(fields={"model": "name", "version": "name", "ref": "name"})
    def ExportAdapter(self, request, context):
        if request.name.startswith("models/"):
            model, number = convert.parse_version(request.name)
        else:                               # a reference: resolved here, so the server's default alias decides
            found = self.domain.resolve(request.name)
            model, number = found.model, found.number
        version, data, fingerprint = self.domain.export_adapter(model, number)
        yield from export_stream(self._version_pb(version), data, fingerprint)

    @rpc(fields=IMPORT_FIELDS)
    def ImportAdapter(self, request_iterator, context):
        meta, data = convert.import_upload(request_iterator, self.max_import_bytes)
        model, onto = parse_parent(meta.parent)
        version = self.domain.import_adapter(model, data, onto=onto, author=current_principal(),
                                             description=meta.description or None, request_id=meta.request_id or None,
                                             sha256=hashlib.sha256(data).hexdigest())
        return self._version_pb(version)
