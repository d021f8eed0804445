"""Resident versions: one cache, one budget, every version of a base held as the base plus its factors.

- ``Residency(registry, device, max_resident, budget_bytes)``: ``get(version)`` returns the
  resident version, loading it on first use and evicting the least recently used beyond
  ``max_resident`` versions or ``budget_bytes``; ``peek``, ``versions()`` and ``nbytes()``.
- ``Resident``: one version: ``model`` (its base's generator, shared by every version of that
  base), ``change`` (the low-rank deltas along its lineage; empty for the import itself),
  ``render`` (its images, through the factored path), ``hookable`` (a private dense module), and
  ``at(strength)``: the same version with its own edit at another strength (per request).
- ``Base``: an import's generator on the device, held while any resident version uses it.

What is held, and what the budget counts: each base's tensors once, plus each resident version's
factors (tensors shared between versions, such as an ancestor's deltas reused by a child, counted
once). An edited version holds no dense weights: its images run the base weights with its own
low-rank terms beside them (``engine.factored``), so thousands of versions of one base fit where
a handful of dense copies would, and requests for different versions share forward passes.

Loading reads only what is missing: a version whose parent (or any ancestor) is resident reads the
deltas below that ancestor; one whose base is resident but no ancestor reads its lineage's deltas
(the manifests on the way up, then one blob per edit); only a version of a base nobody holds reads
the base weights.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from typing import Sequence

import torch

from rulewright.registry import errors
from rulewright.registry.errors import Reason
from rulewright.registry.manifests import Version
from rulewright.registry.registry import Registry

from rulewright.service.engine import factored
from rulewright.service.engine.delta import LowRankDelta, apply_to_state_dict, with_strength
from rulewright.service.engine.errors import InvalidArgument
from rulewright.service.engine.factored import Change
from rulewright.service.engine.generators.base import Generator
from rulewright.service.engine.loading import ARCHITECTURES
from rulewright.service.engine.sampling import sample
from rulewright.service.domain.weights import base_weights, delta_misfit, read_deltas

log = logging.getLogger(__name__)


def _storages(tensors) -> dict[int, int]:
    """{storage pointer: bytes} of distinct storages."""
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


@dataclasses.dataclass(eq=False)
class Base:
    """An import's generator on the device, shared by every resident version built on it (never hooked)."""

    key: tuple[str, int]               # (model, number of the import)
    model: Generator
    nbytes: int                        # its tensors' storage
    users: int = 0                     # resident versions holding it

    def __post_init__(self):
        self.shapes = {k: tuple(t.shape) for k, t in self.model.public_state_dict().items()}


@dataclasses.dataclass(eq=False)
class Resident:
    """A resident version: its base's generator and the low-rank deltas that make it this version."""

    version: Version
    base: Base
    lineage: tuple[tuple[LowRankDelta, ...], ...] = ()   # each edit's deltas, from the import down
    own: tuple[LowRankDelta, ...] = ()   # this version's own deltas, zero strength included (what ``at`` scales)

    def __post_init__(self):
        self.change = Change.of([d for deltas in self.lineage for d in deltas])

    @property
    def strength(self) -> float | None:
        """The strength of this version's own edit (its deltas' scale); None for an import."""
        if self.version.kind != "edit":
            return None
        return float(self.own[0].scale) if self.own else self.version.edit_strength

    def at(self, strength: float | None) -> "Resident":
        """This version with its own edit at ``strength`` (None: as stored); earlier edits of its
        lineage keep theirs. The same factors, shared: the same pixels as a version rescaled to it.

        INVALID_ARGUMENT (``strength``) for an import, which has no edit to scale.
        """
        if strength is None:
            return self
        if self.version.kind != "edit":
            raise InvalidArgument("strength", f"{self.version.name} is an import: it has no edit to give a strength")
        if all(d.scale == strength for d in self.own):
            return self                   # its own strength: its own change, bit for bit
        own = tuple(with_strength(self.own, strength))
        return Resident(self.version, self.base, self.lineage[:-1] + (tuple(d for d in own if not d.is_zero),), own)

    @property
    def model(self) -> Generator:
        """The base's generator: the architecture, layers and shapes of this version (shared; never hook it).

        Its weights are the import's: draw this version's images with ``render`` (or
        ``Domain.sample``) and hook a ``hookable()`` module.
        """
        return self.base.model

    @property
    def batch_key(self) -> Base:
        """Requests with the same key may share forward passes: every version of one base."""
        return self.base

    def render(self, z: torch.Tensor, truncation: float = 1.0, batch_size: int = 16,
               then: Sequence[LowRankDelta] = ()) -> torch.Tensor:
        """Images (N, 3, R, R) in [-1, 1] of this version, or of a child that adds ``then`` (a preview)."""
        change = self.change.then(then) if then else self.change
        return sample(self.model, z=z, truncation=truncation, batch_size=batch_size, changes=change)

    def hookable(self) -> Generator:
        """A private module with this version's dense weights, for work that hooks layers.

        Hooks live on module objects: on the shared one they would reach concurrent samples. The
        unedited tensors are the base's (no copy); each edited weight is formed for this module
        alone, delta by delta as ``weights.materialize`` does, so statistics see the same bits.
        """
        state = self.model.public_state_dict()
        for deltas in self.lineage:
            state = apply_to_state_dict(state, deltas)
        private = type(self.model).from_state_dict(state, share=True)
        private._layer_infos = self.model.layer_infos()     # traced once, before the base was shared
        return private

    def nbytes(self) -> int:
        """Bytes of this version's own factors (its base not included)."""
        return sum(_storages(self.change.tensors()).values())


