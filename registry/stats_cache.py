"""The statistics cache: compute an expensive layer statistic once, share the bytes.

- ``StatsKey``: every input that changes a statistic (upstream weights fingerprint, layer,
  statistic kind, sample count, seed range, truncation, extra parameters), rendered
  deterministically by ``canonical()`` and hashed by ``digest()``.
- ``StatsCache``: the interface; ``get_or_compute(key, compute, on_wait)`` returns cached bytes or
  runs ``compute`` once (single-flight) and stores its result; ``on_wait`` hears that a caller is
  waiting on another's computation.
- ``LocalStatsCache(max_bytes)``: an in-process LRU with single-flight across threads (the
  embedded default).
- ``RedisStatsCache(url, namespace, ttl_s, ...)``: shared by replicas and clients; single-flight
  across processes with a ``SET NX PX`` lock: a short lease (``LOCK_LEASE_S``) that the holder
  renews while it computes, so a holder that dies blocks the others for at most one lease before
  a waiter takes over. When Redis is unreachable it logs
  one warning, computes, and tries Redis again on later calls. Each value carries its sha256 and
  is checked on every read: a damaged one is deleted and counts as a miss (computed again).
- ``open_stats_cache(uri)``: ``redis://...`` / ``rediss://...`` or ``memory://`` (default;
  ``$RULEWRIGHT_STATS_CACHE``).

No torch here; ``statistics`` builds keys and compute callbacks from a model.
"""

from __future__ import annotations

import abc
import collections
import dataclasses
import hashlib
import json
import logging
import os
import threading
import time
import uuid
from typing import Any, Callable, Sequence

from rulewright.registry import errors
from rulewright.registry.errors import Reason

log = logging.getLogger(__name__)

KEY_FORMAT = 1
# The Redis lock's lease. Short, because a holder killed mid-computation (a crashed server)
# blocks every waiter until it lapses; its heartbeat renews it every third of the lease, which
# tolerates two missed renewals (a stalled process) before another caller starts computing too.
LOCK_LEASE_S = 5.0
# How often a waiter hears ``on_wait`` again while it waits.
WAIT_NOTICE_S = 1.0
# A Redis value is this header, the payload's sha256 (32 bytes) and the payload. The format is in
# the key too (``stats:v2:``), so a replica of an earlier release, which stored bare bytes, never
# reads a sealed value as a statistic, nor this one its unchecked bytes.
SEAL = b"rwstat2\n"
_SEALED_HEAD = len(SEAL) + 32


