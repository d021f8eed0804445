"""Statistics through the statistics cache: the one component that names, computes and shares them.

- ``Statistics(cache)``: what the domain asks for any statistic. ``get(...)`` names it (``key``,
  with the weights' fingerprint memoized per version), returns it from the cache or computes it
  once across every caller and replica (the cache's single flight), reports progress (and
  ``waiting`` while another caller computes it), and stops when its ``Progress`` says so; a
  cancelled computation caches nothing, and a waiter whose computing peer was cancelled takes
  over.
- ``KEY_MOMENT``, ``VALUE_QUANTILE``: the kinds of statistic the service caches.
- ``stat_key(fingerprint, layer, kind, seeds, truncation, arch)``: the ``StatsKey`` of a statistic
  of weights with that fingerprint (what the domain and ``moment_key`` both use).
- ``moment_key(model, layer, seeds, truncation)``: the ``StatsKey`` of C = E[k kᵀ] at a layer,
  named by the fingerprint of the weights upstream of it (so versions whose edits lie downstream
  share the entry).
- ``cached_key_moment(cache, model, layer, seeds, ...)``: that statistic through a ``Statistics``.
- ``durable_key(key)``, ``store_durable(store, key, data)``: the object-store copy of a statistic a
  statistics job computed, which ``Statistics.get`` reads on a cache miss (the cache evicts and
  expires; a job's result of 10^7 samples must not vanish with it). Beside it, ``record_key(key)``
  holds its sha256 and size; ``read_durable`` checks the copy against it on every read.
- ``NotCached``: ``get(..., compute=False)`` found the statistic neither in the cache nor the store.
- ``StatisticCorrupt``: the store's copy did not check out (it is dropped) and ``compute=False``
  forbids computing it instead (DATA_LOSS, naming the copy).

A damaged copy is never served: ``Statistics.get`` drops it (copy and record) and computes the
statistic as if no job had run, or refuses with ``StatisticCorrupt``; ``store_durable`` (a job
run again) replaces a copy that does not check out.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
from typing import Callable, Hashable, Sequence

from rulewright.registry.blobstore import BlobStore
from rulewright.registry.errors import AlreadyExists, NotFound as RegistryNotFound, RegistryError
from rulewright.registry.stats_cache import StatsCache, StatsKey

from rulewright.service.engine.errors import Cancelled
from rulewright.service.engine.generators.base import Generator
from rulewright.service.engine.progress import Progress
from rulewright.service.engine.stats import Quantile, SecondMoment, Stat, key_moment, load_stat, value_quantiles
from rulewright.service.errors import Code, Error

log = logging.getLogger(__name__)

KEY_MOMENT = "key_moment"
VALUE_QUANTILE = "value_quantile"
DURABLE_PREFIX = "statistics/"


class NotCached(Error):
    """A statistic that may only be read, not computed, is neither cached nor stored (→ FAILED_PRECONDITION)."""

    code = Code.FAILED_PRECONDITION
    reason = "STATISTIC_NOT_CACHED"


class StatisticCorrupt(Error):
    """The store's copy of a statistic was damaged (now dropped) and this request may not compute it (→ DATA_LOSS)."""

    code = Code.DATA_LOSS
    reason = "STATISTIC_CORRUPT"


def durable_key(key: StatsKey) -> str:
    """Where the object store keeps the statistic of ``key``."""
    return f"{DURABLE_PREFIX}{key.digest()}.safetensors"


def record_key(key: StatsKey) -> str:
    """Where the object store keeps the sha256 and size of the statistic of ``key`` (beside it)."""
    return f"{DURABLE_PREFIX}{key.digest()}.json"


def _record(key: StatsKey, data: bytes) -> bytes:
    return json.dumps({"sha256": hashlib.sha256(data).hexdigest(), "size_bytes": len(data),
                       "cache_key": key.canonical()}, sort_keys=True).encode()


def check_durable(key: StatsKey, data: bytes, record: bytes | None) -> str:
    """Why ``data`` is not the statistic of ``key`` (empty if it is): it must match its ``record``.

    Without a record (a copy stored before records were written) it must at least read back as a
    statistic of the key's kind; only the record's sha256 catches altered numbers.
    """
    if record is not None:
        try:
            want = json.loads(record)
            sha, size = str(want["sha256"]), int(want["size_bytes"])
        except (ValueError, KeyError, TypeError):
            return "its sha256 record is unreadable"
        actual = hashlib.sha256(data).hexdigest()
        if len(data) != size or actual != sha:
            return f"{len(data):,} bytes with sha256 {actual}, but it was stored as {size:,} bytes with sha256 {sha}"
        return ""
    try:
        stat = load_stat(data)
    except Exception as exc:  # noqa: BLE001 -- any reader failure means unreadable bytes
        return f"unreadable: {exc}"
    expected = SecondMoment if key.kind == KEY_MOMENT else Quantile
    return "" if isinstance(stat, expected) else f"it holds a {type(stat).__name__}, not a {key.kind}"


