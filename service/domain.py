"""The domain layer the servicers call: model references in, engine and registry work out.

- ``Domain(registry, stats_cache, device, max_resident)``: one per server process.
- ``Domain.open(data_dir)``: the embedded default (filesystem registry, in-process cache).
- ``bootstrap(name, path)``: import a model as version 1 with alias ``production`` if absent.
- ``resolve(ref)``: ``faces``, ``faces@production`` or ``faces/3`` → one immutable ``Version``.
- ``generator(version)``: the version's generator, resident in an LRU; versions share every
  tensor their edits leave alone (on the CPU and on the device).
- ``sample``, ``list_layers``, ``statistics`` (through the statistics cache), ``rewrite``
  (creates a version; ``dry_run`` and ``request_id`` honoured; cancellation creates nothing),
  ``dissect`` and ``search``.

Every result carries the resolved ``Version``, so responses can echo it. Hooked work (unit
interventions, dissection) holds the version's lock, since hooks live on the shared module.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from rulewright.registry.errors import NotFound
from rulewright.registry.manifests import Version
from rulewright.registry.registry import Registry
from rulewright.registry.statistics import cached_key_moment
from rulewright.registry.stats_cache import StatsCache, open_stats_cache
from rulewright.registry.weights import Materializer

from .engine import delta as delta_codec
from .engine import dissect
from .engine.device import configure_determinism, select_device
from .engine.edit import Edit, EditSpec, render_edited
from .engine.generators.base import Generator
from .engine.loading import ARCHITECTURES, read_state_dict, detect_architecture
from .engine.regions import Region
from .engine.rewrite import rewrite as engine_rewrite
from .engine.sampling import check_latents, latents, to_uint8
from .engine.search import Match, direction_for, response_threshold, search
from .engine.stats import SecondMoment

log = logging.getLogger(__name__)

Progress = Callable[[dict], None]
StopCheck = Callable[[], bool]


@dataclasses.dataclass
class Resident:
    """A version's generator and the lock hooked work takes on it."""

    version: Version
    model: Generator
    lock: threading.Lock


@dataclasses.dataclass
class RewriteResult:
    """What a Rewrite produced: the new version (None for a dry run), the edit, preview images."""

    parent: Version
    version: Version | None
    edit: Edit
    previews: torch.Tensor | None      # (N, H, W, 3) uint8 for the requested preview seeds
    replayed: bool = False             # a retried request id: the earlier version, nothing new


