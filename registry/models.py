"""Models: ``import_model``, ``import_pending``, ``get_model``, ``list_models``, ``delete_model``.

A model is ``models/{m}/model.json`` plus its version 1 (kind ``import``, the base weights);
``Models`` is one of the resources ``Registry`` composes over the shared ``Documents``.
"""

from __future__ import annotations

import logging
import uuid

from rulewright.registry import errors
from rulewright.registry.blobstore import BlobSource
from rulewright.registry.documents import Documents, fmt_numbers
from rulewright.registry.errors import Reason
from rulewright.registry.manifests import (
    Model, Page, Version, check_json_object, check_model_name, check_page_size, check_request_id,
    decode_page_token, dumps, encode_page_token, loads, utc_now
)

log = logging.getLogger(__name__)


def _is_safetensors_header(head: bytes) -> bool:
    # 8-byte little-endian header length, then a JSON object: enough to refuse pickles and junk
    # without importing torch or reading the whole file.
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n < (1 << 30) and head[8:9] == b"{"



class Models(Documents):
    """Import, read, list and delete models (version 1 is written with the model)."""

    def import_model(
        self,
        name: str,                      # lowercase DNS label
        *,
        arch: str,                      # architecture ("dcgan", "progan", "stylegan2")
        config: dict,                   # JSON sizes the architecture is built from
        weights: BlobSource,            # base weights as safetensors (bytes or a binary stream)
        author: str = "anonymous",      # the authenticated principal
        description: str = "",          # free text shown in listings
        spec: dict | None = None,       # where the weights came from (replayable import)
        metrics: dict | None = None,    # measured quality of the base model
        request_id: str | None = None,  # a retry with the same id returns the first result
    ) -> Version:
        """Register a model and its version 1 (kind ``import``) holding the base weights.

        Returns:
            Version 1.
        Raises:
            AlreadyExists (MODEL_EXISTS): the name is taken (by another request).
            InvalidArgument: a bad name, config, or weights that are not safetensors.
        """
        name = check_model_name(name)
        if not isinstance(arch, str) or not arch:
            raise errors.invalid(Reason.INVALID_ARGUMENT, "arch", "must be a non-empty string")
        config = check_json_object(config, "config")
        spec = check_json_object(spec, "spec")
        metrics = check_json_object(metrics, "metrics")
        request_id = check_request_id(request_id)
        self._check_weights(weights)
        if request_id is not None:
            prior = self.find_version_by_request_id(name, request_id)
            if prior is not None:
                return self._same_request(prior, "import", None)
        ref = self.store.put_blob(weights)
        model = Model(name, arch, config, str(description), str(author), utc_now(), request_id, ref)
        try:
            self.store.create(self._model_key(name), dumps(model.to_dict()))
        except errors.AlreadyExists:
            existing = self.get_model(name)
            # The same request crashed after creating the model: finish it instead of refusing.
            if request_id is None or existing.request_id != request_id:
                raise errors.AlreadyExists(Reason.MODEL_EXISTS, f"model {name!r} already exists", model=name) from None
        version = Version(name, 1, None, "import", spec, {"weights": ref}, metrics, str(author), utc_now(), request_id)
        try:
            self.store.create(self._version_key(name, 1), dumps(version.to_dict()))
        except errors.AlreadyExists:
            first = self.get_version(name, 1)
            if request_id is not None and first.request_id == request_id:
                return self._record_request(name, request_id, first)  # killed before its record
            raise errors.AlreadyExists(Reason.MODEL_EXISTS, f"model {name!r} already exists", model=name) from None
        self._number_hints[name] = max(self._number_hints.get(name, 0), 1)
        self._undo_if_deleting(name, version, None)
        log.info(
            "model imported", extra={"event": "model_imported", "model": name, "sha256": ref.sha256, "size": ref.size}
        )
        return self._record_request(name, request_id, version)

    def import_pending(self, name: str) -> bool:
        """Whether model ``name`` exists without its version 1: an import killed midway (retry it)."""
        self.get_model(name)
        try:
            self.store.read(self._version_key(name, 1))
        except errors.NotFound:
            return True
        return False

    def _check_weights(self, weights: BlobSource) -> None:
        if isinstance(weights, (bytes, bytearray, memoryview)):
            head = bytes(weights[:9])
        elif hasattr(weights, "seekable") and weights.seekable():
            pos = weights.tell()
            head = weights.read(9)
            weights.seek(pos)
        else:
            return  # an unseekable stream is checked when it is materialized
        if not _is_safetensors_header(head):
            raise errors.invalid(Reason.INVALID_ARGUMENT, "weights", "must be a safetensors file")

    def get_model(self, name: str) -> Model:
        """The model ``name``; NOT_FOUND (MODEL_NOT_FOUND) if absent."""
        name = check_model_name(name)
        try:
            data = self.store.read(self._model_key(name))
        except errors.NotFound:
            raise errors.NotFound(Reason.MODEL_NOT_FOUND, f"model {name!r} not found", model=name) from None
        return Model.from_dict(loads(data, f"models/{name}"), f"models/{name}")

    def list_models(self, page_size: int = 0, page_token: str = "") -> Page[Model]:
        """Models in name order, a page at a time (page_size 0 = default; see ``check_page_size``)."""
        size = check_page_size(page_size)
        after = decode_page_token(page_token, "models")
        names = [n for n in self.store.list_children("models/") if n > after]
        items: list[Model] = []
        for i, name in enumerate(names):
            try:
                items.append(self.get_model(name))
            except errors.NotFound:  # a folder whose import or deletion is in flight
                continue
            if len(items) == size:
                more = i + 1 < len(names)
                return Page(items, encode_page_token("models", name) if more else "")
        return Page(items, "")

    def delete_model(self, name: str, *, force: bool = False, author: str = "anonymous") -> None:
        """Delete a model; without ``force`` only one whose versions are all deleted.

        With ``force`` every version, alias and history entry goes too (their blobs are left to
        GC). Raises FailedPrecondition (MODEL_HAS_VERSIONS) naming the live versions otherwise.
        """
        self.get_model(name)
        marker = self._new_marker(f"models/{name}/deleting.{uuid.uuid4().hex}.json", author)
        try:
            live = self._live_numbers(name)
            if live and not force:
                raise errors.FailedPrecondition(
                    Reason.MODEL_HAS_VERSIONS,
                    f"model {name!r} still has versions {fmt_numbers(live)}; delete them or force",
                    model=name,
                    versions=",".join(map(str, live)),
                )
            # model.json first: from here on a concurrent creator's check sees the model gone even
            # after the marker below is removed.
            self.store.delete(self._model_key(name))
            for key in self.store.list_keys(f"models/{name}/"):
                if key != marker:
                    self.store.delete(key)
        finally:
            self.store.delete(marker)
        self._number_hints.pop(name, None)
        for key in [k for k in self._alias_hints if k[0] == name]:
            self._alias_hints.pop(key, None)
        log.info("model deleted", extra={"event": "model_deleted", "model": name, "author": author, "force": force})
