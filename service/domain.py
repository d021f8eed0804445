"""The domain layer the servicers call: model references in, engine and registry work out.

- ``Domain(registry, stats_cache, device, max_resident)``: one per server process.
- ``Domain.open(data_dir)``: the embedded default (filesystem registry, in-process cache).
- ``bootstrap(name, path)``: import a model as version 1 with alias ``production`` if absent.
- ``resolve(ref)``: ``faces``, ``faces@production`` or ``faces/3`` → one immutable ``Version``;
  a resident version named by number resolves even while the store is unreachable.
- ``limits`` (``limits.Limits``): per-request caps; ``sample`` checks its images against them.
- ``generator(version)``: the resident version (``residency.Resident``), in one LRU bounded by a
  count and a memory budget: each base's weights once, each edited version only its low-rank
  factors, and the budget counts exactly that.
- ``sample`` runs through a ``SampleBatcher`` (dynamic batching) unless it is turned off; requests
  for any versions of one base share forward passes. ``close()`` stops it.
- ``sample``, ``list_layers``, ``statistics`` (through the statistics cache), ``rewrite``
  (creates a version; ``dry_run`` and ``request_id`` honoured; cancellation creates nothing),
  ``dissect`` and ``search``.
- ``compute_statistic``: a key moment or value quantiles through the cache, with progress and
  cancellation (a cancelled computation caches nothing); reports whether it was a hit.
- ``import_model``: safetensors bytes checked against their declared architecture and config,
  then registered as a new model's version 1.

Every result carries the resolved ``Version``, so responses can echo it. Images of a version
(Sample, OIP, the editor, rewrite previews) always come from the factored path, so the same
(version, seed, truncation) gives the same bytes everywhere. Hooked work (unit interventions,
dissection, rewrites, search, statistics) runs on a private dense module (``hookable``), so its
hooks never reach the samples other requests draw meanwhile.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from rulewright.registry.errors import NotFound, Unavailable
from rulewright.registry.manifests import Version
from rulewright.registry.registry import Registry
from rulewright.registry.stats_cache import StatsCache, StatsKey, open_stats_cache

from .engine import delta as delta_codec
from .engine import dissect
from .engine.device import configure_determinism, select_device
from .engine.errors import Cancelled, InvalidArgument
from .engine.edit import Edit, EditSpec
from .engine.loading import ARCHITECTURES, is_safetensors, read_state_dict, detect_architecture
from .engine.regions import Region
from .engine.rewrite import rewrite as engine_rewrite
from .batching import SampleBatcher
from .residency import Residency, Resident
from .limits import Limits, check_images
from .statistics import KEY_MOMENT, VALUE_QUANTILE, stat_key
from .engine.sampling import check_latents, latents, to_uint8
from .engine.search import Match, direction_for, response_threshold, search
from .engine.stats import Quantile, SecondMoment, Stat, key_moment, load_stat, value_quantiles

log = logging.getLogger(__name__)

Progress = Callable[[dict], None]
StopCheck = Callable[[], bool]
STATISTICS = (KEY_MOMENT, VALUE_QUANTILE)
_NUMBERED = re.compile(r"^([^/@]+)/([0-9]+)$")     # model/N: a version by number


@dataclasses.dataclass
class RewriteResult:
    """What a Rewrite produced: the new version (None for a dry run), the edit, preview images."""

    parent: Version
    version: Version | None
    edit: Edit
    previews: torch.Tensor | None      # (N, H, W, 3) uint8 for the requested preview seeds
    replayed: bool = False             # a retried request id: the earlier version, nothing new


@dataclasses.dataclass
class StatisticResult:
    """A statistic now in the cache: where it lives, whether it was there already, and its value."""

    version: Version
    layer: str
    kind: str                          # KEY_MOMENT or VALUE_QUANTILE
    samples: int
    seed_start: int
    truncation: float
    cached: bool                       # a hit: nothing was computed by this call
    key: StatsKey
    size_bytes: int
    stat: Stat


@dataclasses.dataclass
class DissectResult:
    """Units of a layer ranked against regions, with their thresholds and optional maps."""

    version: Version
    layer: str
    units: list                        # dissect.UnitScore, best first (``top`` of them)
    thresholds: torch.Tensor           # (units,) every unit's threshold
    maps: list                         # (unit, seed, (H, W) tensor) for the returned units, if asked


class Domain:
    """Resolves references, keeps versions resident and runs the engine and registry for servicers."""

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
    ):
        configure_determinism()
        self.registry = registry
        self.stats_cache = stats_cache
        self.device = select_device(device)
        self.stats_samples = stats_samples
        self._residency = Residency(registry, self.device, max_resident, memory_budget_bytes)
        self._lock = threading.Lock()
        self._fingerprints: dict[tuple[str, int, str | None], str] = {}   # (model, number, layer) → sha256
        self.metrics = None               # server.metrics.Metrics once a server binds one: batches, cache lookups
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
                  limits=Limits.from_config(config))
        if not config.registry_uri:
            return cls.open(config.data_dir, config.stats_cache, **kw)
        registry = Registry.open(config.registry_uri, s3=_s3_config(config) if config.registry_uri.startswith("s3://")
                                 else None)
        if config.create_bucket and hasattr(registry.store, "ensure_bucket"):
            registry.store.ensure_bucket()
        return cls(registry, open_stats_cache(config.stats_cache), **kw)

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

    def bootstrap(self, name: str, path: str | Path, alias: str = "production", author: str = "rulewright") -> Version:
        """Import ``path`` as model ``name`` (version 1, alias ``alias``) unless it exists; idempotent.

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
        try:
            self.registry.get_alias(name, alias)
        except NotFound:
            self.registry.set_alias(name, alias, 1, expected_version=None, author=author, reason="bootstrap")
        return self.registry.resolve(f"{name}@{alias}")

    def resolve(self, ref: str) -> Version:
        """One immutable version for a reference (registry errors pass through).

        A version named by number that is resident keeps serving while the store is unreachable
        (versions are immutable); aliases and "newest" need the store and stay UNAVAILABLE.
        """
        try:
            return self.registry.resolve(ref)
        except Unavailable:
            m = _NUMBERED.match(ref) if isinstance(ref, str) else None
            hit = self._residency.peek(m.group(1), int(m.group(2))) if m else None
            if hit is None:
                raise
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

    def sample(self, ref: str, seeds: Sequence[int] | None = None, z: torch.Tensor | None = None,
               truncation: float = 1.0, layer: str | None = None,
               interventions: Sequence[dissect.Intervention] = (), should_stop: StopCheck | None = None,
               field: str = "seeds") -> tuple[Version, torch.Tensor]:
        """(version, (N, H, W, 3) uint8 images) for seeds or raw latents, with optional unit interventions.

        The count and the reply's size are checked against ``limits`` before any work;
        ``should_stop()`` true ends the work with ``Cancelled`` (a batched request leaves its batch).
        """
        version = self.resolve(ref)
        res = self.generator(version)
        model = res.model
        if (seeds is None) == (z is None):
            raise InvalidArgument("seeds", "give exactly one of seeds or latents")
        check_images(self.limits, len(seeds) if z is None else z.shape[0], field, model.resolution)
        if z is None:
            z = latents(seeds, model.z_dim)
        check_latents(z, model.z_dim)
        if interventions:
            images = dissect.sample_with_interventions(res.hookable(), None, layer or model.default_layer(),
                                                       list(interventions), truncation=truncation, z=z)
        elif self.batcher is not None:
            model.check_truncation(truncation)     # here, not in the batch: a bad one fails only its caller
            images = self.batcher.submit(res.batch_key, model, z, truncation, should_stop=should_stop,
                                         change=res.change)
        else:
            parts = []
            for start in range(0, z.shape[0], self.max_batch):   # a pass at a time, so a cancel stops between them
                if should_stop is not None and should_stop():
                    raise Cancelled("sampling cancelled: the client went away or its deadline passed")
                chunk = z[start:start + self.max_batch]
                self._observe_batch(chunk.shape[0])
                parts.append(res.render(chunk, truncation, batch_size=self.max_batch))
            images = torch.cat(parts)
        return version, to_uint8(images)

    def list_layers(self, ref: str) -> tuple[Version, list, str]:
        """(version, layer infos, default layer)."""
        version = self.resolve(ref)
        model = self.generator(version).model
        return version, model.layer_infos(), model.default_layer()

    def statistics(self, version: Version, layer: str, samples: int | None = None, seed_start: int = 0,
                   truncation: float = 1.0, progress: Progress | None = None,
                   should_stop: StopCheck | None = None) -> SecondMoment:
        """C at ``layer`` for ``version`` through the shared cache (computed once on a miss).

        ``progress`` gets ``{"stage": "statistics", "done", "total"}`` per batch of a computation,
        and ``{"stage": "statistics", "done": 0, "total", "waiting": True}`` about once a second
        while another request computes it; ``should_stop`` cancels it (``Cancelled``; nothing is
        cached).
        """
        return self._cached_stat(version, layer, KEY_MOMENT, samples, seed_start, truncation, progress,
                                 should_stop).stat

    def compute_statistic(self, ref: str, layer: str | None = None, kind: str = KEY_MOMENT,
                          samples: int | None = None, seed_start: int = 0, truncation: float = 1.0,
                          progress: Progress | None = None, should_stop: StopCheck | None = None) -> StatisticResult:
        """A statistic of ``ref`` at ``layer`` (default layer if None) in the cache, computed on a miss."""
        version = self.resolve(ref)
        layer = layer or self.generator(version).model.default_layer()
        return self._cached_stat(version, layer, kind, samples, seed_start, truncation, progress, should_stop)

    def _stat_key(self, version: Version, res: Resident, layer: str, kind: str, seeds: range,
                  truncation: float) -> StatsKey:
        # Keys depend only on the weights upstream of the layer; values on the layer's own weight
        # too, so their key hashes every weight (conservative, shared less across versions).
        scope = layer if kind == KEY_MOMENT else None
        return stat_key(self._fingerprint(version, res, scope), layer, kind, seeds, truncation, res.model.arch)

    def _fingerprint(self, version: Version, res: Resident, layer: str | None) -> str:
        """The weights' fingerprint for a statistic, hashed once per (version, layer): it costs ~10 ms."""
        key = (version.model, version.number, layer)
        with self._lock:
            hit = self._fingerprints.get(key)
        if hit is None:
            # On a private module: hashing hooks layers, and an edited version's weights exist
            # densely only there.
            model = res.hookable()
            hit = model.upstream_fingerprint(layer) if layer is not None else model.weights_fingerprint()
            with self._lock:
                self._fingerprints[key] = hit
        return hit

    def _cached_stat(self, version: Version, layer: str, kind: str, samples: int | None, seed_start: int,
                     truncation: float, progress: Progress | None, should_stop: StopCheck | None) -> StatisticResult:
        if kind not in STATISTICS:
            raise InvalidArgument("statistic", f"must be one of {', '.join(STATISTICS)}, got {kind!r}")
        samples = samples or self.stats_samples
        if isinstance(samples, bool) or not isinstance(samples, int) or not 1 <= samples <= 10_000_000:
            raise InvalidArgument("stats.samples", f"must lie in 1..10,000,000, got {samples!r}")
        if seed_start < 0:
            raise InvalidArgument("stats.seed_start", f"must not be negative, got {seed_start}")
        res = self.generator(version)
        model = res.model
        model.layer(layer)
        seeds = range(seed_start, seed_start + samples)
        key = self._stat_key(version, res, layer, kind, seeds, truncation)
        ran = {"computed": False, "stopped": False}

        def stopped() -> bool:
            if should_stop is not None and should_stop():
                ran["stopped"] = True
            return ran["stopped"]

        def report(done: int, total: int) -> None:
            if progress is not None:
                progress({"stage": "statistics", "done": done, "total": total})
            if kind != KEY_MOMENT and stopped():    # value_quantiles has no should_stop of its own
                raise InterruptedError("statistics cancelled")

        def compute() -> bytes:
            ran["computed"] = True
            try:
                if kind == KEY_MOMENT:
                    stat = key_moment(res.hookable(), layer, seeds, truncation, progress=report,
                                      should_stop=stopped)
                else:
                    stat = value_quantiles(res.hookable(), layer, seeds, truncation, progress=report)
            except InterruptedError:
                raise Cancelled(f"{kind} statistics cancelled; nothing was cached") from None
            return stat.to_bytes()

        def waiting() -> None:
            # Another request (maybe another replica) is computing this statistic: say so, so a
            # client does not mistake the wait (at most a lock lease if that holder died) for a hang.
            if progress is not None:
                progress({"stage": "statistics", "done": 0, "total": samples, "waiting": True})

        while True:
            try:
                data = self.stats_cache.get_or_compute(key, compute, on_wait=waiting)
                break
            except Cancelled:
                if ran["stopped"] or stopped():
                    raise
                ran["computed"] = False    # another caller's computation was cancelled: take over
        if self.metrics is not None:
            self.metrics.observe_stats_cache(kind, hit=not ran["computed"])
        stat = load_stat(data)
        expected = SecondMoment if kind == KEY_MOMENT else Quantile
        if not isinstance(stat, expected):
            raise TypeError(f"cache entry {key.canonical()} holds a {type(stat).__name__}")
        return StatisticResult(version, layer, kind, samples, seed_start, float(truncation), not ran["computed"], key,
                               len(data), stat)

    def rewrite(self, ref: str, spec: dict, author: str = "anonymous", request_id: str | None = None,
                dry_run: bool = False, preview_seeds: Sequence[int] = (), progress: Progress | None = None,
                should_stop: StopCheck | None = None) -> RewriteResult:
        """Run an edit on ``ref`` and store it as a new version (unless ``dry_run``).

        A ``request_id`` already used returns the earlier version without recomputing; a
        cancellation (``should_stop``) or any error creates nothing.
        """
        parent = self.resolve(ref)
        if request_id and not dry_run:
            prior = self.registry.find_version_by_request_id(parent.model, request_id)
            if prior is not None:
                return RewriteResult(parent, prior, Edit("", [], prior.spec or {}, prior.metrics or {}), None, True)
        res = self.generator(parent)
        model = res.model
        checked = EditSpec.from_json(spec, model)
        if progress:
            progress({"stage": "statistics", "done": 0, "total": checked.stats["samples"]})
        moment = self.statistics(parent, checked.layer, checked.stats["samples"], checked.stats["seed_start"],
                                 checked.truncation, progress=progress, should_stop=should_stop)
        private = res.hookable()        # the engine hooks it while it gathers keys and values
        edit = engine_rewrite(private, checked, moment=moment, progress=progress, should_stop=should_stop)
        previews = None
        if preview_seeds:
            # Through the factored path, as the new version will be sampled: the same bytes.
            z = latents(preview_seeds, model.z_dim)
            previews = to_uint8(res.render(z, checked.truncation, batch_size=self.max_batch, then=edit.deltas))
        if dry_run:
            return RewriteResult(parent, None, edit, previews)
        if should_stop is not None and should_stop():
            from .engine.errors import Cancelled

            raise Cancelled("rewrite cancelled before the version was stored")
        version = self.registry.create_version(
            parent.model, parent=parent.number, delta=delta_codec.to_bytes(edit.deltas), spec=edit.spec,
            metrics=_json_metrics(edit.metrics), author=author, request_id=request_id)
        return RewriteResult(parent, version, edit, previews)

    def search(self, ref: str, layer: str | None, context: Sequence[Region], seeds: Sequence[int], rank: int = 1,
               top: int = 16, q: float = 0.999, truncation: float = 1.0, ridge: float = 1e-4,
               samples: int | None = None, seed_start: int = 0,
               should_stop: StopCheck | None = None) -> tuple[Version, list[Match], float]:
        """(version, best matches, highlight threshold) for context regions (layer None: the default).

        ``samples`` and ``seed_start`` choose the samples C is computed over (a cached statistic);
        ``should_stop()`` true stops that computation (``Cancelled``).
        """
        version = self.resolve(ref)
        res = self.generator(version)
        layer = layer or res.model.default_layer()
        if not context:
            raise InvalidArgument("context", "give at least one region")
        if not 0 < q < 1:
            raise InvalidArgument("quantile", f"must lie strictly between 0 and 1, got {q}")
        if rank < 1:
            raise InvalidArgument("rank", f"must be positive, got {rank}")
        moment = self.statistics(version, layer, samples, seed_start, truncation=truncation, should_stop=should_stop)
        private = res.hookable()
        d = direction_for(private, layer, moment.moment(), list(context), rank, ridge=ridge, truncation=truncation)
        threshold = response_threshold(private, layer, d, range(200), q, truncation)
        return version, search(private, layer, d, seeds, top, threshold, truncation), threshold

    def dissect(self, ref: str, layer: str | None, regions: Sequence[Region], by: str = "iou", top: int = 0,
                samples: int | None = None, seed_start: int = 0, q: float = dissect.DEFAULT_QUANTILE,
                truncation: float = 1.0, include_maps: bool = False,
                should_stop: StopCheck | None = None) -> DissectResult:
        """Units of ``layer`` (None: the default) ranked against ``regions``, best first.

        Thresholds are each unit's ``q``-quantile over ``samples`` untruncated samples from
        ``seed_start`` (the cached VALUE_QUANTILE statistic); ``truncation`` applies to the regions'
        samples. ``top`` 0 returns every unit. ``should_stop()`` true stops the thresholds'
        computation (``Cancelled``).
        """
        version = self.resolve(ref)
        res = self.generator(version)
        layer = layer or res.model.default_layer()
        if top < 0:
            raise InvalidArgument("top", f"must not be negative, got {top}")
        if not 0 < q < 1:
            raise InvalidArgument("quantile", f"must lie strictly between 0 and 1, got {q}")
        quantiles = self._cached_stat(version, layer, VALUE_QUANTILE, samples, seed_start, 1.0, None, should_stop).stat
        private = res.hookable()     # unit maps hook it
        ranked = dissect.rank_units(private, layer, list(regions), quantiles, by=by, truncation=truncation,
                                    q=q)
        ranked = ranked[:top] if top else ranked
        maps = []
        if include_maps and ranked:
            seeds = list(dict.fromkeys(r.seed for r in regions))
            values = dissect.unit_maps(private, layer, seeds=seeds, truncation=truncation)
            maps = [(u.unit, seed, values[i, u.unit]) for i, seed in enumerate(seeds) for u in ranked]
        return DissectResult(version, layer, ranked, quantiles.quantile(float(q)), maps)

    def import_model(self, name: str, arch: str, config: dict | None, data: bytes, author: str = "anonymous",
                     description: str = "", spec: dict | None = None, metrics: dict | None = None,
                     request_id: str | None = None) -> Version:
        """Register safetensors ``data`` as model ``name``'s version 1 once its layout checks out.

        ``InvalidArgument`` (engine) names ``weights`` for bytes that are not a readable
        safetensors file or fit no architecture, ``arch`` for a declared architecture the weights
        are not, and ``config`` for a declared config the weights contradict.
        """
        if not is_safetensors(data):
            raise InvalidArgument("weights", "not a safetensors file (torch checkpoints and pickles are refused)")
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
        return self.registry.import_model(name, arch=detected, config=_json_metrics(derived), weights=data,
                                          author=author, description=description, spec=spec, metrics=metrics,
                                          request_id=request_id)


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