def render_seeds(seeds: Sequence[int]) -> str:
    """``"start-stop"`` (stop exclusive) for a contiguous ascending range, else a digest of the list."""
    seeds = list(seeds)
    if not seeds:
        raise errors.invalid(Reason.INVALID_ARGUMENT, "seeds", "must not be empty")
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in seeds):
        raise errors.invalid(Reason.INVALID_ARGUMENT, "seeds", "must be non-negative integers")
    if seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}-{seeds[0] + len(seeds)}"
    return "list:" + hashlib.sha256(",".join(map(str, seeds)).encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class StatsKey:
    """Everything that changes a cached statistic (cache keys include every such input)."""

    fingerprint: str  # sha256 of the weights upstream of the layer (``upstream_fingerprint``)
    layer: str        # dotted layer name
    kind: str         # "key_moment", "value_quantile", ...
    samples: int      # number of seeds
    seeds: str        # ``render_seeds`` of them
    truncation: float = 1.0
    params: tuple[tuple[str, Any], ...] = ()  # kind-specific arguments that change the result, sorted

    @classmethod
    def create(
        cls, fingerprint: str, layer: str, kind: str, seeds: Sequence[int], truncation: float = 1.0, **params: Any
    ) -> "StatsKey":
        """A key from the seeds themselves (rendered as a range when contiguous)."""
        if not isinstance(fingerprint, str) or not fingerprint:
            raise errors.invalid(Reason.INVALID_ARGUMENT, "fingerprint", "must be a non-empty string")
        if not layer or not kind:
            raise errors.invalid(Reason.INVALID_ARGUMENT, "layer", "layer and kind must be non-empty")
        seeds = list(seeds)
        return cls(
            fingerprint, layer, kind, len(seeds), render_seeds(seeds), float(truncation), tuple(sorted(params.items()))
        )

    def canonical(self) -> str:
        """Deterministic text of the key (JSON, sorted keys; floats by ``repr``, so 0.7 ≠ 0.70000001)."""
        return json.dumps(
            {
                "format": KEY_FORMAT,
                "fingerprint": self.fingerprint,
                "layer": self.layer,
                "kind": self.kind,
                "samples": self.samples,
                "seeds": self.seeds,
                "truncation": repr(self.truncation),
                "params": [[k, v] for k, v in self.params],
            },
            sort_keys=True,
            separators=(",", ":"),
        )

    def digest(self) -> str:
        """sha256 of ``canonical()`` (the storage key)."""
        return hashlib.sha256(self.canonical().encode()).hexdigest()


Compute = Callable[[], bytes]
OnWait = Callable[[], None]


def _check_value(value: Any) -> bytes:
    if not isinstance(value, (bytes, bytearray)):
        raise TypeError(f"a statistics compute callback must return bytes, got {type(value).__name__}")
    return bytes(value)


class StatsCache(abc.ABC):
    """Bytes of computed statistics by ``StatsKey``; callers never see whether it hit."""

    @abc.abstractmethod
    def get(self, key: StatsKey) -> bytes | None:
        """The cached bytes, or None."""

    @abc.abstractmethod
    def put(self, key: StatsKey, value: bytes) -> None:
        """Store ``value`` under ``key``."""

    @abc.abstractmethod
    def discard(self, key: StatsKey) -> None:
        """Forget ``key`` (a value its reader found unusable); an absent key is not an error."""

    @abc.abstractmethod
    def get_or_compute(self, key: StatsKey, compute: Compute, on_wait: OnWait | None = None) -> bytes:
        """The cached bytes, else ``compute()``'s result, stored; concurrent callers compute it once.

        Args:
            key: every input that changes the statistic.
            compute: returns the statistic's bytes; its exceptions reach the caller (and the
                callers waiting on the same key in this process).
            on_wait: called when this caller starts waiting on another caller's computation and
                about every ``WAIT_NOTICE_S`` while it waits (for progress reports).
        """

    def close(self) -> None:
        """Release connections."""


class _Flight:
    def __init__(self) -> None:
        self.done = threading.Event()
        self.value: bytes | None = None
        self.error: BaseException | None = None


class _SingleFlight:
    """Per-key leader election among threads: one runs the function, the rest wait for its result."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._flights: dict[str, _Flight] = {}

    def run(self, key: str, fn: Compute, on_wait: OnWait | None = None) -> bytes:
        """``fn()`` for the first caller of ``key``; later concurrent callers get its result (or exception)."""
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if leader:
                flight = self._flights[key] = _Flight()
        if not leader:
            while True:
                if on_wait is not None:
                    on_wait()
                if flight.done.wait(WAIT_NOTICE_S):
                    break
            if flight.error is not None:
                raise flight.error
            return flight.value
        try:
            flight.value = fn()
            return flight.value
        except BaseException as exc:
            flight.error = exc
            raise
        finally:
            with self._lock:
                self._flights.pop(key, None)
            flight.done.set()


class LocalStatsCache(StatsCache):
    """An in-process LRU bounded by ``max_bytes`` with single-flight across threads."""

    def __init__(self, max_bytes: int = 512 << 20):
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._items: "collections.OrderedDict[str, bytes]" = collections.OrderedDict()
        self._bytes = 0
        self._flight = _SingleFlight()

    def get(self, key: StatsKey) -> bytes | None:
        """The cached bytes (marking them recently used), or None."""
        digest = key.digest()
        with self._lock:
            value = self._items.get(digest)
            if value is not None:
                self._items.move_to_end(digest)
            return value

    def put(self, key: StatsKey, value: bytes) -> None:
        """Insert and evict least recently used entries beyond ``max_bytes``."""
        value = _check_value(value)
        digest = key.digest()
        with self._lock:
            old = self._items.pop(digest, None)
            self._bytes -= len(old) if old is not None else 0
            self._items[digest] = value
            self._bytes += len(value)
            while self._bytes > self.max_bytes and len(self._items) > 1:
                _, evicted = self._items.popitem(last=False)
                self._bytes -= len(evicted)

    def discard(self, key: StatsKey) -> None:
        """Drop the entry of ``key``, if any."""
        with self._lock:
            old = self._items.pop(key.digest(), None)
            self._bytes -= len(old) if old is not None else 0

    def get_or_compute(self, key: StatsKey, compute: Compute, on_wait: OnWait | None = None) -> bytes:
        """Hit, or one thread computes while the others wait."""
        value = self.get(key)
        if value is not None:
            return value

        def lead() -> bytes:
            hit = self.get(key)  # a flight that ended just before we started
            if hit is not None:
                return hit
            result = _check_value(compute())
            self.put(key, result)
            return result

        return self._flight.run(key.digest(), lead, on_wait)

    def __len__(self) -> int:
        """Statistics held."""
        return len(self._items)


# Release the lock only if we still hold it (it may have expired and been taken by another).
_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end"
# Delete a damaged value only if it is still the one read (a replica may have stored a good one since).
_DROP = ("if redis.call('getrange', KEYS[1], 0, tonumber(ARGV[2]) - 1) == ARGV[1] then "
         "return redis.call('del', KEYS[1]) else return 0 end")
_RENEW = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"
)


class RedisStatsCache(StatsCache):
    """Statistics in Redis under ``{namespace}:stats:v2:{digest}``, computed once across processes.

    Protocol per key: GET the value; on a miss try ``SET lock token NX PX lock_ttl``. The winner
    computes (renewing the lock every third of its TTL from a heartbeat thread), SETs the value
    with the cache TTL, and deletes the lock if it is still its own. Losers poll for the value
    with a growing interval (calling ``on_wait``); if the lock vanishes without a value (its
    holder died and the lease lapsed, or its compute failed) they race for the lock again.
    Threads of one process share one flight, so a process sends one set of requests per key.

    Values are sealed with their sha256 (``SEAL``) and opened on every read; one that does not
    open (truncated, altered, or not sealed) is logged, deleted, and treated as a miss.

    Redis errors never reach the caller: the first one logs a structured warning, the statistic
    is computed locally, and Redis is tried again after ``retry_after_s`` (no permanent switch-off).
    """

    def __init__(
        self,
        url: str = "redis://127.0.0.1:6379/0",  # redis:// or rediss:// (TLS) URL
        namespace: str = "rulewright",          # key prefix, so deployments can share a Redis
        ttl_s: float = 7 * 24 * 3600,           # how long a cached statistic lives
        lock_ttl_s: float = LOCK_LEASE_S,       # the lock's lease: how long a dead holder blocks the others
        wait_timeout_s: float = 900.0,          # a waiter gives up and computes itself after this
        retry_after_s: float = 1.0,             # after a Redis failure, skip Redis this long
        socket_timeout_s: float = 5.0,          # per Redis command (values are up to a few MB)
        client: Any = None,                     # a ready redis.Redis (overrides url)
    ):
        import redis

        self.url = url
        self.namespace = namespace
        self.ttl_ms = int(ttl_s * 1000)
        self.lock_ttl_ms = int(lock_ttl_s * 1000)
        self.wait_timeout_s = wait_timeout_s
        self.retry_after_s = retry_after_s
        self._redis_errors = (redis.RedisError, OSError)
        self._r = client or redis.Redis.from_url(
            url, socket_connect_timeout=min(socket_timeout_s, 2.0), socket_timeout=socket_timeout_s
        )
        self._release = self._r.register_script(_RELEASE)
        self._renew = self._r.register_script(_RENEW)
        self._drop = self._r.register_script(_DROP)
        self._flight = _SingleFlight()
        self._state_lock = threading.Lock()
        self._down = False
        self._retry_at = 0.0

    def _value_key(self, key: StatsKey) -> str:
        return f"{self.namespace}:stats:v2:{key.digest()}"

    # ---- sealed values -----------------------------------------------------------------------

    @staticmethod
    def _seal(value: bytes) -> bytes:
        return SEAL + hashlib.sha256(value).digest() + value

    def _open(self, vkey: str, raw: bytes | None) -> bytes | None:
        """The payload of a sealed value; None for a miss, and for a damaged value (deleted here)."""
        if raw is None:
            return None
        payload = raw[_SEALED_HEAD:]
        if raw[:len(SEAL)] == SEAL and hashlib.sha256(payload).digest() == raw[len(SEAL):_SEALED_HEAD]:
            return payload
        log.warning("damaged statistic in the cache; dropped, computing it again",
                    extra={"event": "stats_cache_corrupt", "cache": self.url, "redis_key": vkey,
                           "size_bytes": len(raw)})
        head = raw[:_SEALED_HEAD]
        self._drop(keys=[vkey], args=[head, len(head)])
        return None

    # ---- availability ------------------------------------------------------------------------

    def _usable(self) -> bool:
        with self._state_lock:
            return not self._down or time.monotonic() >= self._retry_at

    def _failed(self, exc: BaseException, during: str) -> None:
        with self._state_lock:
            first = not self._down
            self._down = True
            self._retry_at = time.monotonic() + self.retry_after_s
        if first:
            log.warning(
                "statistics cache unavailable; computing without it",
                extra={
                    "event": "stats_cache_unavailable",
                    "cache": self.url,
                    "during": during,
                    "error": f"{type(exc).__name__}: {exc}",
                },
            )

    def _ok(self) -> None:
        if self._down:
            with self._state_lock:
                recovered, self._down = self._down, False
            if recovered:
                log.info(
                    "statistics cache reachable again", extra={"event": "stats_cache_recovered", "cache": self.url}
                )

    @property
    def available(self) -> bool:
        """False between a Redis failure and the next successful command."""
        return not self._down

    # ---- interface ---------------------------------------------------------------------------

    def __len__(self) -> int:
        """Statistics held under this namespace (a SCAN: for operators and tests, not hot paths)."""
        return sum(1 for k in self._r.scan_iter(match=f"{self.namespace}:stats:v2:*", count=1000)
                   if not k.endswith(b":lock"))

    def get(self, key: StatsKey) -> bytes | None:
        """The cached bytes, verified, or None (also when Redis is unreachable or the value is damaged)."""
        if not self._usable():
            return None
        vkey = self._value_key(key)
        try:
            value = self._open(vkey, self._r.get(vkey))
        except self._redis_errors as exc:
            self._failed(exc, "get")
            return None
        self._ok()
        return value

    def put(self, key: StatsKey, value: bytes) -> None:
        """SET with the cache TTL (dropped silently when Redis is unreachable)."""
        value = _check_value(value)
        if not self._usable():
            return
        try:
            self._r.set(self._value_key(key), self._seal(value), px=self.ttl_ms)
        except self._redis_errors as exc:
            self._failed(exc, "put")
            return
        self._ok()

    def discard(self, key: StatsKey) -> None:
        """DEL the value of ``key`` (nothing when Redis is unreachable: it expires with its TTL)."""
        if not self._usable():
            return
        try:
            self._r.delete(self._value_key(key))
        except self._redis_errors as exc:
            self._failed(exc, "discard")
            return
        self._ok()

    def get_or_compute(self, key: StatsKey, compute: Compute, on_wait: OnWait | None = None) -> bytes:
        """Hit, or compute once across every process sharing this Redis (see the class docstring)."""
        return self._flight.run(key.digest(), lambda: self._get_or_compute(key, compute, on_wait), on_wait)

    def _get_or_compute(self, key: StatsKey, compute: Compute, on_wait: OnWait | None = None) -> bytes:
        if not self._usable():
            return _check_value(compute())
        vkey = self._value_key(key)
        lkey = vkey + ":lock"
        token = uuid.uuid4().hex
        # Only Redis calls sit inside the try: an OSError raised by ``compute`` itself must reach
        # the caller, not be mistaken for Redis trouble and computed again.
        try:
            value, leader = self._acquire(vkey, lkey, token, time.monotonic() + self.wait_timeout_s, on_wait)
        except self._redis_errors as exc:
            self._failed(exc, "lookup")
            return _check_value(compute())
        self._ok()
        if value is not None:
            return value
        if leader:
            return self._lead(vkey, lkey, token, compute)
        log.warning(
            "gave up waiting for another process's statistic; computing it here",
            extra={"event": "stats_cache_wait_timeout", "cache": self.url, "key": key.canonical()},
        )
        return _check_value(compute())

    def _acquire(
        self, vkey: str, lkey: str, token: str, deadline: float, on_wait: OnWait | None = None
    ) -> tuple[bytes | None, bool]:
        """(value, False) on a hit, (None, True) once we hold the lock, (None, False) at the deadline."""
        while True:
            value = self._open(vkey, self._r.get(vkey))
            if value is not None:
                return value, False
            if self._r.set(lkey, token, nx=True, px=self.lock_ttl_ms):
                return None, True
            value = self._wait(vkey, lkey, deadline, on_wait)
            if value is not None:
                return value, False
            if time.monotonic() >= deadline:
                return None, False

    def _wait(self, vkey: str, lkey: str, deadline: float, on_wait: OnWait | None = None) -> bytes | None:
        """Poll until the value appears (returned) or the lock is gone or the deadline passes (None)."""
        delay = 0.005
        notice = 0.0
        while time.monotonic() < deadline:
            if on_wait is not None and time.monotonic() >= notice:
                on_wait()
                notice = time.monotonic() + WAIT_NOTICE_S
            time.sleep(delay)
            delay = min(delay * 2, 0.1)
            pipe = self._r.pipeline(transaction=False)
            pipe.get(vkey)
            pipe.exists(lkey)
            raw, locked = pipe.execute()
            value = self._open(vkey, raw)
            if value is not None:
                return value
            if raw is not None:
                return None               # a damaged value (now gone): race for the lock again
            if not locked:
                return None
        return None

    def _lead(self, vkey: str, lkey: str, token: str, compute: Compute) -> bytes:
        stop = threading.Event()
        beat = threading.Thread(
            target=self._heartbeat, args=(lkey, token, stop), daemon=True, name="stats-lock-heartbeat"
        )
        beat.start()
        try:
            value = _check_value(compute())
        except BaseException:
            stop.set()
            self._unlock(lkey, token)  # let a waiter try; the failure is the caller's to see
            raise
        stop.set()
        beat.join()
        try:
            self._r.set(vkey, self._seal(value), px=self.ttl_ms)
            self._release(keys=[lkey], args=[token])
        except self._redis_errors as exc:
            self._failed(exc, "store")  # the value is computed: hand it over anyway
        return value

    def _heartbeat(self, lkey: str, token: str, stop: threading.Event) -> None:
        while not stop.wait(self.lock_ttl_ms / 3000):
            try:
                self._renew(keys=[lkey], args=[token, self.lock_ttl_ms])
            except self._redis_errors:
                return  # Redis is gone; the computation carries on without it

    def _unlock(self, lkey: str, token: str) -> None:
        try:
            self._release(keys=[lkey], args=[token])
        except self._redis_errors:
            pass

    def close(self) -> None:
        """Close the connection pool."""
        self._r.close()


def open_stats_cache(uri: str | None = None, **options: Any) -> StatsCache:
    """``redis://host:port/db`` (or ``rediss://``) → ``RedisStatsCache``; ``memory://`` or None → ``LocalStatsCache``.

    None reads ``$RULEWRIGHT_STATS_CACHE``; ``options`` go to the cache's constructor.
    """
    uri = uri if uri is not None else os.environ.get("RULEWRIGHT_STATS_CACHE", "memory://")
    if uri.startswith(("redis://", "rediss://", "unix://")):
        return RedisStatsCache(uri, **options)
    if uri in ("", "memory://"):
        return LocalStatsCache(**options)
    raise errors.invalid(
        Reason.INVALID_STORE_URI, "", f"unknown statistics cache {uri!r}; use redis:// or memory://", uri=uri
    )