def _read_record(store: BlobStore, key: StatsKey) -> bytes | None:
    try:
        return store.read(record_key(key))
    except RegistryNotFound:
        return None


def read_durable(store: BlobStore, key: StatsKey) -> tuple[bytes | None, str]:
    """(the store's copy of the statistic of ``key``, checked; else None, why it is unusable).

    A copy that does not check out is deleted with its record (what was judged is read again
    first, so a copy a job has just rewritten is left alone). (None, "") means no copy at all.
    Store errors pass through.
    """
    try:
        data = store.read(durable_key(key))
    except RegistryNotFound:
        return None, ""
    problem = check_durable(key, data, _read_record(store, key))
    if not problem:
        return data, ""
    log.error("damaged statistic in the store; dropped", extra={
        "event": "stats_store_corrupt", "statistic_key": durable_key(key), "cache_key": key.canonical(),
        "problem": problem})
    try:
        if store.read(durable_key(key)) == data:
            store.delete(durable_key(key))
            store.delete(record_key(key))
    except RegistryNotFound:
        pass
    except RegistryError as exc:      # not dropped now: the next reader judges it again
        log.warning("could not drop a damaged statistic", extra={
            "event": "stats_store_drop_failed", "statistic_key": durable_key(key), "error": str(exc)})
    return None, problem


def store_durable(store: BlobStore, key: StatsKey, data: bytes) -> bool:
    """Keep ``data`` as the statistic of ``key`` in the store, with its sha256 record beside it.

    A copy there already that checks out (``check_durable``) is kept (False; one stored before
    records gets its record now); one that does not is replaced by ``data``, so a job run again
    repairs what the store damaged.
    """
    try:
        store.create(durable_key(key), data)
    except AlreadyExists:
        existing, record = store.read(durable_key(key)), _read_record(store, key)
        problem = check_durable(key, existing, record)
        if not problem:
            if record is None:
                _write_record(store, key, existing)
            return False
        log.warning("replacing a damaged stored statistic", extra={
            "event": "stats_store_replaced", "statistic_key": durable_key(key), "problem": problem})
        store.delete(record_key(key))
        store.delete(durable_key(key))
        try:
            store.create(durable_key(key), data)
        except AlreadyExists:
            return False          # another writer replaced it first; its record follows it
    _write_record(store, key, data)
    return True


def _write_record(store: BlobStore, key: StatsKey, data: bytes) -> None:
    """The record of ``data`` beside it; a different one there (its writer died before its copy) is replaced."""
    record = _record(key, data)
    try:
        store.create(record_key(key), record)
    except AlreadyExists:
        if store.read(record_key(key)) != record:     # left by a writer that died before its copy
            store.delete(record_key(key))
            try:
                store.create(record_key(key), record)
            except AlreadyExists:
                pass                  # a concurrent writer's; a reader judges the pair



def stat_key(fingerprint: str, layer: str, kind: str, seeds: Sequence[int], truncation: float, arch: str) -> StatsKey:
    """The cache key of a ``kind`` statistic at ``layer`` of weights with ``fingerprint``."""
    return StatsKey.create(fingerprint, layer, kind, seeds, truncation, arch=arch)


def moment_key(model: Generator, layer: str, seeds: Sequence[int], truncation: float = 1.0) -> StatsKey:
    """The cache key of ``key_moment(model, layer, seeds, truncation)``: keys depend only on the
    weights upstream of the layer."""
    return stat_key(model.upstream_fingerprint(layer), layer, KEY_MOMENT, seeds, truncation, model.arch)


Model = Generator | Callable[[], Generator]     # a generator, or a function that builds one


def _built(model: Model) -> Generator:
    return model if isinstance(model, Generator) else model()


def _once(model: Model) -> Model:
    """``model``, built at most once if it is a function."""
    if isinstance(model, Generator):
        return model
    built: list[Generator] = []

    def build() -> Generator:
        if not built:
            built.append(model())
        return built[0]
    return build


@dataclasses.dataclass
class Cached:
    """A statistic as the cache holds it: its key, value, size, and whether it was there already."""

    key: StatsKey
    stat: Stat
    size_bytes: int
    cached: bool                          # a hit: this call computed nothing


