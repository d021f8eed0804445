"""Guards of the transports' own messages, checked before anything in them is decoded.

The bounds themselves are the domain's (``service/limits.py``: ``Limits`` and its checks, which
``service/requests.py`` applies to every typed request); these only apply the ones that must
come before decoding, so a message with a million masks or a huge declared mask is refused
before a single PNG or zlib stream is opened:

- ``check_masks``: every mask of a message, width x height against ``max_mask_pixels``.
- ``check_dissect``, ``check_search``, ``check_rewrite``: a message's counts of regions and
  seeds, and its masks.

Every refusal is an engine ``InvalidArgument`` whose description names the setting, so a
client sees which knob an operator would turn. Nothing here imports torch.
"""

from __future__ import annotations

from typing import Iterator

from google.protobuf.message import Message

from rulewright.service.engine.errors import InvalidArgument
from rulewright.v1 import images_pb2
from rulewright.service.domain.limits import Limits, check_count, check_spec_regions


def _walk(msg: Message, path: str) -> Iterator[tuple[str, Message]]:
    """Every sub-message of ``msg`` with its path as the request spells it (``context[1].mask``)."""
    for fd, value in msg.ListFields():
        if fd.message_type is None or fd.message_type.GetOptions().map_entry:
            continue
        name = f"{path}.{fd.name}" if path else fd.name
        if fd.is_repeated:
            for i, item in enumerate(value):
                yield f"{name}[{i}]", item
                yield from _walk(item, f"{name}[{i}]")
        else:
            yield name, value
            yield from _walk(value, name)


def check_masks(limits: Limits, msg: Message) -> None:
    """Every mask in ``msg``: width x height at most ``max_mask_pixels`` (before anything decodes it)."""
    for path, sub in _walk(msg, ""):
        if isinstance(sub, images_pb2.Mask):
            pixels = sub.width * sub.height
            if pixels > limits.max_mask_pixels:
                raise InvalidArgument(path, f"a mask of {sub.width}x{sub.height} is over {limits.max_mask_pixels:,} "
                                      f"pixels (server setting max_mask_pixels)")


def check_dissect(limits: Limits, request) -> None:
    """DissectRequest: how many regions, and their masks."""
    check_count(len(request.regions), limits.max_regions, "regions", "regions", "max_regions")
    check_masks(limits, request)


def check_search(limits: Limits, request) -> None:
    """SearchContextRequest: how many context regions, and their masks."""
    check_count(len(request.context), limits.max_regions, "context", "regions", "max_regions")
    check_masks(limits, request)


def check_rewrite(limits: Limits, request) -> None:
    """RewriteRequest: how many regions the spec holds, and their masks."""
    spec = request.spec
    check_spec_regions(limits, {"paste": len(spec.paste), "context": len(spec.context), "found": len(spec.found)},
                       spec.HasField("copy"))
    check_masks(limits, request)
