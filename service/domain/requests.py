"""The domain's typed requests and results: what every transport maps its wire format to.

Requests (frozen dataclasses; ``check(limits)`` validates one with the one set of bounds, before
any work, and ``Domain`` calls it first):

- ``SampleRequest``: images for seeds or raw latents, optionally with unit interventions.
- ``SearchRequest``: the samples whose keys best match a context.
- ``DissectRequest``: a layer's units ranked against regions.
- ``StatisticsRequest``: a layer's key moment or value quantiles, into the shared cache.
- ``RewriteRequest``: an edit spec run on a version: an ``EditDraft`` a transport built once
  (its regions decoded), or the JSON form (``examples/edits/*.json``), parsed by ``typed``.
- ``VersionRef``: a version by model and number, for a transport that holds them apart.
- ``AliasRequest``: move (or unset) an alias under a compare-and-set expectation.
- ``RescaleRequest``: a version's own edit at another strength, as a new version (no fit).

Results: ``ModelSummary``, ``SampleResult``, ``LayersResult``, ``SearchResult``, ``DissectResult``,
``StatisticResult``, ``RewriteResult``, ``VersionSummary``. Each carries the resolved ``Version`` (so answers can
echo it) and what a transport needs to render it (the image resolution for heatmaps), so no
transport reaches into a generator.

Fields are named in errors as the gRPC request spells them (``seeds``, ``latents.count``,
``context[1].mask``, ``spec.paste[0]``); the HTTP side renames the few it spells differently.
Every refusal is an engine ``InvalidArgument``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch

from rulewright.registry.manifests import AliasState, Model, Version
from rulewright.registry.stats_cache import StatsKey

from rulewright.service.engine.dissect import DEFAULT_QUANTILE, Intervention, UnitScore
from rulewright.service.engine.edit import Edit, EditDraft
from rulewright.service.engine.errors import InvalidArgument
from rulewright.service.engine.regions import Region
# The engine's value types and wire codecs a transport may name, imported from here (the transports
# import the domain, not the engine): progress events and their cancellation, an edit spec's JSON
# upgrade, masks decoded, images encoded.
from rulewright.service.engine.edit import upgrade_json  # noqa: F401
from rulewright.service.engine.progress import Event, Progress  # noqa: F401
from rulewright.service.engine.regions import decode_pixels  # noqa: F401
from rulewright.service.engine.sampling import png_bytes  # noqa: F401
from rulewright.service.engine.search import Match
from rulewright.service.engine.stats import Stat
from rulewright.service.domain.limits import (Limits, check_count, check_draft, check_images, check_samples,
                                              check_strength, parse_spec)
from rulewright.service.domain.statistics import KEY_MOMENT, VALUE_QUANTILE

MAX_SEED = 2**63 - 1
STATISTICS = (KEY_MOMENT, VALUE_QUANTILE)
RANK_BY = ("iou", "contrast")


def _seeds(seeds: Sequence[int], field: str) -> None:
    for i, seed in enumerate(seeds):
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
            raise InvalidArgument(f"{field}[{i}]", f"must be an integer in [0, 2**63), got {seed!r}")


def _seed_span(seeds: Sequence[int], field: str, limit: int, what: str, setting: str) -> None:
    """A list or a range of seeds: its length against a cap, then each seed (a range by its ends)."""
    check_count(len(seeds), limit, field, what, setting)
    if isinstance(seeds, range):
        if seeds.step != 1 or seeds.start < 0 or seeds.stop - 1 > MAX_SEED:
            raise InvalidArgument(field, f"a range of seeds must lie in [0, 2**63) with step 1, got {seeds}")
    else:
        _seeds(seeds, field)


def _unit_interval(value: float, field: str, closed: bool) -> None:
    ok = 0.0 <= value <= 1.0 if closed else 0.0 < value < 1.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok:     # NaN fails both
        shape = "in [0, 1]" if closed else "strictly between 0 and 1"
        raise InvalidArgument(field, f"must lie {shape}, got {value!r}")


def _statistics_samples(limits: Limits, samples: int | None, seed_start: int, field: str, jobs: bool = True) -> None:
    """Samples a statistic is computed over (None: the server's default) and its first seed; ``jobs``:
    a key moment, which may be over ``max_stats_samples`` if a statistics job cached it."""
    if samples is not None:
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise InvalidArgument(f"{field}.samples", f"must be a positive integer, got {samples!r}")
        check_samples(limits, samples, f"{field}.samples", jobs)
    if isinstance(seed_start, bool) or not isinstance(seed_start, int) or not 0 <= seed_start <= MAX_SEED:
        raise InvalidArgument(f"{field}.seed_start", f"must be an integer in [0, 2**63), got {seed_start!r}")


def _regions(limits: Limits, regions: Sequence[Region], field: str, required: bool = True) -> None:
    if required and not regions:
        raise InvalidArgument(field, "give at least one region")
    check_count(len(regions), limits.max_regions, field, "regions", "max_regions")


# ---- requests --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class SampleRequest:
    """Images of ``model`` for ``seeds`` or raw ``latents``, optionally with unit interventions."""

    model: str                                   # faces, faces@production or faces/3
    seeds: Sequence[int] | None = None
    latents: torch.Tensor | None = None          # (N, z_dim), instead of seeds
    truncation: float = 1.0
    layer: str | None = None                     # where interventions act (None: the default layer)
    interventions: Sequence[Intervention] = ()
    strength: float | None = None                # the version's own edit at this strength (None: its own)

    @property
    def count_field(self) -> str:
        """The field that counts this request's images, as errors name it."""
        return "seeds" if self.latents is None else "latents.count"

    @property
    def count(self) -> int:
        """How many images the request asks for."""
        return len(self.seeds or ()) if self.latents is None else int(self.latents.shape[0])

    def check(self, limits: Limits) -> None:
        """Exactly one of seeds and latents, at most ``max_images`` of them; truncation in [0, 1];
        a strength within an edit's bounds."""
        if (self.seeds is None) == (self.latents is None):
            raise InvalidArgument("seeds", "give exactly one of seeds or latents")
        check_images(limits, self.count, self.count_field)
        if self.seeds is not None:
            _seeds(self.seeds, "seeds")
        _unit_interval(self.truncation, "truncation", closed=True)
        if self.strength is not None:
            check_strength(self.strength)


@dataclasses.dataclass(frozen=True)
class SearchRequest:
    """The ``top`` samples among ``seeds`` whose keys at ``layer`` best match the ``context`` regions."""

    model: str
    context: Sequence[Region]
    seeds: Sequence[int]                         # a list or a range of candidate seeds
    layer: str | None = None                     # None: the model's default layer
    rank: int = 1                                # directions of the context kept
    top: int = 16
    quantile: float = 0.999                      # the highlight threshold's quantile of responses
    truncation: float = 1.0
    ridge: float = 1e-4
    samples: int | None = None                   # samples the cached C is computed over (None: default)
    seed_start: int = 0

    def check(self, limits: Limits) -> None:
        """Context regions, candidate seeds, top, rank and the statistics' samples against their bounds."""
        _regions(limits, self.context, "context")
        if len(self.seeds) < 1:
            raise InvalidArgument("seeds", "give at least one candidate seed")
        _seed_span(self.seeds, "seeds", limits.max_search_seeds, "candidate seeds", "max_search_seeds")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise InvalidArgument("rank", f"must be a positive integer, got {self.rank!r}")
        if isinstance(self.top, bool) or not isinstance(self.top, int) or self.top < 1:
            raise InvalidArgument("top", f"must be a positive integer, got {self.top!r}")
        check_count(self.top, limits.max_search_seeds, "top", "matches", "max_search_seeds")
        _unit_interval(self.quantile, "quantile", closed=False)
        _unit_interval(self.truncation, "truncation", closed=True)
        if not (isinstance(self.ridge, (int, float)) and math.isfinite(self.ridge) and self.ridge >= 0):
            raise InvalidArgument("ridge", f"must be a finite number >= 0, got {self.ridge!r}")
        _statistics_samples(limits, self.samples, self.seed_start, "stats")


@dataclasses.dataclass(frozen=True)
class DissectRequest:
    """The units of ``layer`` ranked by how well they pick out ``regions``."""

    model: str
    regions: Sequence[Region]
    layer: str | None = None
    rank_by: str = "iou"                         # iou or contrast
    top: int = 0                                 # 0: every unit
    samples: int | None = None                   # samples the thresholds are computed over (None: default)
    seed_start: int = 0
    quantile: float = DEFAULT_QUANTILE           # each unit's threshold: this quantile of its values
    truncation: float = 1.0                      # applies to the regions' samples
    include_maps: bool = False                   # the returned units' maps on the regions' seeds

    def check(self, limits: Limits) -> None:
        """Regions, ranking, top, quantile and the thresholds' samples against their bounds."""
        _regions(limits, self.regions, "regions")
        if self.rank_by not in RANK_BY:
            raise InvalidArgument("rank_by", f"must be one of {', '.join(RANK_BY)}, got {self.rank_by!r}")
        if isinstance(self.top, bool) or not isinstance(self.top, int) or self.top < 0:
            raise InvalidArgument("top", f"must be an integer >= 0, got {self.top!r}")
        _unit_interval(self.quantile, "quantile", closed=False)
        _unit_interval(self.truncation, "truncation", closed=True)
        _statistics_samples(limits, self.samples, self.seed_start, "thresholds", jobs=False)


@dataclasses.dataclass(frozen=True)
class StatisticsRequest:
    """A statistic of ``model`` at ``layer`` in the shared cache, computed on a miss."""

    model: str
    layer: str | None = None
    kind: str = KEY_MOMENT                       # KEY_MOMENT or VALUE_QUANTILE
    samples: int | None = None                   # None: the server's default
    seed_start: int = 0
    truncation: float = 1.0

    def check(self, limits: Limits) -> None:
        """The statistic's kind, samples and truncation against their bounds."""
        if self.kind not in STATISTICS:
            raise InvalidArgument("statistic", f"must be one of {', '.join(STATISTICS)}, got {self.kind!r}")
        _statistics_samples(limits, self.samples, self.seed_start, "stats", jobs=self.kind == KEY_MOMENT)
        _unit_interval(self.truncation, "truncation", closed=True)


@dataclasses.dataclass(frozen=True)
class VersionRef:
    """One version by model and number: a reference a transport already holds apart, never
    joined into text and parsed back."""

    model: str
    number: int

    def __str__(self) -> str:
        return f"{self.model}/{self.number}"


@dataclasses.dataclass(frozen=True)
class RewriteRequest:
    """Run the edit ``spec`` on ``model`` and store the result as a new version (unless ``dry_run``)."""

    model: str | VersionRef                      # faces, faces@production, faces/3, or a VersionRef
    spec: EditDraft | dict                       # parsed, its regions decoded; or the JSON form (``typed``)
    author: str = "anonymous"
    request_id: str | None = None                # a retry with the same id returns the earlier version
    dry_run: bool = False
    preview_seeds: Sequence[int] = ()            # render these with the edit applied
    _parsed: EditDraft | None = dataclasses.field(default=None, init=False, repr=False, compare=False)

    def typed(self, limits: Limits) -> "RewriteRequest":
        """This request with its spec parsed (a JSON spec checked before its masks are decoded,
        once however often it is asked)."""
        if isinstance(self.spec, EditDraft):
            return self
        if not isinstance(self.spec, dict):
            raise InvalidArgument("spec", f"must be an object (an edit spec), got {type(self.spec).__name__}")
        if self._parsed is None:
            object.__setattr__(self, "_parsed", parse_spec(limits, self.spec))
        return dataclasses.replace(self, spec=self._parsed)

    def check(self, limits: Limits) -> None:
        """Preview seeds and the spec's regions, samples and search against their bounds.

        The spec's meaning (layers, ranks, regions inside the image) is the engine's to check,
        once the model is known.
        """
        check_images(limits, len(self.preview_seeds), "preview_seeds")
        _seeds(self.preview_seeds, "preview_seeds")
        check_draft(limits, self.typed(limits).spec)


@dataclasses.dataclass(frozen=True)
class AliasRequest:
    """Point ``alias`` at ``version`` (0: unset it), compare-and-set on what the caller last saw."""

    model: str
    alias: str
    version: int                                 # 0 unsets the alias
    expected_version: int | None = None          # where it points now (0: a new alias); or give etag
    etag: str | None = None
    reason: str = ""
    author: str = "anonymous"

    def check(self, limits: Limits | None = None) -> None:
        """Exactly one expectation; a version number or 0."""
        if (self.expected_version is None) == (self.etag is None):
            raise InvalidArgument("expectation", "state expected_version (0 for a new alias) or etag, not both")
        if isinstance(self.version, bool) or not isinstance(self.version, int) or self.version < 0:
            raise InvalidArgument("version", f"must be 0 (unset) or a version number, got {self.version!r}")


@dataclasses.dataclass(frozen=True)
class RescaleRequest:
    """A new version applying ``model``'s own edit at ``strength``: its delta shared, no fit."""

    model: str | VersionRef                      # the edited version: faces/3, faces@production
    strength: float
    description: str | None = None               # None: the source's
    author: str = "anonymous"
    request_id: str | None = None                # a retry with it returns the first result

    def check(self, limits: Limits | None = None) -> None:
        """A strength within an edit's bounds."""
        check_strength(self.strength)


# ---- results ---------------------------------------------------------------------------------

@dataclasses.dataclass
class ModelSummary:
    """A model, its newest version (None while it has none) and its aliases."""

    model: Model
    latest: int | None
    aliases: list[AliasState]


@dataclasses.dataclass
class VersionSummary:
    """A version and its lineage (version numbers, root first, ending with its own)."""

    version: Version
    lineage: list[int]


@dataclasses.dataclass
class SampleResult:
    """Images of one version: (N, H, W, 3) uint8, in the order asked, and the strength of its own
    edit they were drawn at (None for an import)."""

    version: Version
    images: torch.Tensor
    strength: float | None = None


@dataclasses.dataclass
class LayersResult:
    """A version's rewritable layers and the shape of its images and latents."""

    version: Version
    layers: list                                 # generators.base.LayerInfo, in forward order
    default_layer: str
    resolution: int
    z_dim: int
    arch: str
    truncation: bool = False                     # whether the architecture has the truncation trick


@dataclasses.dataclass
class SearchResult:
    """The best matches of a context search and the threshold that highlights them."""

    version: Version
    layer: str
    matches: list[Match]
    threshold: float
    resolution: int                              # the images' size, for drawing response maps


@dataclasses.dataclass
class DissectResult:
    """Units of a layer ranked against regions, with their thresholds and optional maps."""

    version: Version
    layer: str
    units: list[UnitScore]                       # best first (``top`` of them)
    thresholds: torch.Tensor                     # (units,) every unit's threshold
    maps: list                                   # (unit, seed, (H, W) tensor) for the returned units, if asked
    resolution: int = 0                          # the images' size, for drawing unit maps


@dataclasses.dataclass
class StatisticResult:
    """A statistic now in the cache: where it lives, whether it was there already, and its value."""

    version: Version
    layer: str
    kind: str                                    # KEY_MOMENT or VALUE_QUANTILE
    samples: int
    seed_start: int
    truncation: float
    cached: bool                                 # a hit: nothing was computed by this call
    key: StatsKey
    size_bytes: int
    stat: Stat


@dataclasses.dataclass
class RewriteResult:
    """What a Rewrite produced: the new version (None for a dry run), the edit, preview images."""

    parent: Version
    version: Version | None
    edit: Edit
    previews: torch.Tensor | None                # (N, H, W, 3) uint8 for the requested preview seeds
    replayed: bool = False                       # a retried request id: the earlier version, nothing new