class Statistics:
    """Statistics of generators through one cache: named, computed once, shared, cancellable."""

    def __init__(self, cache: StatsCache, observe: Callable[[str, bool], None] | None = None,
                 store: BlobStore | None = None):
        self.cache = cache
        self.observe = observe            # (kind, hit) per lookup, for metrics
        self.store = store                # statistics jobs' results, read on a cache miss
        self._fingerprints: dict[tuple[Hashable, str | None], str] = {}
        self._lock = threading.Lock()

    def fingerprint(self, model: Model, layer: str | None, memo: Hashable | None = None) -> str:
        """The weights' fingerprint a statistic depends on (upstream of ``layer``; None: every weight).

        Hashing costs ~10 ms (and ``model`` may have to be built first), so it is kept per
        ``memo`` (a version's identity; its weights are immutable).
        """
        key = (memo, layer)
        with self._lock:
            hit = self._fingerprints.get(key) if memo is not None else None
        if hit is None:
            module = _built(model)
            hit = module.upstream_fingerprint(layer) if layer is not None else module.weights_fingerprint()
            if memo is not None:
                with self._lock:
                    self._fingerprints[key] = hit
        return hit

    def key(self, model: Model, layer: str, kind: str, seeds: Sequence[int], truncation: float,
            memo: Hashable | None = None, arch: str | None = None) -> StatsKey:
        """The cache key of a statistic of ``model`` (``arch``: its architecture, if known without it)."""
        # Keys depend only on the weights upstream of the layer; values on the layer's own weight
        # too, so their key hashes every weight (conservative, shared less across versions).
        scope = layer if kind == KEY_MOMENT else None
        return stat_key(self.fingerprint(model, scope, memo), layer, kind, seeds, truncation,
                        arch or _built(model).arch)

    def _durable(self, key: StatsKey) -> tuple[bytes | None, str]:
        """The store's copy of a statistic (a statistics job's result), checked (``read_durable``);
        a store that fails is a miss (the statistic is computed as if the job had never run)."""
        if self.store is None:
            return None, ""
        try:
            return read_durable(self.store, key)
        except Exception as exc:  # noqa: BLE001 -- the store is a second tier; computing still works
            log.warning("statistics store unreadable", extra={"event": "stats_store_unreadable",
                                                               "key": key.canonical(), "error": str(exc)})
            return None, ""

    def get(self, model: Model, layer: str, kind: str, seeds: range, truncation: float = 1.0,
            progress: Progress | None = None, memo: Hashable | None = None, arch: str | None = None,
            batch_size: int = 32, compute: bool = True) -> Cached:
        """A statistic from the cache (or a statistics job's copy in the store), computed on a miss.

        ``model`` is a generator, or a function that builds one (a private module the computation
        may hook, with the version's dense weights), called at most once and only when needed.
        ``compute=False``: ``NotCached`` instead of computing (a request over ``max_stats_samples``),
        or ``StatisticCorrupt`` if the store's copy was damaged (and has been dropped).
        """
        progress = progress or Progress()
        model = _once(model)
        key = self.key(model, layer, kind, seeds, truncation, memo, arch)
        ran = {"computed": False, "stopped": False}
        allowed = compute

        def stopped() -> bool:
            if progress.stopped():
                ran["stopped"] = True
            return ran["stopped"]

        def compute() -> bytes:
            stored, problem = self._durable(key)
            if stored is not None:
                return stored                 # the cache puts it back: the next lookup hits there
            if not allowed and problem:
                raise StatisticCorrupt(f"the stored {kind} statistic {durable_key(key)} of {len(seeds):,} samples at "
                                       f"{layer} was damaged ({problem}) and has been dropped",
                                       statistic_key=durable_key(key), key=key.canonical())
            if not allowed:
                raise NotCached(f"the {kind} statistic of {len(seeds):,} samples at {layer} is not cached",
                                key=key.canonical())
            ran["computed"] = True
            target = _built(model)
            mine = Progress(progress.on_event, stopped)
            compute_stat = key_moment if kind == KEY_MOMENT else value_quantiles
            return compute_stat(target, layer, seeds, truncation, batch_size=batch_size, progress=mine).to_bytes()

        def waiting() -> None:
            # Another request (maybe another replica) is computing this statistic: say so, so a
            # client does not mistake the wait (at most a lock lease if that holder died) for a hang.
            progress.report("statistics", 0, len(seeds), waiting=True)

        while True:
            try:
                data = self.cache.get_or_compute(key, compute, on_wait=waiting)
                break
            except Cancelled:
                if ran["stopped"] or stopped():
                    raise Cancelled(f"{kind} statistics cancelled; nothing was cached") from None
                ran["computed"] = False    # another caller's computation was cancelled: take over
        if self.observe is not None:
            self.observe(kind, not ran["computed"])
        try:
            stat = load_stat(data)
        except Exception as exc:  # noqa: BLE001 -- unreadable bytes must not stay cached
            stat, problem = None, f"unreadable: {exc}"
        else:
            expected = SecondMoment if kind == KEY_MOMENT else Quantile
            problem = "" if isinstance(stat, expected) else f"it holds a {type(stat).__name__}"
        if problem:
            # Only a bug could cache such bytes: forget them, so the next request computes it again.
            self.cache.discard(key)
            raise StatisticCorrupt(f"the cached {kind} statistic of {len(seeds):,} samples at {layer} was unusable "
                                   f"({problem}) and has been dropped; ask again", key=key.canonical())
        return Cached(key, stat, len(data), not ran["computed"])


def cached_key_moment(
    cache: StatsCache,
    model: Generator,
    layer: str,
    seeds: Sequence[int],
    truncation: float = 1.0,
    batch_size: int = 32,  # samples per forward pass on a miss (does not change the result)
) -> SecondMoment:
    """C at ``layer`` over ``seeds`` from ``cache``; computed once across the cache's users on a miss."""
    return Statistics(cache).get(model, layer, KEY_MOMENT, list(seeds), truncation, batch_size=batch_size).stat
