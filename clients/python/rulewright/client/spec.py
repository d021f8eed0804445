"""Edit specs and regions: the JSON form (``examples/edits/*.json``) as the API's messages.

- ``edit_spec_pb(d)``: an edit spec dict as ``rulewright.v1.EditSpec``: the dict is the
  message's JSON form (absent fields: the server's defaults); first-release masks are read too.
  A mistyped or unknown field is a ValueError naming its path (``strength: must be a number``,
  ``paste[0].bbox: unknown field``), found by walking the message's descriptor before parsing.
- ``spec_dict(spec)``: an EditSpec back as that dict (what ``Version.spec`` holds).
- ``region_pb(d)``: ``{"seed": 35, "box": [x0, y0, x1, y1]}`` (or a ``mask``) as a Region.
- ``parse_region("35:8,22,56,38")`` and ``parse_seeds("0-15,20")``: the command line's forms.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Iterator, Mapping

from google.protobuf import descriptor, json_format

from rulewright.v1 import edit_pb2, images_pb2

__all__ = ["edit_spec_pb", "region_pb", "region_dict", "spec_dict", "parse_reference", "parse_region", "parse_seeds",
           "SPEC_FIELDS"]

_NAME = r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?"
_REF = re.compile(rf"^({_NAME})(?:/([0-9]+)|@({_NAME}))?$")
_RESOURCE = re.compile(r"^models/([^/]+)/versions/([0-9]+)$")

# What an edit spec JSON may hold: the API's EditSpec fields, in its JSON form.
SPEC_FIELDS = frozenset(edit_pb2.EditSpec.DESCRIPTOR.fields_by_name)
# The choices the server knows (checked here too, so a typo fails before anything is sent);
# solver "optimize" is what first-release versions recorded.
_CHOICES = {"op": ("rewrite", "erase", "zero"), "goal": ("image", "value"), "solver": ("adam", "closed_form", "optimize"),
            "method": ("multilayer", "single"), "factors": ("free", "context"), "quality": ("final", "draft")}
_LEGACY_MASK = "zlib-base64-u8"       # first-release masks: {"encoding", "size": [H, W], "data"}, zlib bytes


def _region_json(d: Any, field: str) -> Any:
    """A region dict with a first-release mask in the API's JSON form (the zlib bytes as they are)."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{field}: must be an object with seed and box or mask")
    mask = d.get("mask")
    if not (isinstance(mask, Mapping) and mask.get("encoding") == _LEGACY_MASK):
        return dict(d)
    try:
        h, w = (int(v) for v in mask["size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{field}.mask: malformed ({exc})") from None
    return {**d, "mask": {"encoding": "ENCODING_ZLIB", "width": w, "height": h, "data": mask.get("data", "")}}


_FD = descriptor.FieldDescriptor


def _numeric(v: Any) -> bool:
    """A JSON number, or a string proto3 JSON reads as one ("1.5", "NaN")."""
    if isinstance(v, str):
        try:
            float(v)
        except ValueError:
            return False
        return True
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _whole(v: Any) -> bool:
    """A JSON integer (64-bit ones may be strings of digits)."""
    if isinstance(v, float):
        return math.isfinite(v) and v.is_integer()
    if isinstance(v, str):
        return v.lstrip("-").isdigit()
    return isinstance(v, int) and not isinstance(v, bool)


# scalar kind (FieldDescriptor.cpp_type) → (accepts a JSON value, what the value must be)
_SCALARS: dict[int, tuple[Callable[[Any], bool], str]] = {
    **dict.fromkeys((_FD.CPPTYPE_DOUBLE, _FD.CPPTYPE_FLOAT), (_numeric, "a number")),
    **dict.fromkeys((_FD.CPPTYPE_INT32, _FD.CPPTYPE_INT64, _FD.CPPTYPE_UINT32, _FD.CPPTYPE_UINT64),
                    (_whole, "an integer")),
    _FD.CPPTYPE_BOOL: (lambda v: isinstance(v, bool), "true or false"),
    _FD.CPPTYPE_STRING: (lambda v: isinstance(v, str), "a string"),
    _FD.CPPTYPE_ENUM: (lambda v: isinstance(v, (str, int)) and not isinstance(v, bool), "a name of its enum"),
}


def _members(message: descriptor.Descriptor, d: Any, path: str) -> Iterator[tuple[str, Any, Any]]:
    """(path, field descriptor, value) for every value of ``d`` (a JSON object of ``message``), each
    element of a list on its own; a key the message lacks or a list where one value belongs (or
    the reverse) is a ValueError naming its path."""
    if not isinstance(d, Mapping):
        raise ValueError(f"{path or 'spec'}: must be an object")
    for key, value in d.items():
        at = f"{path}.{key}" if path else key
        fd = message.fields_by_name.get(key) or message.fields_by_camelcase_name.get(key)
        if fd is None:
            raise ValueError(f"{at}: unknown field")
        if value is None:
            continue
        if fd.is_repeated != isinstance(value, list):
            raise ValueError(f"{at}: must be {'a list' if fd.is_repeated else 'one value, not a list'}")
        yield from (((f"{at}[{i}]", fd, v) for i, v in enumerate(value)) if fd.is_repeated else [(at, fd, value)])


def check_fields(message: descriptor.Descriptor, d: Any, path: str = "") -> None:
    """ValueError ``<path>: ...`` for the first key of JSON object ``d`` that ``message`` lacks or
    value of the wrong JSON type, nested messages included (Struct and the like are left whole)."""
    for at, fd, value in _members(message, d, path):
        if fd.cpp_type != _FD.CPPTYPE_MESSAGE:
            accepts, what = _SCALARS[fd.cpp_type]
            if not accepts(value):
                raise ValueError(f"{at}: must be {what}, got {value!r}")
        elif not fd.message_type.full_name.startswith("google.protobuf."):
            check_fields(fd.message_type, value, at)


def _parse(d: Mapping[str, Any], message, field: str):
    try:
        return json_format.ParseDict(d, message)
    except json_format.ParseError as exc:
        raise ValueError(f"{field}: {exc}") from None


def region_pb(d: Mapping[str, Any], field: str = "region") -> images_pb2.Region:
    """A region dict (``seed`` plus ``box`` [x0, y0, x1, y1] or a ``mask``, the API's JSON form or
    a first-release ``zlib-base64-u8`` one) as a Region. ValueError names ``field``."""
    region = _region_json(d, field)
    check_fields(images_pb2.Region.DESCRIPTOR, region, field)
    if "seed" not in region:
        raise ValueError(f"{field}: must be an object with seed and box or mask")
    if ("box" in region) == ("mask" in region):
        raise ValueError(f"{field}: give exactly one of box or mask")
    if "box" in region and (not isinstance(region["box"], list) or len(region["box"]) != 4):
        raise ValueError(f"{field}.box: must be [x0, y0, x1, y1], got {region['box']!r}")
    return _parse(region, images_pb2.Region(), field)


def region_dict(seed: int, box: tuple[int, int, int, int]) -> dict[str, Any]:
    """``{"seed": seed, "box": [x0, y0, x1, y1]}``: a box region in the edit spec's JSON form."""
    return {"seed": int(seed), "box": [int(v) for v in box]}


def edit_spec_pb(d: Mapping[str, Any] | edit_pb2.EditSpec) -> edit_pb2.EditSpec:
    """An edit spec (the JSON of ``examples/edits/*.json`` or of a version's spec, any release's; or
    already an EditSpec) as the API's EditSpec: its JSON form, so absent fields stay unset and the
    server fills in its defaults. A ``found`` list, even empty, is sent as given. ValueError names
    an unknown or malformed field."""
    if isinstance(d, edit_pb2.EditSpec):
        return d
    if not isinstance(d, Mapping):
        raise ValueError(f"spec: must be a JSON object, got {type(d).__name__}")
    for key in d:
        if key not in SPEC_FIELDS:
            raise ValueError(f"{key}: unknown field")
    for key, allowed in _CHOICES.items():
        if d.get(key) not in (None, "", *allowed):
            raise ValueError(f"{key}: must be one of {list(allowed)}, got {d[key]!r}")
    spec = dict(d)
    if spec.get("copy") is not None:
        spec["copy"] = _region_json(spec["copy"], "copy")
    for key in ("paste", "context", "found"):
        if isinstance(spec.get(key), list):
            spec[key] = [_region_json(r, f"{key}[{i}]") for i, r in enumerate(spec[key])]
    if spec.get("found") is not None:
        spec["found_given"] = True
    check_fields(edit_pb2.EditSpec.DESCRIPTOR, spec)
    return _parse(spec, edit_pb2.EditSpec(), "spec")


def spec_dict(spec: edit_pb2.EditSpec) -> dict[str, Any]:
    """An EditSpec in its JSON form, as ``examples/edits/*.json`` spell it: 64-bit integers as
    numbers, and ``found`` as a list whenever it was given (even empty)."""
    out = _numbers(spec, json_format.MessageToDict(spec, preserving_proto_field_name=True))
    if out.pop("found_given", False):
        out.setdefault("found", [])
    return out


_INT64 = {descriptor.FieldDescriptor.CPPTYPE_INT64, descriptor.FieldDescriptor.CPPTYPE_UINT64}


def _numbers(msg, d: dict[str, Any]) -> dict[str, Any]:
    """``d`` (``msg`` as MessageToDict wrote it) with its 64-bit integers back as numbers."""
    for fd, value in msg.ListFields():
        if fd.message_type is not None and fd.name in d:
            items = value if fd.is_repeated else [value]
            parts = d[fd.name] if fd.is_repeated else [d[fd.name]]
            for item, part in zip(items, parts):
                if isinstance(part, dict):
                    _numbers(item, part)
        elif fd.cpp_type in _INT64 and fd.name in d:
            d[fd.name] = [int(v) for v in d[fd.name]] if fd.is_repeated else int(d[fd.name])
    return d


def parse_region(text: str) -> dict[str, Any]:
    """``"SEED:x0,y0,x1,y1"`` as a region dict; ValueError if malformed."""
    seed, sep, box = text.partition(":")
    coords = box.split(",")
    try:
        if not sep or len(coords) != 4:
            raise ValueError
        return region_dict(int(seed), tuple(int(c) for c in coords))  # type: ignore[arg-type]
    except ValueError:
        raise ValueError(f"region {text!r}: expected SEED:x0,y0,x1,y1 (integers, image pixels)") from None


# Most seeds one list may name: a range is counted before it is expanded, so a typo such as
# 0-9999999999 is refused at once instead of filling memory. More images are a dataset job's work.
MAX_LISTED_SEEDS = 100_000


def parse_seeds(text: str, limit: int = MAX_LISTED_SEEDS) -> list[int]:
    """Seeds from ``"0-15"``, ``"1,5,9"`` or a mix like ``"0-3,10"``; ValueError if malformed or
    more than ``limit`` in all."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        lo, dash, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi if dash else lo)
        except ValueError:
            raise ValueError(f"seeds {text!r}: expected numbers and ranges like 0-15,20") from None
        if last < first:
            raise ValueError(f"seeds {text!r}: empty range {part!r}")
        if len(seeds) + (last - first + 1) > limit:
            raise ValueError(f"seeds {text!r}: {len(seeds) + last - first + 1:,} seeds, at most {limit:,} in one "
                             f"list (render more with a dataset job: rulewright dataset create)")
        seeds.extend(range(first, last + 1))
    if not seeds:
        raise ValueError("no seeds given")
    return seeds


def parse_reference(text: str) -> tuple[str, int | None, str | None]:
    """(model, number, alias) of ``faces``, ``faces/3``, ``faces@staging`` or ``models/faces/versions/3``;
    ValueError for anything else (a version number starts at 1)."""
    resource = _RESOURCE.match(text)
    m = _REF.match(f"{resource.group(1)}/{resource.group(2)}" if resource else text)
    if not m or (m.group(2) is not None and int(m.group(2)) < 1):
        raise ValueError(f"{text!r} is not a model reference: expected faces, faces@ALIAS or faces/N")
    name, number, alias = m.groups()
    return name, int(number) if number is not None else None, alias
