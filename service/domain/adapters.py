"""Adapters: a version's edit alone, as one safetensors file, and its import onto the same base elsewhere.

- ``fingerprint(state)``: what identifies base weights on any server: SHA-256 over the tensors
  (sorted names, dtype, shape, bytes), not over a file's bytes, so a re-saved or exported copy of
  the same weights has the same fingerprint (docs/adapters.md gives the definition in full).
- ``Adapter``: a decoded adapter file; ``encode(adapter)`` / ``decode(data)`` are the format.
- ``Adapters``: the ``Domain``'s ``export_adapter`` and ``import_adapter``.

What an adapter holds: the low-rank factors of every edit from the import down to the exported
version, in lineage order, with each part's strength. Imported onto the same base, one new edit
version carries all of them, so it draws exactly what the exported version drew; stacked on
another version of that base, they apply after that version's own edits.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import threading
from typing import Any, Mapping

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from rulewright.registry.manifests import Version
from rulewright.service.domain.weights import base_weights, read_deltas
from rulewright.service.engine.delta import LowRankDelta, to_bytes
from rulewright.service.engine.edit import EditSpec
from rulewright.service.errors import Code, Error, InvalidArgument

FORMAT = "rulewright.adapter/1"
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_KEYS = ("format", "base_fingerprint", "arch", "source", "strength", "spec", "metrics", "edits", "parts")


class NotAnEdit(Error):
    """An adapter was asked of an import: it has no edit to export."""

    code = Code.FAILED_PRECONDITION
    reason = "NOT_AN_EDIT"


class BaseMismatch(Error):
    """The adapter was made for other base weights than the target's."""

    code = Code.FAILED_PRECONDITION
    reason = "BASE_MISMATCH"


def _bad(field: str, message: str) -> InvalidArgument:
    return InvalidArgument(f"adapter.{field}" if field else "adapter", message, reason="INVALID_ADAPTER")


# ---- fingerprints ----------------------------------------------------------------------------

