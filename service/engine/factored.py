"""Many versions of one base in one forward pass: each image's low-rank change beside the base weight.

An edited version differs from its base by low-rank deltas (one edit, or a chain of them), and
at an edited layer ``conv(x, W + s·Λ×Dᵀ) = conv(x, W) + conv(s·Dᵀx, Λ)``. So a version needs no
weights of its own, and one batch can hold images of many versions of one base: the base weight
runs once for every image and each image adds its own version's term.

- ``Change``: a version's deltas relative to its base, by weight, in lineage order
  (``Change.of(deltas)``); the empty change is the base itself. ``nbytes`` is what it holds.
- ``install(model)``: prepare a base generator for factored passes; call it once, before the
  module is shared between threads (it registers permanent forward hooks that do nothing
  outside ``rendering``).
- ``rendering(model, changes)``: a context, for the calling thread only, in which forward passes
  of ``model`` add to row i the terms of ``changes[i]`` (None: the base weights alone).
- ``group_size(n)``: the padded size a group of ``n`` rows runs at.
- ``current(module)``: the active side terms of a module that adds them itself (StyleGAN2's
  modulated convolution, whose demodulation must see the edited weight), or None.

Determinism. An image's bits must depend only on (version, seed, truncation), never on what else
is in its batch. The base convolution runs on the whole padded batch, as it always does. The
low-rank term runs on the rows that have one at that layer, grouped by rank and padded with zero
rows to the next bucket size (4, 8, 16, ...), as one batched matmul (each row's Dᵀx) and one
grouped convolution (each row its own Λ): each row is its own problem in both, and
``tests/test_factored.py`` checks that a row's bits are the same at every group size and
position. Zero-strength deltas are dropped, so a change of only those renders the base bit for bit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from typing import Callable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from rulewright.service.engine.delta import LowRankDelta

MIN_GROUP = 4          # the smallest padded group, as for whole batches (sampling.MIN_BUCKET)


def group_size(n: int) -> int:
    """The padded size a group of ``n`` rows is computed at (a power of two, at least MIN_GROUP)."""
    return max(MIN_GROUP, 1 << max(0, n - 1).bit_length())


@dataclasses.dataclass(frozen=True, eq=False)
class Change:
    """A version's low-rank deltas relative to its base: {weight key: deltas in lineage order}.

    Holds the deltas' own tensors (no copies), so versions built on a resident ancestor share
    its factors. Compared by identity.
    """

    parts: Mapping[str, tuple[LowRankDelta, ...]]

    @classmethod
    def of(cls, deltas: Sequence[LowRankDelta]) -> "Change":
        """The change made by ``deltas`` applied in order (zero-strength ones dropped)."""
        parts: dict[str, list[LowRankDelta]] = {}
        for d in deltas:
            if not d.is_zero:
                parts.setdefault(d.weight_key, []).append(d)
        return cls({k: tuple(v) for k, v in parts.items()})

    def then(self, deltas: Sequence[LowRankDelta]) -> "Change":
        """This change followed by ``deltas`` (a child version's change; this one's tensors shared)."""
        out = dict(self.parts)
        for k, v in Change.of(deltas).parts.items():
            out[k] = out.get(k, ()) + v
        return Change(out)

    def __bool__(self) -> bool:
        return bool(self.parts)

    def tensors(self) -> list[torch.Tensor]:
        """Every factor tensor held."""
        return [t for ds in self.parts.values() for d in ds for t in (d.direction, d.lam)]

    def nbytes(self) -> int:
        """Bytes of the factors (tensors shared between deltas counted once)."""
        seen: dict[int, int] = {}
        for t in self.tensors():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return sum(seen.values())

@dataclasses.dataclass(frozen=True)
class Side:
    """How one layer runs its low-rank term: a convolution of the projected input with Λ.

    ``part(Λ)`` is one row's slice of the grouped weight (the layer's Λ in the layout its
    convolution wants); ``gain`` multiplies the projection (a layer that scales its weight at
    run time, as StyleGAN2's equalized learning rate does).
    """

    transposed: bool
    stride: tuple | int
    padding: tuple | int
    dilation: tuple | int = 1
    output_padding: tuple | int = 0
    part: Callable[[torch.Tensor], torch.Tensor] = lambda lam: lam
    gain: float = 1.0

    def conv(self, y: torch.Tensor, weight: torch.Tensor, groups: int) -> torch.Tensor:
        """The grouped convolution: group g is row g's projected input with row g's Λ."""
        if self.transposed:
            return F.conv_transpose2d(y, weight, None, self.stride, self.padding, self.output_padding, groups,
                                      self.dilation)
        return F.conv2d(y, weight, None, self.stride, self.padding, self.dilation, groups)


def plain_side(module: nn.Module) -> Side | None:
    """The side of a plain, ungrouped, zero-padded ``Conv2d`` or ``ConvTranspose2d``; else None."""
    if type(module) is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros" \
            and isinstance(module.padding, tuple):
        return Side(False, module.stride, module.padding, module.dilation)
    if type(module) is nn.ConvTranspose2d and module.groups == 1 and module.padding_mode == "zeros":
        return Side(True, module.stride, module.padding, module.dilation, module.output_padding)
    return None


# ---------------------------------------------------------------------------------------------
# Installing on a base generator


_local = threading.local()
_install_lock = threading.Lock()


def _owner(model: nn.Module, weight: torch.Tensor) -> nn.Module | None:
    for module in model.modules():
        if module._parameters.get("weight") is weight:
            return module
    return None


def _layers(model) -> list[tuple[str, nn.Module, Side | None]]:
    """(weight key, module owning the weight, plain side or None) for each rewritable layer."""
    out = []
    for spec in model.layer_specs():
        module = _owner(model, spec.weight)
        out.append((spec.weight_key, module, plain_side(module) if module is not None else None))
    return out


def install(model) -> None:
    """Register, once, the hooks that add low-rank terms to plain convolutions during ``rendering``."""
    with _install_lock:
        if getattr(model, "_factored_keys", None) is not None:
            return
        keys: dict[int, str] = {}
        for key, module, side in _layers(model):
            if module is None or (side is None and not hasattr(module, "low_rank_side")):
                raise ValueError(f"{model.arch} layer weight {key} cannot run as a low-rank side path")
            keys[id(module)] = key
            if side is not None:
                module.register_forward_hook(_hook(model, key, side))
        model._factored_keys = keys


def _hook(model: nn.Module, key: str, side: Side):
    def add(module, args, output):
        terms = _terms(model, key)
        return None if terms is None else terms.add(output, args[0], side)
    return add


# ---------------------------------------------------------------------------------------------
# A factored pass


class _Plan:
    """The changes of one forward pass's rows, and the per-layer groups built from them."""

    def __init__(self, model: nn.Module, changes: Sequence[Change | None]):
        self.model = model
        self.changes = list(changes)
        self._terms: dict[str, Terms | None] = {}

    def terms(self, key: str) -> "Terms | None":
        if key not in self._terms:
            rows = [(i, c.parts[key]) for i, c in enumerate(self.changes) if c is not None and key in c.parts]
            self._terms[key] = Terms(key, rows, self.changes) if rows else None
        return self._terms[key]


def _terms(model: nn.Module, key: str) -> "Terms | None":
    plan = getattr(_local, "plan", None)
    if plan is None or plan.model is not model:
        return None
    return plan.terms(key)


def current(module: nn.Module) -> "Terms | None":
    """The low-rank terms ``module`` must add in the calling thread's factored pass, or None."""
    plan = getattr(_local, "plan", None)
    if plan is None:
        return None
    key = getattr(plan.model, "_factored_keys", {}).get(id(module))
    return None if key is None else plan.terms(key)


@contextlib.contextmanager
def rendering(model: nn.Module, changes: Sequence[Change | None]) -> Iterator[None]:
    """Within: this thread's forward passes of ``model`` add row i's ``changes[i]`` (one per row)."""
    install(model)
    previous = getattr(_local, "plan", None)
    _local.plan = _Plan(model, changes)
    try:
        yield
    finally:
        _local.plan = previous


class Terms:
    """The low-rank terms of one layer in one pass: its rows grouped by rank, each group padded."""

    def __init__(self, key: str, rows: list[tuple[int, tuple[LowRankDelta, ...]]], changes: list):
        self.key = key
        self.rows = rows
        self.changes = changes
        by_rank: dict[int, list[tuple[int, tuple[LowRankDelta, ...]]]] = {}
        for i, parts in rows:
            by_rank.setdefault(sum(d.rank for d in parts), []).append((i, parts))
        self.groups = list(by_rank.items())

    def add(self, out: torch.Tensor, x: torch.Tensor, side: Side) -> torch.Tensor:
        """``out`` plus, for each row with a change, ``conv(s·Dᵀx, Λ)`` (in place; returned)."""
        for rank, members in self.groups:
            rows = [i for i, _ in members]
            n, size = len(rows), group_size(len(rows))
            # The group runs on a window of ``size`` batch rows holding all its rows when there
            # is one (no copy); the window's other rows get zero factors, so they add nothing
            # and change nothing (each row is its own problem). Otherwise its rows are gathered.
            start = min(rows[0], x.shape[0] - size)
            if start >= 0 and rows[-1] < start + size:
                xs, slots = x.narrow(0, start, size), [i - start for i in rows]
            else:
                idx = torch.tensor(rows, device=x.device)
                xs, slots = x.index_select(0, idx), list(range(n))
                if size > n:
                    xs = torch.cat([xs, xs.new_zeros((size - n,) + xs.shape[1:])])
            c, h, w = xs.shape[1:]
            at = dict(zip(slots, members))
            zero_d = xs.new_zeros(rank, c)
            dt = torch.cat([torch.cat([d.direction.T.to(xs) for d in at[k][1]]) if k in at else zero_d
                            for k in range(size)])
            y = torch.bmm(dt.view(size, rank, c), xs.reshape(size, c, h * w))
            # Each direction's strength (times the layer's run-time gain); rows without factors
            # project to zero whatever their gain.
            gains = [[float(d.scale) * side.gain for d in at[k][1] for _ in range(d.rank)] if k in at
                     else [1.0] * rank for k in range(size)]
            if any(g != 1 for row in gains for g in row):
                y = y * torch.tensor(gains, dtype=y.dtype, device=y.device).view(size, rank, 1)
            pieces = {k: self._piece(at[k][1], side, xs) for k in at}
            zero_piece = torch.zeros_like(next(iter(pieces.values())))
            weight = torch.cat([pieces.get(k, zero_piece) for k in range(size)])
            term = side.conv(y.view(1, size * rank, h, w), weight, size)
            term = term.view(size, -1, *term.shape[-2:])
            _scatter_add(out, term, rows, slots)
        return out

    @staticmethod
    def _piece(parts: tuple[LowRankDelta, ...], side: Side, like: torch.Tensor) -> torch.Tensor:
        """One row's slice of the grouped weight: its deltas' Λ side by side along the rank (on ``like``'s device)."""
        pieces = [side.part(d.lam).to(like) for d in parts]
        # A transposed convolution's grouped weight is (groups·in, out, ...): the rank leads;
        # a convolution's is (groups·out, in, ...): the rank is the second axis.
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0 if side.transposed else 1)

    def versions(self) -> list[tuple[torch.Tensor, tuple[LowRankDelta, ...]]]:
        """(row indices, deltas) for each distinct change among the rows, in first-row order."""
        by_change: dict[int, tuple[list[int], tuple[LowRankDelta, ...]]] = {}
        for i, parts in self.rows:
            by_change.setdefault(id(self.changes[i]), ([], parts))[0].append(i)
        return [(torch.tensor(rows), parts) for rows, parts in by_change.values()]


def _scatter_add(out: torch.Tensor, term: torch.Tensor, rows: list[int], slots: list[int]) -> None:
    """out[rows[j]] += term[slots[j]], one in-place add per run of consecutive rows and slots.

    Slices, not ``index_add_``: the same additions, at a hundredth of the cost on the CPU.
    """
    j = 0
    while j < len(rows):
        k = j + 1
        while k < len(rows) and rows[k] == rows[k - 1] + 1 and slots[k] == slots[k - 1] + 1:
            k += 1
        out[rows[j]:rows[k - 1] + 1].add_(term[slots[j]:slots[k - 1] + 1])
        j = k