class Domain:
    """Resolves references, keeps versions resident and runs the engine and registry for servicers."""

    def __init__(
        self,
        registry: Registry,               # models, versions, aliases, blobs
        stats_cache: StatsCache,          # shared key statistics (Redis) or in-process
        device: str = "auto",             # where generators run
        max_resident: int = 8,            # versions kept loaded (unedited tensors are shared)
        stats_samples: int = 1000,        # default samples for C when a spec does not say
    ):
        configure_determinism()
        self.registry = registry
        self.stats_cache = stats_cache
        self.device = select_device(device)
        self.max_resident = max_resident
        self.stats_samples = stats_samples
        self._materializer = Materializer(registry)
        self._resident: "collections.OrderedDict[tuple[str, int], Resident]" = collections.OrderedDict()
        self._on_device: dict[int, torch.Tensor] = {}    # CPU storage pointer → its device copy
        self._lock = threading.Lock()

    @classmethod
    def open(cls, data_dir: str | Path, stats_cache: str | None = None, **kw: Any) -> "Domain":
        """The embedded default: a filesystem registry under ``data_dir`` and an in-process cache."""
        path = Path(data_dir).resolve() / "registry"
        path.mkdir(parents=True, exist_ok=True)
        return cls(Registry.open(path.as_uri()), open_stats_cache(stats_cache or "memory://"), **kw)

    # ---- models and versions -----------------------------------------------------------------

    def bootstrap(self, name: str, path: str | Path, alias: str = "production", author: str = "rulewright") -> Version:
        """Import ``path`` as model ``name`` (version 1, alias ``alias``) unless it exists; idempotent."""
        try:
            self.registry.get_model(name)
        except NotFound:
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
        """One immutable version for a reference (registry errors pass through)."""
        return self.registry.resolve(ref)

    def generator(self, version: Version) -> Resident:
        """The resident generator of ``version`` (loaded on first use, least recently used evicted)."""
        key = (version.model, version.number)
        with self._lock:
            hit = self._resident.get(key)
            if hit is not None:
                self._resident.move_to_end(key)
                return hit
        state = self._materializer.state_dict(version.model, version.number)
        arch = self.registry.get_model(version.model).arch
        model = ARCHITECTURES[arch].from_state_dict(self._to_device(state), share=True)
        resident = Resident(version, model, threading.Lock())
        with self._lock:
            self._resident[key] = resident
            while len(self._resident) > self.max_resident:
                evicted, _ = self._resident.popitem(last=False)
                log.info("version evicted", extra={"event": "version_evicted", "model": evicted[0],
                                                   "version": evicted[1]})
            self._forget_unused_device_tensors()
        return resident

    def _to_device(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self.device.type == "cpu":
            return state
        out = {}
        with self._lock:
            for k, t in state.items():
                ptr = t.untyped_storage().data_ptr()
                if ptr not in self._on_device:
                    self._on_device[ptr] = t.to(self.device)
                out[k] = self._on_device[ptr]
        return out

    def _forget_unused_device_tensors(self) -> None:
        if self.device.type == "cpu":
            return
        live = {p.untyped_storage().data_ptr() for r in self._resident.values() for p in r.model.state_dict().values()}
        self._on_device = {k: v for k, v in self._on_device.items() if v.untyped_storage().data_ptr() in live}

    def resident_versions(self) -> list[tuple[str, int]]:
        """(model, number) of every resident version, least recently used first."""
        with self._lock:
            return list(self._resident)

    # ---- generator work ----------------------------------------------------------------------

    def sample(self, ref: str, seeds: Sequence[int] | None = None, z: torch.Tensor | None = None,
               truncation: float = 1.0, layer: str | None = None,
               interventions: Sequence[dissect.Intervention] = ()) -> tuple[Version, torch.Tensor]:
        """(version, (N, H, W, 3) uint8 images) for seeds or raw latents, with optional unit interventions."""
        version = self.resolve(ref)
        res = self.generator(version)
        model = res.model
        if (seeds is None) == (z is None):
            from .engine.errors import InvalidArgument

            raise InvalidArgument("seeds", "give exactly one of seeds or latents")
        if z is None:
            z = latents(seeds, model.z_dim)
        check_latents(z, model.z_dim)
        if interventions:
            with res.lock:
                images = dissect.sample_with_interventions(model, None, layer or model.default_layer(),
                                                           list(interventions), truncation=truncation, z=z)
        else:
            from .engine.sampling import sample

            images = sample(model, z=z, truncation=truncation)
        return version, to_uint8(images)

    def list_layers(self, ref: str) -> tuple[Version, list, str]:
        """(version, layer infos, default layer)."""
        version = self.resolve(ref)
        model = self.generator(version).model
        return version, model.layer_infos(), model.default_layer()

    def statistics(self, version: Version, layer: str, samples: int | None = None, seed_start: int = 0,
                   truncation: float = 1.0) -> SecondMoment:
        """C at ``layer`` for ``version`` through the shared cache (computed once on a miss)."""
        model = self.generator(version).model
        model.layer(layer)
        seeds = range(seed_start, seed_start + (samples or self.stats_samples))
        return cached_key_moment(self.stats_cache, model, layer, seeds, truncation)

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
                                 checked.truncation)
        with res.lock:   # the engine hooks the shared module while it gathers keys and values
            edit = engine_rewrite(model, checked, moment=moment, progress=progress, should_stop=should_stop)
        previews = None
        if preview_seeds:
            z = latents(preview_seeds, model.z_dim).to(next(model.parameters()).device)
            previews = to_uint8(render_edited(model, [edit], z, checked.truncation).cpu())
        if dry_run:
            return RewriteResult(parent, None, edit, previews)
        if should_stop is not None and should_stop():
            from .engine.errors import Cancelled

            raise Cancelled("rewrite cancelled before the version was stored")
        version = self.registry.create_version(
            parent.model, parent=parent.number, delta=delta_codec.to_bytes(edit.deltas), spec=edit.spec,
            metrics=_json_metrics(edit.metrics), author=author, request_id=request_id)
        return RewriteResult(parent, version, edit, previews)

    def search(self, ref: str, layer: str, context: Sequence[Region], seeds: Sequence[int], rank: int = 1,
               top: int = 16, q: float = 0.999, truncation: float = 1.0) -> tuple[Version, list[Match], float]:
        """(version, best matches, highlight threshold) for context regions."""
        version = self.resolve(ref)
        res = self.generator(version)
        moment = self.statistics(version, layer, truncation=truncation)
        with res.lock:
            d = direction_for(res.model, layer, moment.moment(), list(context), rank, truncation=truncation)
            threshold = response_threshold(res.model, layer, d, range(200), q, truncation)
            return version, search(res.model, layer, d, seeds, top, threshold, truncation), threshold


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