def fingerprint(state: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 (hex) of the tensors: for each name in sorted order, a JSON line ``[name, dtype, shape]``
    and then the tensor's bytes (C order, little-endian)."""
    h = hashlib.sha256()
    for key in sorted(state):
        t = state[key].detach().to("cpu").contiguous()
        h.update(json.dumps([key, str(t.dtype).removeprefix("torch."), list(t.shape)]).encode() + b"\n")
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


_fingerprints: dict[str, str] = {}          # weights blob sha256 → fingerprint (content-addressed: safe to share)
_fingerprints_lock = threading.Lock()
_MAX_CACHED = 256


def base_fingerprint(registry, root: Version) -> str:
    """The fingerprint of an import's weights (computed once per weights blob)."""
    sha = root.blobs["weights"].sha256
    with _fingerprints_lock:
        found = _fingerprints.get(sha)
    if found is None:
        found = fingerprint(base_weights(registry, root))
        with _fingerprints_lock:
            if len(_fingerprints) >= _MAX_CACHED:
                _fingerprints.pop(next(iter(_fingerprints)))
            _fingerprints[sha] = found
    return found


# ---- the file format -------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Adapter:
    """An adapter: the base it applies to, the exported version's spec, strength and metrics, and
    the deltas of each edit in lineage order (``edits[i]["parts"]`` of them each)."""

    base_fingerprint: str
    arch: str
    source: dict            # {"model", "version", "lineage"} on the exporting server
    strength: float
    spec: dict
    metrics: dict
    edits: list[dict]       # [{"version", "strength", "spec", "parts"}], import side first
    deltas: list[LowRankDelta]


def encode(adapter: Adapter) -> bytes:
    """The adapter as one safetensors file (deterministic bytes; docs/adapters.md)."""
    tensors, parts = {}, []
    for i, d in enumerate(adapter.deltas):
        tensors[f"parts.{i}.direction"] = d.direction.detach().to("cpu", torch.float32).contiguous()
        tensors[f"parts.{i}.lambda"] = d.lam.detach().to("cpu", torch.float32).contiguous()
        parts.append({"weight_key": d.weight_key, "in_axis": d.in_axis, "weight_shape": list(d.weight_shape),
                      "scale": float(d.scale)})
    meta = {"format": FORMAT, "base_fingerprint": adapter.base_fingerprint, "arch": adapter.arch,
            "source": adapter.source, "strength": adapter.strength, "spec": adapter.spec,
            "metrics": adapter.metrics, "edits": adapter.edits, "parts": parts}
    return st_save(tensors, metadata={k: v if isinstance(v, str) else json.dumps(v, sort_keys=True)
                                      for k, v in meta.items()})


def _header(data: bytes) -> dict[str, str]:
    """The file's string metadata; INVALID_ARGUMENT if it is no safetensors file of this format."""
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    try:
        if not 0 < n <= len(data) - 8:
            raise ValueError("truncated header")
        meta = json.loads(data[8:8 + n]).get("__metadata__") or {}
    except (ValueError, AttributeError):
        raise _bad("", "not a safetensors file") from None
    if meta.get("format") != FORMAT:
        raise _bad("format", f"must be {FORMAT!r}, got {meta.get('format')!r}")
    missing = [k for k in _KEYS if k not in meta]
    if missing:
        raise _bad(missing[0], "missing from the file's metadata")
    return meta


def _json(meta: dict[str, str], key: str, kind: type) -> Any:
    try:
        value = json.loads(meta[key])
    except ValueError:
        raise _bad(key, "is not valid JSON") from None
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise _bad(key, f"must be a finite number, got {value!r}")
        return float(value)
    if not isinstance(value, kind):
        raise _bad(key, f"must be a JSON {'object' if kind is dict else 'array'}")
    return value


def _delta(i: int, part: Any, tensors: dict[str, torch.Tensor]) -> LowRankDelta:
    """Part ``i`` checked: its fields, its two tensors and the shape it declares."""
    field = f"parts[{i}]"
    if not isinstance(part, dict) or not isinstance(part.get("weight_key"), str) \
            or not isinstance(part.get("in_axis"), int) or isinstance(part.get("scale"), bool) \
            or not isinstance(part.get("scale"), (int, float)) or not math.isfinite(part["scale"]):
        raise _bad(field, "must be an object with weight_key (text), in_axis (integer) and scale (a finite number)")
    names = [f"parts.{i}.direction", f"parts.{i}.lambda"]
    for name in names:
        if name not in tensors:
            raise _bad(field, f"tensor {name!r} is missing")
        if not tensors[name].is_floating_point():
            raise _bad(field, f"tensor {name!r} must hold floats")
    try:
        d = LowRankDelta(part["weight_key"], part["in_axis"], *(tensors[n] for n in names), float(part["scale"]))
    except ValueError as exc:
        raise _bad(field, str(exc)) from None
    if list(d.weight_shape) != part.get("weight_shape"):
        raise _bad(f"{field}.weight_shape", f"says {part.get('weight_shape')}, the factors make {list(d.weight_shape)}")
    return d


def _edits(edits: list, parts: int) -> list[dict]:
    for i, e in enumerate(edits):
        if not isinstance(e, dict) or not isinstance(e.get("spec"), dict) or not isinstance(e.get("parts"), int) \
                or e["parts"] < 0:
            raise _bad(f"edits[{i}]", "must be an object with spec (an object) and parts (a count)")
    if not edits or sum(e["parts"] for e in edits) != parts:
        raise _bad("edits", f"must be at least one edit whose part counts add up to the {parts} parts")
    return edits


def decode(data: bytes) -> Adapter:
    """An adapter file read and checked; INVALID_ARGUMENT (``adapter.<what>``) names what is wrong."""
    meta = _header(data)
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError) as exc:
        raise _bad("", f"unreadable tensors: {exc}") from None
    fp = meta["base_fingerprint"]
    if not _HEX64.match(fp):
        raise _bad("base_fingerprint", "must be 64 lowercase hex digits")
    parts = _json(meta, "parts", list)
    deltas = [_delta(i, p, tensors) for i, p in enumerate(parts)]
    extra = sorted(set(tensors) - {f"parts.{i}.{t}" for i in range(len(parts)) for t in ("direction", "lambda")})
    if extra:
        raise _bad("parts", f"tensors {extra} belong to no part")
    return Adapter(fp, meta["arch"], _json(meta, "source", dict), _json(meta, "strength", float),
                   _json(meta, "spec", dict), _json(meta, "metrics", dict),
                   _edits(_json(meta, "edits", list), len(parts)), deltas)


