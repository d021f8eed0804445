"""Per-request caps as the domain knows them: the ``Limits`` settings and the checks that need no wire format.

- ``Limits``: the caps (settings ``max_images``, ``max_search_seeds``, ``max_regions``,
  ``max_stats_samples``, ``max_job_samples``, ``max_mask_pixels``, ``max_message_mb``,
  ``max_running_jobs``, ``max_job_output_gb``);
  ``Limits.from_config(config)``.
- ``check_count(n, limit, field, what, setting)``: a count against one cap.
- ``check_images(limits, n, field, resolution)``: a count of images, and the size of the reply
  they make (raw RGB8, the larger encoding) against the message limit.
- ``check_strength(value, field)``: an edit's strength within the engine's bounds (a request's
  strength of a version's own edit, a rescale's).
- ``check_samples``, ``check_search_spec``: a statistic's samples, an edit's target search.
- ``check_mask_pixels``: a mask's declared size, before it is decoded (the transports call it
  for their own messages' masks); ``check_region_json``: one JSON region's mask.
- ``check_spec_regions``: an edit spec's region count, naming the list that crosses the cap.
- ``check_spec`` (an edit spec in its JSON form, before anything in it is decoded: regions,
  samples, search, each mask's declared size), ``parse_spec`` (its keys and types checked against
  the API's EditSpec, so a mistyped or unknown field is named by its path, ``spec.paste[0].bbox``;
  then the caps; then parsed into an ``EditDraft``), ``check_draft`` (a parsed spec);
  ``fields_within``: the engine's field names under the request's (``spec.copy.mask``).

Every refusal is an engine ``InvalidArgument`` whose description names the setting.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any

from rulewright.service.domain.json_fields import check_json
from rulewright.service.engine.edit import REGION_LISTS, STRENGTH_BOUNDS, EditDraft, upgrade_json
from rulewright.service.engine.errors import InvalidArgument
from rulewright.service.engine.regions import mask_size
from rulewright.v1 import edit_pb2


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
    # The setting and its value travel as ErrorInfo metadata too, so a client can split its request.
    return InvalidArgument(field, f"at most {limit:,} {what} per request (server setting {setting}), got {got:,}",
                           setting=setting, limit=limit)


def check_count(n: int, limit: int, field: str, what: str, setting: str) -> None:
    """``n`` things of a request against a cap."""
    if n > limit:
        raise _over(field, what, limit, setting, n)


def check_images(limits: Limits, n: int, field: str, resolution: int | None = None) -> None:
    """``n`` images: at most ``max_images``, and (with ``resolution``) a reply that fits one message."""
    check_count(n, limits.max_images, field, "images", "max_images")
    if resolution is not None:
        size = n * resolution * resolution * 3
        fit = int(limits.max_message_bytes * 0.95) // (resolution * resolution * 3)  # headroom for framing
        if n > fit:
            raise InvalidArgument(field, f"{n:,} images of {resolution}x{resolution} make a reply of about "
                                  f"{size / 2**20:.0f} MiB, over the message limit of "
                                  f"{limits.max_message_bytes / 2**20:.0f} MiB (server setting max_message_mb)",
                                  setting="max_message_mb", limit=fit)


def check_strength(value: Any, field: str = "strength") -> float:
    """A strength within the bounds an edit spec's strength has (NaN and non-numbers refused)."""
    lo, hi = STRENGTH_BOUNDS
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= value <= hi:
        raise InvalidArgument(field, f"must be a number from {lo:g} to {hi:g}, got {value!r}")
    return float(value)


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


def check_mask_pixels(limits: Limits, field: str, width: int, height: int) -> None:
    """A mask's declared width x height at most ``max_mask_pixels`` (checked before it is decoded)."""
    if width * height > limits.max_mask_pixels:
        raise InvalidArgument(field, f"a mask of {width}x{height} is over {limits.max_mask_pixels:,} pixels "
                              "(server setting max_mask_pixels)")


def check_settings(limits: Limits, settings: dict, prefix: str = "spec") -> None:
    """An edit spec's statistics samples and context search, as given."""
    stats = settings.get("stats")
    if isinstance(stats, dict) and isinstance(stats.get("samples"), int):
        check_samples(limits, stats["samples"], f"{prefix}.stats.samples")
    search = settings.get("search")
    if isinstance(search, dict):
        check_search_spec(limits, search.get("targets"), search.get("candidates"), f"{prefix}.search")


def check_draft(limits: Limits, draft: EditDraft, prefix: str = "spec") -> None:
    """A parsed edit spec (``EditDraft``): its regions, statistics samples and search."""
    check_spec_regions(limits, {key: len(getattr(draft, key) or ()) for key in REGION_LISTS},
                       draft.copy is not None, prefix)
    check_settings(limits, draft.settings, prefix)


def check_spec(limits: Limits, spec: Any, prefix: str = "spec") -> None:
    """An edit spec in its JSON form, before anything in it is decoded: regions, statistics
    samples, search and the declared size of each mask."""
    if not isinstance(spec, dict):
        return                                   # the engine's own check names the problem
    regions: list[tuple[str, Any]] = []
    if spec.get("copy") is not None:
        regions.append((f"{prefix}.copy", spec["copy"]))
    for key in REGION_LISTS:
        items = spec.get(key)
        if isinstance(items, list):
            regions += [(f"{prefix}.{key}[{i}]", r) for i, r in enumerate(items)]
    check_spec_regions(limits, {key: len(spec[key]) if isinstance(spec.get(key), list) else 0
                                for key in REGION_LISTS}, spec.get("copy") is not None, prefix)
    check_settings(limits, spec, prefix)
    for field, region in regions:
        check_region_json(limits, region, field)


def check_region_json(limits: Limits, region: Any, field: str) -> None:
    """A JSON region's mask: its declared size at most ``max_mask_pixels`` (the decoder never
    inflates past the declared size)."""
    size = mask_size(region.get("mask")) if isinstance(region, dict) and region.get("mask") is not None else None
    if size is not None:
        check_mask_pixels(limits, f"{field}.mask", size[1], size[0])


def parse_spec(limits: Limits, spec: Any, prefix: str = "spec") -> EditDraft:
    """An edit spec's JSON form checked (field types and names as the API's EditSpec has them, then
    ``check_spec``) and then parsed, its masks decoded once."""
    if isinstance(spec, dict):          # a first-release spec's masks read as today's first
        check_json(edit_pb2.EditSpec.DESCRIPTOR, upgrade_json(spec), prefix)
    check_spec(limits, spec, prefix)
    with fields_within(prefix):
        return EditDraft.from_json(spec)


@contextlib.contextmanager
def fields_within(parent: str):
    """The engine names a spec's fields relative to the spec; requests hold it as ``parent``."""
    try:
        yield
    except InvalidArgument as exc:
        if exc.field == parent or exc.field.startswith(parent + "."):
            raise
        raise InvalidArgument(f"{parent}.{exc.field}", exc.description) from None