class Residency:
    """Resident versions of every model in one LRU, bounded by a count and a byte budget."""

    def __init__(
        self,
        registry: Registry,               # where manifests, weights and deltas come from
        device: torch.device,             # where bases and factors live
        max_resident: int = 1024,         # most versions kept (an edited one holds only its factors)
        budget_bytes: int | None = None,  # most bytes held: bases once plus every version's factors; None: no limit
    ):
        self.registry = registry
        self.device = device
        self._max_resident = max_resident
        self._budget_bytes = budget_bytes
        self._versions: "collections.OrderedDict[tuple[str, int], Resident]" = collections.OrderedDict()
        self._bases: dict[tuple[str, int], Base] = {}
        self._held: dict[int, list[int]] = {}     # factor storage pointer → [resident users, bytes]
        self._bytes = 0
        self._lock = threading.Lock()

    # ---- limits (a change applies at once) -------------------------------------------------

    @property
    def max_resident(self) -> int:
        """Most versions kept."""
        return self._max_resident

    @max_resident.setter
    def max_resident(self, value: int) -> None:
        with self._lock:
            self._max_resident = value
            self._evict()

    @property
    def budget_bytes(self) -> int | None:
        """Most bytes held (bases once plus every version's factors); None: no limit."""
        return self._budget_bytes

    @budget_bytes.setter
    def budget_bytes(self, value: int | None) -> None:
        with self._lock:
            self._budget_bytes = value
            self._evict()

    # ---- reading ---------------------------------------------------------------------------

    def peek(self, model: str, number: int) -> Resident | None:
        """The resident version, or None; loads nothing and leaves the order alone."""
        with self._lock:
            return self._versions.get((model, number))

    def versions(self) -> list[tuple[str, int]]:
        """(model, number) of every resident version, least recently used first."""
        with self._lock:
            return list(self._versions)

    def nbytes(self) -> int:
        """Bytes held: each resident base's tensors once plus the distinct factor tensors."""
        with self._lock:
            return self._bytes

    # ---- loading ---------------------------------------------------------------------------

    def get(self, version: Version) -> Resident:
        """The resident ``version``, loaded on first use (the least recently used evicted)."""
        key = (version.model, version.number)
        with self._lock:
            hit = self._versions.get(key)
            if hit is not None:
                self._versions.move_to_end(key)
                return hit
        loaded = self._load(version)
        with self._lock:
            hit = self._versions.get(key)
            if hit is not None:                   # a concurrent request loaded it first
                self._versions.move_to_end(key)
                return hit
            base = self._bases.setdefault(loaded.base.key, loaded.base)
            loaded.base = base                    # the same weights: one copy, whoever loaded them
            self._admit(key, loaded)
            self._evict()
        return loaded

    def _load(self, version: Version) -> Resident:
        """The version built on its nearest resident ancestor, or on its base."""
        below: list[Version] = []                 # edits not resident, newest first
        seen: set[int] = set()
        current, start = version, None
        while current.kind != "import":
            below.append(current)
            seen.add(current.number)
            if current.parent is not None:
                start = self.peek(current.model, current.parent)   # resident: no manifest or blob to read
                if start is not None:
                    break
            current = self._parent(version, current, seen)
        if start is None:
            base, lineage = self._base(current), ()
        else:
            base, lineage = start.base, start.lineage
        own: tuple[LowRankDelta, ...] = ()
        for edit in reversed(below):
            own = self._deltas(base, edit)
            lineage += (tuple(d for d in own if not d.is_zero),)   # strength 0: no change, as materializing skips it
        return Resident(version, base, lineage, own)

    def _parent(self, version: Version, child: Version, seen: set[int]) -> Version:
        if child.parent is None or child.parent in seen:
            raise errors.DataLoss(Reason.MANIFEST_CORRUPT, f"lineage of {version.name} does not start at an import")
        try:
            return self.registry.get_version(child.model, child.parent)
        except errors.NotFound:
            raise errors.DataLoss(Reason.MANIFEST_CORRUPT,
                                  f"lineage of {version.name} is broken: ancestor {child.parent} is missing",
                                  model=version.model, version=version.number, ancestor=child.parent) from None

    def _base(self, root: Version) -> Base:
        with self._lock:
            base = self._bases.get((root.model, root.number))
        if base is not None:
            return base
        state = {k: v.to(self.device) for k, v in base_weights(self.registry, root).items()}
        model = ARCHITECTURES[self.registry.get_model(root.model).arch].from_state_dict(state, share=True)
        model.layer_infos()          # traces (hooks) it now, while no other request can see it
        factored.install(model)      # likewise: its side-path hooks, before it is shared
        return Base((root.model, root.number), model, sum(_storages(model.state_dict().values()).values()))

    def _deltas(self, base: Base, edit: Version) -> tuple[LowRankDelta, ...]:
        """An edit's deltas on the device, checked against the base's weights."""
        shapes = base.shapes
        out = []
        for d in read_deltas(self.registry, edit):
            if d.weight_key not in shapes:
                raise delta_misfit(edit, KeyError(f"delta edits {d.weight_key!r}, which the weights lack"))
            if shapes[d.weight_key] != d.weight_shape:
                raise delta_misfit(edit, ValueError(f"delta for {d.weight_key} expects shape {d.weight_shape}, "
                                                    f"weight is {shapes[d.weight_key]}"))
            out.append(dataclasses.replace(d, direction=d.direction.to(self.device), lam=d.lam.to(self.device)))
        return tuple(out)

    # ---- accounting (under the lock) ---------------------------------------------------------

    def _admit(self, key: tuple[str, int], resident: Resident) -> None:
        self._versions[key] = resident
        base = resident.base
        base.users += 1
        if base.users == 1:
            self._bases[base.key] = base
            self._bytes += base.nbytes
        for ptr, size in _storages(resident.change.tensors()).items():
            held = self._held.setdefault(ptr, [0, size])
            held[0] += 1
            if held[0] == 1:
                self._bytes += size

    def _release(self, resident: Resident) -> None:
        for ptr in _storages(resident.change.tensors()):
            held = self._held[ptr]
            held[0] -= 1
            if held[0] == 0:
                self._bytes -= held[1]
                del self._held[ptr]
        base = resident.base
        base.users -= 1
        if base.users == 0:
            self._bytes -= base.nbytes
            del self._bases[base.key]

    def _evict(self) -> None:
        # The newest stays even if it alone exceeds the budget: it is about to be used.
        while len(self._versions) > self._max_resident or (
                len(self._versions) > 1 and self._budget_bytes is not None and self._bytes > self._budget_bytes):
            key, resident = self._versions.popitem(last=False)
            self._release(resident)
            log.info("version evicted", extra={"event": "version_evicted", "model": key[0], "version": key[1]})
