"""``Rescaling``: the ``Client`` call that makes a version at another strength (no fit, no new weights)."""

from __future__ import annotations

import uuid

from rulewright.v1 import registry_service_pb2 as reg

from rulewright.client.types import Version


class Rescaling:
    """``Client.rescale``; needs the client's ``_unary`` and RegistryService stub."""

    def rescale(self, ref: str, strength: float, *, description: str | None = None, request_id: str | None = None,
                timeout: float | None = None) -> Version:
        """A new version applying ``ref``'s own edit (``faces/3``, ``faces@staging``) at ``strength``.

        The same delta at a new scale, in constant time: no fit and no new blob. Its parent is
        the source's parent and ``rescaled_from`` names the source. A ``request_id`` is
        generated if not given, so a retry after UNAVAILABLE returns the first attempt's version.
        """
        request = reg.RescaleVersionRequest(name=ref, strength=strength, description=description or "",
                                            request_id=request_id or f"rsc-{uuid.uuid4().hex}")
        return Version.from_pb(self._unary("RescaleVersion", self._reg.RescaleVersion, request, timeout))
