"""A JSON-ready dump of a proto file's service and messages, to compare two sets of generated
code that may not share a process (tritonclient's and ours register the same symbols)."""

from __future__ import annotations

from google.protobuf import descriptor


def _message(m: descriptor.Descriptor, out: dict) -> None:
    out[m.full_name] = sorted(
        (
            f.name,
            f.number,
            f.type,
            f.is_repeated,
            f.message_type.full_name if f.message_type else "",
            f.enum_type.full_name if f.enum_type else "",
            f.containing_oneof.name if f.containing_oneof else "",
        )
        for f in m.fields
    )
    for nested in m.nested_types:
        _message(nested, out)


def dump(file: descriptor.FileDescriptor, service: str) -> dict:
    """{"package", "service": full name, "methods": {name: [in, out, client/server streaming]},
    "messages": {full name: sorted field tuples}} (nested messages and map entries included)."""
    svc = file.services_by_name[service]
    messages: dict = {}
    for m in file.message_types_by_name.values():
        _message(m, messages)
    return {
        "package": file.package,
        "service": svc.full_name,
        "methods": {
            m.name: [m.input_type.full_name, m.output_type.full_name, m.client_streaming, m.server_streaming]
            for m in svc.methods
        },
        "messages": {k: [list(f) for f in v] for k, v in messages.items()},
    }
