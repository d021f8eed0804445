"""Per-request caps, checked before any work, shared by the gRPC servicers, OIP and the HTTP side.

- ``Limits``, ``check_count`` and ``check_images`` come from ``service/limits.py`` (the domain
  checks images too) and are re-exported here.
- ``check_sample``, ``check_dissect``, ``check_search``, ``check_statistics``, ``check_rewrite``:
  a request message against the caps; ``check_masks`` walks any message for masks;
  ``check_spec`` checks an edit spec in its JSON form (the HTTP side's, and gRPC's once converted).

Every refusal is an engine ``InvalidArgument`` (INVALID_ARGUMENT with a BadRequest field
violation through the one error table) whose description names the setting, so a client sees
which knob an operator would turn. Nothing here imports torch.
"""

from __future__ import annotations

import base64
import math
import zlib
from typing import Any, Iterator

from google.protobuf.message import Message

from rulewright.service.engine.errors import InvalidArgument
from rulewright.v1 import images_pb2


from ..limits import Limits, _over, check_count, check_images  # noqa: F401  (re-exported for the transports)


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


def _samples(limits: Limits, samples: int, field: str) -> None:
    check_count(samples, limits.max_stats_samples, field, "statistics samples", "max_stats_samples")


def _search(limits: Limits, targets: Any, candidates: Any, field: str) -> None:
    """A rewrite's context search: its targets become regions of the edit, its candidates are
    ranked like SearchContext's seeds."""
    if isinstance(targets, int) and not isinstance(targets, bool):
        check_count(targets, limits.max_regions, f"{field}.targets", "found targets", "max_regions")
    if isinstance(candidates, int) and not isinstance(candidates, bool):
        check_count(candidates, limits.max_search_seeds, f"{field}.candidates", "candidate seeds",
                    "max_search_seeds")


def check_sample(limits: Limits, request) -> None:
    """SampleRequest: images and masks."""
    n = request.latents.count if request.HasField("latents") else len(request.seeds)
    check_images(limits, n, "latents.count" if request.HasField("latents") else "seeds")
    check_masks(limits, request)


def check_dissect(limits: Limits, request) -> None:
    """DissectRequest: regions, threshold samples, masks."""
    check_count(len(request.regions), limits.max_regions, "regions", "regions", "max_regions")
    _samples(limits, request.thresholds.samples, "thresholds.samples")
    check_masks(limits, request)


def check_search(limits: Limits, request) -> None:
    """SearchContextRequest: candidate seeds, context regions, statistics samples, masks."""
    if request.HasField("seed_range"):
        check_count(request.seed_range.count, limits.max_search_seeds, "seed_range.count", "candidate seeds",
                    "max_search_seeds")
    check_count(len(request.seeds), limits.max_search_seeds, "seeds", "candidate seeds", "max_search_seeds")
    check_count(len(request.context), limits.max_regions, "context", "regions", "max_regions")
    _samples(limits, request.stats.samples, "stats.samples")
    check_masks(limits, request)


def check_statistics(limits: Limits, request) -> None:
    """ComputeStatisticsRequest: samples."""
    _samples(limits, request.stats.samples, "stats.samples")


def check_rewrite(limits: Limits, request) -> None:
    """RewriteRequest: preview images, the spec's regions, statistics samples and masks."""
    check_images(limits, len(request.preview_seeds), "preview_seeds")
    spec = request.spec
    n = int(spec.HasField("copy")) + len(spec.paste) + len(spec.context) + len(spec.found)
    check_count(n, limits.max_regions, "spec.paste", "regions (copy, paste, context and found)", "max_regions")
    _samples(limits, spec.stats.samples, "spec.stats.samples")
    _search(limits, spec.search.targets if spec.search.HasField("targets") else None, spec.search.candidates,
            "spec.search")
    check_masks(limits, request)


def check_spec(limits: Limits, spec: Any, prefix: str = "spec") -> None:
    """An edit spec in its JSON form: regions, statistics samples and the declared size of each mask."""
    if not isinstance(spec, dict):
        return                                   # the engine's own check names the problem
    regions: list[tuple[str, Any]] = []
    if spec.get("copy") is not None:
        regions.append((f"{prefix}.copy", spec["copy"]))
    for key in ("paste", "context", "found"):
        items = spec.get(key)
        if isinstance(items, list):
            regions += [(f"{prefix}.{key}[{i}]", r) for i, r in enumerate(items)]
    check_count(len(regions), limits.max_regions, f"{prefix}.paste", "regions (copy, paste, context and found)",
                "max_regions")
    stats = spec.get("stats")
    if isinstance(stats, dict) and isinstance(stats.get("samples"), int):
        _samples(limits, stats["samples"], f"{prefix}.stats.samples")
    search = spec.get("search")
    if isinstance(search, dict):
        _search(limits, search.get("targets"), search.get("candidates"), f"{prefix}.search")
    for field, region in regions:
        check_region_json(limits, region, field)


def check_region_json(limits: Limits, region: Any, field: str) -> None:
    """A JSON region's mask: its declared size at most ``max_mask_pixels`` (before it is inflated)."""
    mask = region.get("mask") if isinstance(region, dict) else None
    size = mask.get("size") if isinstance(mask, dict) else None
    if not (isinstance(size, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in size)):
        return                                   # malformed: the engine's decoder names it
    pixels = math.prod(size)
    if pixels > limits.max_mask_pixels:
        raise InvalidArgument(f"{field}.mask", f"a mask of {'x'.join(map(str, size))} is over "
                              f"{limits.max_mask_pixels:,} pixels (server setting max_mask_pixels)")
    # A small body can inflate to gigabytes: inflate at most one byte past the declared size first.
    try:
        data = base64.b64decode(mask.get("data") or "", validate=True)
        inflated = zlib.decompressobj().decompress(data, max(pixels, 0) + 1)
    except (TypeError, ValueError, zlib.error):
        return                                   # malformed: the engine's decoder names it
    if len(inflated) > pixels:
        raise InvalidArgument(f"{field}.mask", f"inflates to more than the {'x'.join(map(str, size))} its size "
                              "declares")
