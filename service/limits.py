"""Per-request caps as the domain knows them: the ``Limits`` settings and the checks that need no wire format.

- ``Limits``: the caps (settings ``max_images``, ``max_search_seeds``, ``max_regions``,
  ``max_stats_samples``, ``max_mask_pixels``, ``max_message_mb``); ``Limits.from_config(config)``.
- ``check_count(n, limit, field, what, setting)``: a count against one cap.
- ``check_images(limits, n, field, resolution)``: a count of images, and the size of the reply
  they make (raw RGB8, the larger encoding) against the message limit.

The transports' checks of their own messages live in ``server/limits.py`` and build on these.
Every refusal is an engine ``InvalidArgument`` whose description names the setting.
"""

from __future__ import annotations

import dataclasses

from .engine.errors import InvalidArgument


@dataclasses.dataclass(frozen=True)
class Limits:
    """Caps on one request; defaults are the settings' defaults."""

    max_images: int = 64                  # images per Sample, OIP ModelInfer, Rewrite preview
    max_search_seeds: int = 10_000        # candidate seeds per SearchContext
    max_regions: int = 64                 # regions per Dissect, SearchContext, edit spec
    max_stats_samples: int = 100_000      # samples a statistic may be computed over
    max_mask_pixels: int = 1 << 22        # width x height of one mask
    max_message_bytes: int = 64 << 20     # the gRPC message limit a reply must fit

    @classmethod
    def from_config(cls, config) -> "Limits":
        """The caps a ``config.ServeConfig`` sets."""
        return cls(max_images=config.max_images, max_search_seeds=config.max_search_seeds,
                   max_regions=config.max_regions, max_stats_samples=config.max_stats_samples,
                   max_mask_pixels=config.max_mask_pixels, max_message_bytes=int(config.max_message_mb * 2**20))


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