# ---- the domain's calls ----------------------------------------------------------------------

def _strength(version: Version, deltas: list[LowRankDelta]) -> float:
    """An edit's strength: its parts' scale (what is applied), else its spec's."""
    if deltas:
        return float(deltas[0].scale)
    return float(version.spec.get("strength") or 1.0)


class Adapters:
    """Export and import of adapters; needs ``self.registry``, ``generator`` and ``lineages`` of the ``Domain``."""

    def export_adapter(self, model: str, number: int) -> tuple[Version, bytes, str]:
        """(version, adapter file, base fingerprint) of an edited version: every edit below its import."""
        lineage = self.registry.get_lineage(model, number)
        version = lineage[-1]
        if version.kind != "edit":
            raise NotAnEdit(f"{version.name} is an import: it has no edit to export (export its weights instead)",
                            field="name", version=version.name)
        root = lineage[0]
        fp = base_fingerprint(self.registry, root)
        edits, deltas = [], []
        for edit in lineage[1:]:
            mine = [d for d in read_deltas(self.registry, edit) if not d.is_zero]  # strength 0 changes nothing
            edits.append({"version": edit.number, "strength": _strength(edit, mine), "spec": edit.spec,
                          "parts": len(mine)})
            deltas += mine
        info = self.registry.get_model(model)
        source = {"model": model, "version": number, "lineage": [v.number for v in lineage]}
        adapter = Adapter(fp, info.arch, source, edits[-1]["strength"], version.spec, version.metrics, edits, deltas)
        return version, encode(adapter), fp

    def import_adapter(self, model: str, data: bytes, onto: int | None = None, author: str = "anonymous",
                       description: str | None = None, request_id: str | None = None,
                       sha256: str = "") -> Version:
        """A new edit version of ``model`` from an adapter file, on its import (``onto`` None) or on
        version ``onto``; checked whole before anything is stored."""
        adapter = decode(data)
        lineage = self.registry.get_lineage(model, 1 if onto is None else onto)   # version 1: the import
        target, root = lineage[-1], lineage[0]
        fp = base_fingerprint(self.registry, root)
        if fp != adapter.base_fingerprint:
            raise BaseMismatch(
                f"the adapter was made for base weights with fingerprint {adapter.base_fingerprint[:12]}…, "
                f"{root.name} has {fp[:12]}… (import the same base weights first)",
                field="parent", expected=adapter.base_fingerprint, found=fp, base=root.name)
        res = self.generator(target)
        self._check_fit(adapter, res.base.shapes, res.model)
        spec = dict(adapter.spec)
        if description is not None:
            spec["description"] = description
        origin = {"source_version": f"models/{adapter.source.get('model')}/versions/{adapter.source.get('version')}",
                  "source_lineage": [int(n) for n in adapter.source.get("lineage", []) if isinstance(n, int)],
                  "base_fingerprint": fp, "sha256": sha256 or hashlib.sha256(data).hexdigest()}
        return self.registry.create_version(model, parent=target.number, delta=to_bytes(adapter.deltas), spec=spec,
                                            metrics=adapter.metrics, author=author, request_id=request_id,
                                            adapter=origin)

    @staticmethod
    def _check_fit(adapter: Adapter, shapes: dict[str, tuple], model) -> None:
        """Every part edits a weight the base has, in its shape; every spec is one this base takes."""
        for i, d in enumerate(adapter.deltas):
            if shapes.get(d.weight_key) != d.weight_shape:
                what = "which the base lacks" if d.weight_key not in shapes else f"shaped {shapes[d.weight_key]}"
                raise _bad(f"parts[{i}].weight_key", f"{d.weight_key!r} ({list(d.weight_shape)}) fits no weight of "
                                                     f"the base: {what}")
        for i, spec in enumerate([adapter.spec] + [e["spec"] for e in adapter.edits]):
            field = "spec" if i == 0 else f"edits[{i - 1}].spec"
            try:
                EditSpec.from_json(spec, model)
            except InvalidArgument as exc:
                raise _bad(f"{field}.{exc.field}" if exc.field else field, exc.description) from None
