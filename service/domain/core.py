"""The domain layer the servicers call: model references in, engine and registry work out.

- ``Domain(registry, stats_cache, device, max_resident)``: one per server process.
- ``Domain.open(data_dir)``: the embedded default (filesystem registry, in-process cache).
- ``bootstrap(name, path)``: import a model as version 1 with the default alias if absent.
- ``resolve(ref)``: ``faces/3``, ``faces@staging`` or ``faces`` (``faces@<default_alias>``, the
  ``production`` alias unless configured otherwise: ``references``) → one immutable ``Version``;
  a resident version named by number resolves even while the store is unreachable, without
  waiting on it: not asked once it is marked down, and (S3) waited for at most ``resident_check_s``
  before that (the store only confirms that the version was not deleted).
- ``limits`` (``limits.Limits``): per-request caps.
- ``generator(version)``: the resident version (``residency.Resident``), in one LRU bounded by a
  count and a memory budget: each base's weights once, each edited version only its low-rank
  factors, and the budget counts exactly that.
- The work every transport calls takes one typed request (``requests``) and returns its typed
  result; the request is checked against ``limits`` first, before any work:
  ``sample(SampleRequest)`` (through a ``SampleBatcher``, dynamic batching, unless it is turned
  off: requests for any versions of one base share forward passes; ``close()`` stops it), ``list_layers(ref)``, ``search(SearchRequest)``,
  ``dissect(DissectRequest)``, ``compute_statistic(StatisticsRequest)`` (a key moment or value
  quantiles through the cache; reports whether it was a hit) and ``rewrite(RewriteRequest)``
  (creates a version; ``dry_run`` and ``request_id`` honoured; cancellation creates nothing).
- Long work takes a ``Progress`` (``engine.progress``): events out, cancellation in; a
  cancelled statistic caches nothing.
- ``statistics``: C for a layer through the cache (what rewrites and searches use);
  ``check_edit``: an edit spec checked against a model, as ``rewrite`` checks it.
- ``set_alias(AliasRequest)``, ``rollback_alias``, ``export``, ``describe_model``, ``lineages``:
  the registry work every transport shares (compare-and-set alias moves; a version's whole
  weights; a model with its aliases and newest version; versions' lineages, read once per
  ancestor: ``lineages(registry, versions)``).
- ``import_model``: safetensors bytes (or an NVIDIA network pickle, converted first) checked
  against their declared architecture and config, then registered as a new model's version 1.

Every result carries the resolved ``Version``, so responses can echo it. Images of a version
(Sample, OIP, the editor, rewrite previews) always come from the factored path, so the same
(version, seed, truncation, strength) gives the same bytes everywhere. Hooked work (interventions,
dissection, rewrites, search, statistics) runs on a private dense module (``hookable``), so its
hooks never reach the samples other requests draw meanwhile.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import dataclasses
import logging
import re
import threading
from pathlib import Path
from typing import Any, Sequence

import torch

from rulewright.registry.errors import NotFound, Unavailable
from rulewright.registry.manifests import AliasState, Model, Version
from rulewright.registry.registry import Registry
from rulewright.registry.stats_cache import StatsCache, open_stats_cache
from rulewright.service.domain.weights import export_bytes

from rulewright.service.engine import delta as delta_codec
from rulewright.service.engine import dissect
from rulewright.service.engine.device import configure_determinism, select_device
from rulewright.service.engine.errors import InvalidArgument
from rulewright.service.engine.edit import Edit, EditDraft, EditSpec, check_improved
from rulewright.service.engine.progress import Progress
from rulewright.service.engine.generators.base import Generator
from rulewright.service.engine.loading import ARCHITECTURES, is_safetensors, read_state_dict, detect_architecture
from rulewright.service.engine.nvidia_pkl import convert_network_pickle, is_network_pickle, to_safetensors as nvidia_to_safetensors
from rulewright.service.engine.rewrite import chooses_strength, rewritable_layers, rewrite as engine_rewrite
from rulewright.service.domain.batching import SampleBatcher
from rulewright.service.domain.adapters import Adapters
from rulewright.service.domain.catalog import Catalog, lineages
from rulewright.service.domain.references import DEFAULT_ALIAS, point_default_alias, resolve as resolve_reference
from rulewright.service.domain.residency import Residency, Resident
from rulewright.service.domain.limits import Limits, check_images, fields_within, parse_spec
from rulewright.service.domain.requests import (AliasRequest, DissectRequest, DissectResult, LayersResult, ModelSummary, RewriteRequest,
                       RewriteResult, SampleRequest, SampleResult, SearchRequest, SearchResult, StatisticResult,
                       StatisticsRequest, VersionRef)
from rulewright.service.domain.statistics import KEY_MOMENT, VALUE_QUANTILE, NotCached, StatisticCorrupt, Statistics
from rulewright.service.engine.sampling import check_latents, latents, to_uint8
from rulewright.service.engine.search import direction_for, response_threshold, search
from rulewright.service.engine.stats import SecondMoment

log = logging.getLogger(__name__)

_NUMBERED = re.compile(r"^([^/@]+)/([0-9]+)$")     # model/N: a version by number


def _numbered(ref: str) -> VersionRef | None:
    """``model/N`` as a VersionRef; None for an alias, a bare model or anything else."""
    m = _NUMBERED.match(ref) if isinstance(ref, str) else None
    return VersionRef(m.group(1), int(m.group(2))) if m else None


class Domain(Catalog, Adapters):
    """Resolves references, keeps versions resident and runs the engine and registry for servicers
    (the registry's listings, lookups and deletions: ``Catalog``)."""

    def __init__(
        self,
        registry: Registry,               # models, versions, aliases, blobs
        stats_cache: StatsCache,          # shared key statistics (Redis) or in-process
        device: str = "auto",             # where generators run
        max_resident: int = 1024,         # versions kept loaded (an edited one holds only its low-rank factors)
        memory_budget_bytes: int | None = None,   # most bytes kept loaded (bases once, plus factors); None: no limit
        stats_samples: int = 1000,        # default samples for C when a spec does not say
        max_batch: int = 16,              # most images in one forward pass
        batch_delay_ms: float = 2.0,      # how long a Sample waits for others to share its forward pass
        dynamic_batching: bool = True,    # False: each Sample runs its own forward passes
        limits=None,                      # limits.Limits: per-request caps; None: the defaults
        resident_check_s: float = 0.25,   # most a resident version named by number waits for the store's word
        default_alias: str = DEFAULT_ALIAS,   # what a bare model name means: name@default_alias
    ):
        configure_determinism()
        self.registry = registry
        self.stats_cache = stats_cache
        self.device = select_device(device)
        self.stats_samples = stats_samples
        self._residency = Residency(registry, self.device, max_resident, memory_budget_bytes)
        self.resident_check_s, self.default_alias = resident_check_s, default_alias
        # Store lookups for resident versions run here, so a request can stop waiting for a store that
        # hangs while the call runs on to its own timeout (and marks the store down).
        self._checks = concurrent.futures.ThreadPoolExecutor(16, thread_name_prefix="resident-check")
        self._lock = threading.Lock()
        self.stats = Statistics(stats_cache, self._observe_stats, store=registry.store)
        self.metrics = None               # server.metrics.Metrics once a server binds one: batches, cache lookups
        self.s3_config = None             # the server's S3 settings for other stores (job outputs); None: RULEWRIGHT_S3_*
        self.limits = limits if limits is not None else Limits()
        if max_batch < 1:
            raise ValueError(f"max_batch must be positive, got {max_batch}")
        self.max_batch = max_batch
        self.batcher = SampleBatcher(max_batch, batch_delay_ms / 1000, self._observe_batch) if dynamic_batching else None

    @classmethod
    def from_config(cls, config) -> "Domain":
        """The domain a ``server.config.ServeConfig`` describes: its registry, cache, device and limits."""
        kw = dict(device=config.device, max_resident=config.max_resident,
                  memory_budget_bytes=int(config.memory_budget_mb * 2**20) or None, max_batch=config.max_batch,
                  batch_delay_ms=config.batch_delay_ms, dynamic_batching=config.dynamic_batching,
                  limits=Limits.from_config(config), resident_check_s=config.resident_check_s,
                  default_alias=config.default_alias)
        if not config.registry_uri:
            domain = cls.open(config.data_dir, config.stats_cache, **kw)
        else:
            registry = Registry.open(config.registry_uri,
                                     s3=_s3_config(config) if config.registry_uri.startswith("s3://") else None)
            if config.create_bucket and hasattr(registry.store, "ensure_bucket"):
                registry.store.ensure_bucket()
            domain = cls(registry, open_stats_cache(config.stats_cache), **kw)
        domain.s3_config = _s3_config(config)
        return domain

    @property
    def max_resident(self) -> int:
        """Most versions kept resident."""
        return self._residency.max_resident

    @max_resident.setter
    def max_resident(self, value: int) -> None:
        self._residency.max_resident = value

    @property
    def memory_budget_bytes(self) -> int | None:
        """Most bytes kept resident (bases once, plus every version's factors); None: no limit."""
        return self._residency.budget_bytes

    @memory_budget_bytes.setter
    def memory_budget_bytes(self, value: int | None) -> None:
        self._residency.budget_bytes = value

    def close(self) -> None:
        """Finish queued samples and stop the batcher (the server calls this after it stops)."""
        if self.batcher is not None:
            self.batcher.close()
        self._checks.shutdown(wait=False, cancel_futures=True)

    def _observe_stats(self, kind: str, hit: bool) -> None:
        if self.metrics is not None:
            self.metrics.observe_stats_cache(kind, hit=hit)

    def _observe_batch(self, n: int) -> None:
        if self.metrics is not None:
            self.metrics.observe_batch(n)

    @classmethod
    def open(cls, data_dir: str | Path, stats_cache: str | None = None, **kw: Any) -> "Domain":
        """The embedded default: a filesystem registry under ``data_dir`` and an in-process cache."""
        path = Path(data_dir).resolve() / "registry"
        path.mkdir(parents=True, exist_ok=True)
        return cls(Registry.open(path.as_uri()), open_stats_cache(stats_cache or "memory://"), **kw)

    # ---- models and versions -----------------------------------------------------------------

    def bootstrap(self, name: str, path: str | Path, alias: str | None = None, author: str = "rulewright") -> Version:
        """Import ``path`` as model ``name`` (version 1, alias ``alias``, else the default) unless it exists; idempotent.

        An import killed midway (the model without its version 1) is finished with the same
        request id, so a crash during the first start never keeps the server from starting.
        """
        try:
            pending = self.registry.import_pending(name)
        except NotFound:
            pending = True
        if pending:
            data = Path(path).read_bytes()
            state = read_state_dict(data)
            arch = detect_architecture(state)
            config = ARCHITECTURES[arch].from_state_dict(state).config()
            self.registry.import_model(name, arch=arch, config=config, weights=data, author=author,
                                       request_id=f"bootstrap-{name}", spec={"source": str(Path(path).name)})
        alias = alias or self.default_alias
        point_default_alias(self.registry, name, alias, 1, author, "bootstrap")
        return self.registry.resolve(f"{name}@{alias}")

    def resolve(self, ref: str | VersionRef) -> Version:
        """One immutable version for a reference (registry errors pass through).

        A version named by number (``faces/3``, or a ``VersionRef``) that is resident keeps
        serving while the store is unreachable (versions are immutable; the store would only say
        whether it was deleted): once the store is marked down it is not asked at all, and before
        that its answer is awaited for at most ``resident_check_s`` (a store that can hang: S3).
        Aliases, bare names included (``name@default_alias``), need the store and stay UNAVAILABLE.
        """
        numbered = ref if isinstance(ref, VersionRef) else _numbered(ref)
        lookup = ((lambda: self.registry.get_version(numbered.model, numbered.number)) if isinstance(ref, VersionRef)
                  else (lambda: resolve_reference(self.registry, ref, self.default_alias)))
        hit = self._residency.peek(numbered.model, numbered.number) if numbered else None
        if hit is not None:
            if not self.registry.store.available():
                return hit.version
            if hasattr(self.registry.store, "probe"):     # a store across a network, which can hang
                return self._confirm(lookup, hit)
        try:
            return lookup()
        except Unavailable:
            hit = hit or (self._residency.peek(numbered.model, numbered.number) if numbered else None)
            if hit is None:
                raise
            return hit.version

    def _confirm(self, lookup, hit: Resident) -> Version:
        """The store's answer (``lookup()``: a deletion shows as NOT_FOUND), or the resident version
        if the store fails or has not answered within ``resident_check_s``."""
        try:
            call = self._checks.submit(contextvars.copy_context().run, lookup)  # with the RPC's deadline
        except RuntimeError:              # closed: a last request of a server that is stopping
            return lookup()
        try:
            return call.result(timeout=self.resident_check_s)
        except (concurrent.futures.TimeoutError, Unavailable):
            log.info("resident version served without the store's answer", extra={
                "event": "resident_unconfirmed", "model": hit.version.model, "version": hit.version.number})
            return hit.version

    def generator(self, version: Version) -> Resident:
        """The resident ``version`` (loaded on first use, least recently used evicted).

        An edited version shares its base's generator (``.model``: layers, shapes) and holds only
        its low-rank factors: draw its images with ``sample`` (or ``Resident.render``), and hook
        only ``hookable()``.
        """
        return self._residency.get(version)

    def resident_bytes(self) -> int:
        """Bytes the resident versions hold: each base's tensors once, plus every version's factors."""
        return self._residency.nbytes()

    def resident_versions(self) -> list[tuple[str, int]]:
        """(model, number) of every resident version, least recently used first."""
        return self._residency.versions()

    # ---- generator work ----------------------------------------------------------------------

    def _resident_for(self, ref: str) -> Resident:
        return self.generator(self.resolve(ref))

    @staticmethod
    def _truncation(model: Generator, truncation: float) -> None:
        try:
            model.check_truncation(truncation)
        except ValueError as exc:               # the architecture's own limit (no truncation trick)
            raise InvalidArgument("truncation", str(exc)) from None

    def sample(self, request: SampleRequest, progress: Progress | None = None) -> SampleResult:
        """Images for seeds or raw latents, with optional unit interventions.

        Checked against ``limits`` before any work (the reply's size too, once the resolution
        is known); a stopped ``progress`` ends the work with ``Cancelled`` (a batched request
        leaves its batch).
        """
        request.check(self.limits)
        progress = progress or Progress()
        res = self._resident_for(request.model).at(request.strength)    # its own edit at the request's strength
        version, model = res.version, res.model
        check_images(self.limits, request.count, request.count_field, model.resolution)
        self._truncation(model, request.truncation)
        z = latents(list(request.seeds), model.z_dim) if request.latents is None else request.latents
        check_latents(z, model.z_dim)
        truncation = request.truncation
        if request.interventions:
            images = dissect.sample_with_interventions(res.hookable(), None, request.layer or model.default_layer(),
                                                       list(request.interventions), truncation=truncation, z=z)
        elif self.batcher is not None:
            images = self.batcher.submit(res.batch_key, model, z, truncation, should_stop=progress.stopped,
                                         change=res.change)
        else:
            parts = []
            for start in range(0, z.shape[0], self.max_batch):   # a pass at a time, so a cancel stops between them
                progress.check("sampling")
                chunk = z[start:start + self.max_batch]
                self._observe_batch(chunk.shape[0])
                parts.append(res.render(chunk, truncation, batch_size=self.max_batch))
            images = torch.cat(parts)
        return SampleResult(version, to_uint8(images), res.strength)

    def list_layers(self, ref: str) -> LayersResult:
        """A version's rewritable layers, its default layer and the shape of its images and latents."""
        res = self._resident_for(ref)
        model = res.model
        return LayersResult(res.version, model.layer_infos(), model.default_layer(), model.resolution, model.z_dim,
                            model.arch, model.supports_truncation)

    def statistics(self, version: Version, layer: str, samples: int | None = None, seed_start: int = 0,
                   truncation: float = 1.0, progress: Progress | None = None,
                   field: str = "stats.samples") -> SecondMoment:
        """C at ``layer`` for ``version`` through the shared cache (computed once on a miss).

        ``progress`` gets a ``statistics`` event per batch of a computation, and ``waiting``
        ones about once a second while another request computes it; stopping it cancels the
        computation (``Cancelled``; nothing is cached). Over ``max_stats_samples`` it is only read
        (a statistics job's result); ``field`` names the samples in the refusal if it is absent.
        """
        return self._cached_stat(version, layer, KEY_MOMENT, samples, seed_start, truncation, progress, field).stat

    def compute_statistic(self, request: StatisticsRequest, progress: Progress | None = None) -> StatisticResult:
        """A statistic of a version at a layer (the default layer if None) in the cache, computed on a miss."""
        request.check(self.limits)
        res = self._resident_for(request.model)
        self._truncation(res.model, request.truncation)
        layer = request.layer or res.model.default_layer()
        return self._cached_stat(res.version, layer, request.kind, request.samples, request.seed_start,
                                 request.truncation, progress)

    def _cached_stat(self, version: Version, layer: str, kind: str, samples: int | None, seed_start: int,
                     truncation: float, progress: Progress | None, field: str = "stats.samples") -> StatisticResult:
        samples = samples or self.stats_samples
        res = self.generator(version)
        res.model.layer(layer)
        # Over max_stats_samples a request only reads what a statistics job computed: one request
        # must not occupy the server for a job's worth of samples, but a cached moment costs nothing.
        compute = samples <= self.limits.max_stats_samples
        try:
            found = self.stats.get(res.hookable, layer, kind, range(seed_start, seed_start + samples), truncation,
                                   progress, memo=(version.model, version.number), arch=res.model.arch,
                                   compute=compute)
        except NotCached:
            raise InvalidArgument(field, f"{samples:,} samples are more than one request computes (server setting "
                                  f"max_stats_samples: {self.limits.max_stats_samples:,}); a statistics job computes "
                                  f"them first: " + _stats_job_command(version, layer, samples, seed_start, truncation)
                                  ) from None
        except StatisticCorrupt as exc:
            if not exc.metadata.get("statistic_key"):
                raise
            raise StatisticCorrupt(f"{exc.message}; more samples than one request computes (server setting "
                                   f"max_stats_samples: {self.limits.max_stats_samples:,}), so run its statistics job "
                                   f"again to rewrite it: "
                                   + _stats_job_command(version, layer, samples, seed_start, truncation),
                                   field=field, **exc.metadata) from None
        return StatisticResult(version, layer, kind, samples, seed_start, float(truncation), found.cached, found.key,
                               found.size_bytes, found.stat)

    def rewrite(self, request: RewriteRequest, progress: Progress | None = None) -> RewriteResult:
        """Run an edit on a version and store it as a new version (unless ``dry_run``).

        A ``request_id`` already used returns the earlier version without recomputing; stopping
        ``progress`` (a cancellation) or any error creates nothing, and a fit that never did better
        than no edit is refused (``EditDidNotImprove``), a dry run too.
        """
        request = request.typed(self.limits)          # a JSON spec parsed here, once
        request.check(self.limits)
        progress = progress or Progress()
        parent = self.resolve(request.model)
        if request.request_id and not request.dry_run:
            prior = self.registry.find_version_by_request_id(parent.model, request.request_id)
            if prior is not None:
                return RewriteResult(parent, prior, Edit("", [], prior.spec or {}, prior.metrics or {}), None, True)
        res = self.generator(parent)
        model = res.model
        checked = self.check_edit(request.spec, model)
        progress.report("statistics", 0, checked.stats["samples"])
        moment = self.statistics(parent, checked.layer, checked.stats["samples"], checked.stats["seed_start"],
                                 checked.truncation, progress=progress, field="spec.stats.samples")
        moments = None
        if checked.method == "multilayer" and checked.factors == "context":
            # The other layers' moments through the cache too: over max_stats_samples they are only
            # read (a statistics job's), never computed inside this request by the engine.
            moments = {name: self.statistics(parent, name, checked.stats["samples"], checked.stats["seed_start"],
                                             checked.truncation, progress=progress, field="spec.stats.samples")
                       for name in rewritable_layers(model, checked) if name != checked.layer}
        private = res.hookable()        # the engine hooks it while it gathers keys and values
        with fields_within("spec"):
            # A spec that names no strength gets the one its strength curve picks.
            edit = engine_rewrite(private, checked, moment=moment, progress=progress, moments=moments,
                                  choose_strength=chooses_strength(request.spec))
        check_improved(edit)            # a fit that stayed at no edit is refused, dry or not, before any write
        previews = None
        if request.preview_seeds:
            # Through the factored path, as the new version will be sampled: the same bytes.
            z = latents(list(request.preview_seeds), model.z_dim)
            previews = to_uint8(res.render(z, checked.truncation, batch_size=self.max_batch, then=edit.deltas))
        if request.dry_run:
            return RewriteResult(parent, None, edit, previews)
        progress.check("rewrite (before the version was stored)")
        version = self.registry.create_version(
            parent.model, parent=parent.number, delta=delta_codec.to_bytes(edit.deltas), spec=edit.spec,
            metrics=_json_metrics(edit.metrics), author=request.author, request_id=request.request_id)
        return RewriteResult(parent, version, edit, previews)

    def check_edit(self, spec: EditDraft | dict, model: Generator | str | VersionRef) -> EditSpec:
        """An edit spec (parsed, or its JSON form) checked against a model (a generator or a
        reference); errors name ``spec.<field>``."""
        if not isinstance(model, Generator):
            model = self._resident_for(model).model
        draft = spec if isinstance(spec, EditDraft) else parse_spec(self.limits, spec)
        with fields_within("spec"):
            return EditSpec.complete(draft, model)

    def search(self, request: SearchRequest, progress: Progress | None = None) -> SearchResult:
        """The best matches for context regions, and the threshold that highlights them.

        ``samples`` and ``seed_start`` choose the samples C is computed over (a cached
        statistic); stopping ``progress`` stops that computation (``Cancelled``).
        """
        request.check(self.limits)
        res = self._resident_for(request.model)
        self._truncation(res.model, request.truncation)
        layer = request.layer or res.model.default_layer()
        moment = self.statistics(res.version, layer, request.samples, request.seed_start,
                                 truncation=request.truncation, progress=progress)
        private = res.hookable()
        d = direction_for(private, layer, moment.moment(), list(request.context), request.rank, ridge=request.ridge,
                          truncation=request.truncation)
        threshold = response_threshold(private, layer, d, range(200), request.quantile, request.truncation)
        matches = search(private, layer, d, request.seeds, request.top, threshold, request.truncation)
        return SearchResult(res.version, layer, matches, threshold, res.model.resolution)

    def dissect(self, request: DissectRequest, progress: Progress | None = None) -> DissectResult:
        """Units of a layer (None: the default) ranked against regions, best first.

        Thresholds are each unit's ``quantile`` over ``samples`` untruncated samples from
        ``seed_start`` (the cached VALUE_QUANTILE statistic); ``truncation`` applies to the
        regions' samples. ``top`` 0 returns every unit. Stopping ``progress`` stops the
        thresholds' computation (``Cancelled``).
        """
        request.check(self.limits)
        res = self._resident_for(request.model)
        self._truncation(res.model, request.truncation)
        layer = request.layer or res.model.default_layer()
        quantiles = self._cached_stat(res.version, layer, VALUE_QUANTILE, request.samples, request.seed_start, 1.0,
                                      progress, "thresholds.samples").stat
        private = res.hookable()     # unit maps hook it
        regions = list(request.regions)
        ranked = dissect.rank_units(private, layer, regions, quantiles, by=request.rank_by,
                                    truncation=request.truncation, q=request.quantile)
        ranked = ranked[:request.top] if request.top else ranked
        maps = []
        if request.include_maps and ranked:
            seeds = list(dict.fromkeys(r.seed for r in regions))
            values = dissect.unit_maps(private, layer, seeds=seeds, truncation=request.truncation)
            maps = [(u.unit, seed, values[i, u.unit]) for i, seed in enumerate(seeds) for u in ranked]
        return DissectResult(res.version, layer, ranked, quantiles.quantile(float(request.quantile)), maps,
                             res.model.resolution)

    # ---- registry work the transports share -------------------------------------------------

    def set_alias(self, request: AliasRequest) -> AliasState:
        """Point an alias at a version (version 0 unsets it) if it is still where the caller saw it."""
        request.check()
        kw: dict[str, Any] = ({"etag": request.etag} if request.etag is not None
                              else {"expected_version": request.expected_version or None})
        if request.version == 0:
            return self.registry.delete_alias(request.model, request.alias, reason=request.reason,
                                              author=request.author, **kw)
        return self.registry.set_alias(request.model, request.alias, request.version, reason=request.reason,
                                       author=request.author, **kw)

    def rollback_alias(self, model: str, alias: str, etag: str | None = None, reason: str = "",
                       author: str = "anonymous") -> AliasState:
        """Move an alias back to where its latest move came from (only from state ``etag``, if given).

        Without an etag the registry compares and sets on the state it reads, so a move in
        between is still never undone blindly.
        """
        return self.registry.rollback_alias(model, alias, etag=etag or None, reason=reason, author=author)

    def describe_model(self, model: str | Model) -> ModelSummary:
        """A model with its aliases and its newest version (None while it has none)."""
        if isinstance(model, str):
            model = self.registry.get_model(model)
        try:
            latest = self.registry.resolve(model.name).number
        except NotFound:
            latest = None
        return ModelSummary(model, latest, self.registry.list_aliases(model.name))

    def lineages(self, versions: Sequence[Version]) -> list[list[int]]:
        """The lineage (root first) of each version (``lineages``)."""
        return lineages(self.registry, versions)

    def export(self, model: str, number: int) -> tuple[Version, bytes]:
        """A version and its whole weights as one safetensors file."""
        version = self.registry.get_version(model, number)
        return version, export_bytes(self.registry, model, number)

    def import_model(self, name: str, arch: str, config: dict | None, data: bytes, author: str = "anonymous",
                     description: str = "", spec: dict | None = None, metrics: dict | None = None,
                     request_id: str | None = None) -> Version:
        """Register safetensors ``data`` as model ``name``'s version 1 once its layout checks out, with
        the default alias on it (so the bare name serves it, as after ``bootstrap``).

        An NVIDIA StyleGAN2-ADA network pickle (``data`` begins like a pickle) is read as data and
        converted to ``stylegan2`` first (``engine.nvidia_pkl``); what was found in it is recorded
        in the version's spec as ``converted_from``.

        ``InvalidArgument`` (engine) names ``weights`` for bytes that are not a readable
        safetensors file or convertible network pickle or fit no architecture, ``arch`` for a
        declared architecture the weights are not, and ``config`` for a declared config the
        weights contradict.
        """
        if is_network_pickle(data):
            # Read as data and converted here, so the registry stores safetensors like any import.
            conversion = convert_network_pickle(data)
            data = nvidia_to_safetensors(conversion)
            spec = {**(spec or {}), "converted_from": conversion.source}
        elif not is_safetensors(data):
            raise InvalidArgument("weights", "neither a safetensors file nor an NVIDIA StyleGAN2-ADA network pickle "
                                             "(torch checkpoints are refused)")
        try:
            state = read_state_dict(data)
            detected = detect_architecture(state)
        except Exception as exc:  # noqa: BLE001 -- any reader failure is bad input
            raise InvalidArgument("weights", f"unreadable weights: {exc}") from None
        if arch and arch != detected:
            raise InvalidArgument("arch", f"declared {arch!r}, but the weights are a {detected} state dict")
        if detected not in ARCHITECTURES:
            raise InvalidArgument("weights", f"architecture {detected!r} is not supported")
        try:
            derived = ARCHITECTURES[detected].from_state_dict(state).config()
        except Exception as exc:  # noqa: BLE001 -- a state dict that does not fit its layout
            raise InvalidArgument("weights", str(exc)) from None
        for k, v in (config or {}).items():
            if k in derived and _json_metrics(derived)[k] != v:
                raise InvalidArgument("config", f"{k} is {v!r}, but the weights say {_json_metrics(derived)[k]!r}")
        version = self.registry.import_model(name, arch=detected, config=_json_metrics(derived), weights=data,
                                             author=author, description=description, spec=spec, metrics=metrics,
                                             request_id=request_id)
        point_default_alias(self.registry, version.model, self.default_alias, version.number, author, "import")
        return version

def _stats_job_command(version: Version, layer: str, samples: int, seed_start: int, truncation: float) -> str:
    """The CLI command of the statistics job that computes this statistic."""
    return (f"rulewright stats create {version.model}/{version.number} --layer {layer} --samples {samples} "
            f"--seed-start {seed_start}" + (f" --truncation {truncation}" if truncation != 1.0 else ""))


def _s3_config(config):
    """``RULEWRIGHT_S3_*`` (endpoint, keys, TLS) with the store timeouts the settings give."""
    from rulewright.registry.s3store import S3Config

    return dataclasses.replace(S3Config.from_env(), connect_timeout_s=config.s3_connect_timeout_s,
                               read_timeout_s=config.s3_read_timeout_s, max_attempts=config.s3_max_attempts,
                               call_timeout_s=config.store_timeout_s)


def _json_metrics(metrics: dict) -> dict:
    """Metrics with tensors and other non-JSON values turned into plain numbers and lists."""
    def conv(v: Any) -> Any:
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        if isinstance(v, torch.Tensor):
            return v.tolist()
        return v
    return conv(metrics)
