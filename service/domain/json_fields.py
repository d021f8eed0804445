"""A message's JSON form checked against its descriptor before it is parsed, so that a wrong type or
an unknown key is refused naming its field path (``spec.strength: must be a number``,
``spec.paste[0].bbox: unknown field``) rather than with the parser's message about the whole body.

It checks what the proto3 JSON mapping allows for each field (numbers may also be strings that
parse as numbers, 64-bit integers usually are), not the values' bounds: those are the domain's.
"""

from __future__ import annotations

import math
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

from rulewright.service.errors import InvalidArgument

_FLOATS = {FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT}
_INTEGERS = {FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32,
             FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64,
             FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED32,
             FieldDescriptor.TYPE_SFIXED64}
_OPAQUE = "google.protobuf."          # Struct, Value, Timestamp...: their JSON forms are their own


def check_json(descriptor: Descriptor, value: Any, path: str = "") -> None:
    """Raise InvalidArgument naming the first field of ``value`` (the JSON form of a
    ``descriptor`` message, at ``path``) whose key is unknown or whose value has the wrong type."""
    if not isinstance(value, dict):
        raise InvalidArgument(path or "body", "must be a JSON object")
    by_name = {**{f.json_name: f for f in descriptor.fields}, **descriptor.fields_by_name}
    for key, item in value.items():
        where = f"{path}.{key}" if path else key
        field = by_name.get(key)
        if field is None:
            raise InvalidArgument(where, "unknown field")
        if item is None:
            continue                                   # JSON null: the field's default
        if field.is_repeated:
            if not isinstance(item, list):
                raise InvalidArgument(where, "must be a list")
            for i, element in enumerate(item):
                _check_value(field, element, f"{where}[{i}]")
        else:
            _check_value(field, item, where)


def _check_value(field: FieldDescriptor, value: Any, where: str) -> None:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if not field.message_type.full_name.startswith(_OPAQUE):
            check_json(field.message_type, value, where)
    elif field.type in _FLOATS:
        if not _is_number(value):
            raise InvalidArgument(where, f"must be a number, got {_shown(value)}")
    elif field.type in _INTEGERS:
        if not _is_integer(value):
            raise InvalidArgument(where, f"must be an integer, got {_shown(value)}")
    elif field.type == FieldDescriptor.TYPE_BOOL:
        if not isinstance(value, bool):
            raise InvalidArgument(where, f"must be true or false, got {_shown(value)}")
    elif field.type == FieldDescriptor.TYPE_ENUM:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise InvalidArgument(where, f"must be one of {[v.name for v in field.enum_type.values]}")
    elif not isinstance(value, str):                   # string and bytes (base64)
        raise InvalidArgument(where, f"must be a string, got {_shown(value)}")


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return True
    if isinstance(value, str):
        try:
            float(value)
        except ValueError:
            return False
        return True
    return False


def _is_integer(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    if isinstance(value, float):
        return math.isfinite(value) and value == int(value)
    return isinstance(value, str) and value.strip().lstrip("-").isdigit()


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
