"""Per-request caps as the domain knows them: the ``Limits`` settings and the checks that need no wire format.

- ``Limits``: the caps (settings ``max_images``, ``max_search_seeds``, ``max_regions``,
  ``max_stats_samples``, ``max_job_samples``, ``max_mask_pixels``, ``max_message_mb``,
  ``max_running_jobs``, ``max_job_output_gb``);
  ``Limits.from_config(config)``.
- ``check_count(n, limit, field, what, setting)``: a count against one cap.
- ``check_images(limits, n, field, resolution)``: a count of images, and the size of the reply
  they make (raw RGB8, the larger encoding) against the message limit.
- ``check_samples``, ``check_search_spec``, ``check_spec``, ``check_region_json``: a statistic's
  samples, an edit's target search, an edit spec in its JSON form (regions, samples, search, the
  declared and inflated size of each mask), one JSON region's mask.
- ``check_spec_regions``: an edit spec's region count, naming the list that crosses the cap.

The transports' checks of their own messages live in ``server/limits.py`` and build on these.
Every refusal is an engine ``InvalidArgument`` whose description names the setting.
"""

from __future__ import annotations

import base64
import dataclasses
import math
import zlib
from typing import Any

from rulewright.service.engine.errors import InvalidArgument


@dataclasses.dataclass(frozen=True)
class Limits:
    """Caps on one request; defaults are the settings' defaults."""

    max_images: int = 64                  # images per Sample, OIP ModelInfer, Rewrite preview
    max_search_seeds: int = 10_000        # candidate seeds per SearchContext
    max_regions: int = 64                 # regions per Dissect, SearchContext, edit spec
    max_stats_samples: int = 100_000      # samples a request may compute a statistic over
    max_job_samples: int = 10_000_000     # samples a statistics job may compute a key moment over (and a
                                          # request may then use, cached, though over max_stats_samples)
    max_mask_pixels: int = 1 << 22        # width x height of one mask
    max_message_bytes: int = 64 << 20     # the gRPC message limit a reply must fit
    max_running_jobs: int = 4             # jobs of one kind (dataset, statistics) a server runs at once
    max_job_output_bytes: int = 256 << 30  # worst-case size of one dataset job's shards

    @classmethod
    def from_config(cls, config) -> "Limits":
        """The caps a ``config.ServeConfig`` sets."""
        return cls(max_images=config.max_images, max_search_seeds=config.max_search_seeds,
                   max_regions=config.max_regions, max_stats_samples=config.max_stats_samples,
                   max_job_samples=config.max_job_samples,
                   max_mask_pixels=config.max_mask_pixels, max_message_bytes=int(config.max_message_mb * 2**20),
                   max_running_jobs=config.max_running_jobs,
                   max_job_output_bytes=int(config.max_job_output_gb * 2**30))


def _over(field: str, what: str, limit: int, setting: str, got: int) -> InvalidArgument:
    return InvalidArgument(field, f"at most {limit:,} {what} per request (server setting {setting}), got {got:,}")


def check_count(n: int, limit: int, field: str, what: str, setting: str) -> None:
    """``n`` things of a request against a cap."""
    if n > limit:
        raise _over(field, what, limit, setting, n)


def check_images(limits: Limits, n: int, field: str, resolution: int | None = None) -> None:
    """``n`` images: at most ``max_images``, and (with ``resolution``) a reply that fits one message."""
    check_count(n, limits.max_images, field, "images", "max_images")
    if resolution is not None:
        size = n * resolution * resolution * 3
        if size > limits.max_message_bytes * 0.95:        # headroom for framing and other fields
            raise InvalidArgument(field, f"{n:,} images of {resolution}x{resolution} make a reply of about "
                                  f"{size / 2**20:.0f} MiB, over the message limit of "
                                  f"{limits.max_message_bytes / 2**20:.0f} MiB (server setting max_message_mb)")


def check_samples(limits: Limits, samples: int, field: str, jobs: bool = True) -> None:
    """Samples a statistic is computed over: at most ``max_stats_samples``, or (``jobs``: a key
    moment, which statistics jobs compute) at most ``max_job_samples``, which the domain then only
    reads from the cache and never computes within the request."""
    cap = max(limits.max_stats_samples, limits.max_job_samples) if jobs else limits.max_stats_samples
    if samples > cap:
        more = (f", and key moments of at most {limits.max_job_samples:,} once a statistics job computed them "
                "(server setting max_job_samples)") if jobs and limits.max_job_samples > limits.max_stats_samples else ""
        raise InvalidArgument(field, f"at most {limits.max_stats_samples:,} statistics samples are computed per "
                                     f"request (server setting max_stats_samples){more}, got {samples:,}")


def check_search_spec(limits: Limits, targets: Any, candidates: Any, field: str) -> None:
    """A rewrite's context search: its targets become regions of the edit, its candidates are
    ranked like SearchContext's seeds."""
    if isinstance(targets, int) and not isinstance(targets, bool):
        check_count(targets, limits.max_regions, f"{field}.targets", "found targets", "max_regions")
    if isinstance(candidates, int) and not isinstance(candidates, bool):
        check_count(candidates, limits.max_search_seeds, f"{field}.candidates", "candidate seeds",
                    "max_search_seeds")


def check_spec_regions(limits: Limits, counts: dict[str, int], copy: bool, prefix: str = "spec") -> None:
    """An edit spec's regions (a copy, then ``counts`` of paste, context and found) against
    ``max_regions``; the refusal names the list whose regions cross the cap."""
    total, field = int(copy), f"{prefix}.paste"
    for key in ("paste", "context", "found"):
        if total <= limits.max_regions < total + counts.get(key, 0):
            field = f"{prefix}.{key}"
        total += counts.get(key, 0)
    check_count(total, limits.max_regions, field, "regions (copy, paste, context and found)", "max_regions")


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
    check_spec_regions(limits, {key: len(spec[key]) if isinstance(spec.get(key), list) else 0
                                for key in ("paste", "context", "found")}, spec.get("copy") is not None, prefix)
    stats = spec.get("stats")
    if isinstance(stats, dict) and isinstance(stats.get("samples"), int):
        check_samples(limits, stats["samples"], f"{prefix}.stats.samples")
    search = spec.get("search")
    if isinstance(search, dict):
        check_search_spec(limits, search.get("targets"), search.get("candidates"), f"{prefix}.search")
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
