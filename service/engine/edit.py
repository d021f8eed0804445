"""Edit specs, edits, and applying them to a loaded model.

- ``EditSpec``: the complete, JSON-serializable description of an edit (every default filled in),
  replayable on another version of the model. ``EditSpec.from_json(d, model)`` validates and
  completes a user's spec; ``to_json()`` gives back the full form.
- ``Edit``: the result — low-rank deltas, the layer, the spec, metrics.
- ``apply_edit(model, edit)`` → ``AppliedEdit``: changes the weights in place; ``remove()``
  restores them bit for bit, so an edit comes and goes without reloading the model.
- ``apply_lineage(model, edits)``: a chain of edits, in order (removed in reverse).
- ``edited_weights(model, edits)`` / ``render_edited(model, edits, z)``: the edited weights, and
  images rendered with them, without modifying the model (safe beside other readers).
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Sequence

import torch

from .delta import LowRankDelta
from .errors import InvalidArgument
from .generators.base import Generator
from .regions import Region

OPS = ("rewrite", "erase", "zero")
GOALS = ("image", "value")
SOLVERS = ("optimize", "closed_form")

# Defaults chosen from benchmarks/edit_quality.py on the faces model (README "Editing").
DEFAULTS: dict[str, Any] = {
    "op": "rewrite",
    "rank": 8,
    "goal": "image",
    "solver": "optimize",
    "steps": 2001,
    "lr": 0.05,
    "ridge": 1e-4,            # C + ridge·tr(C)/d·I before whitening
    "truncation": 1.0,
    "keep": {"weight": 16.0, "pool_start": 1_000_000, "pool_size": 256, "per_step": 4, "seed": 0},
    "stats": {"samples": 1000, "seed_start": 0},
    "erase": {"units": 8},
}


def _merge(defaults: dict, given: dict, field: str) -> dict:
    unknown = set(given) - set(defaults)
    if unknown:
        raise InvalidArgument(field, f"unknown fields {sorted(unknown)}; known: {sorted(defaults)}")
    out = copy.deepcopy(defaults)
    out.update(given)
    return out


def _number(spec: dict, key: str, kind: type, lo: float, hi: float, field: str) -> None:
    v = spec[key]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
        raise InvalidArgument(field, f"must be {'an integer' if kind is int else 'a number'}, got {v!r}")
    if not lo <= v <= hi or v != v:
        raise InvalidArgument(field, f"must lie in [{lo}, {hi}], got {v}")


@dataclasses.dataclass
class EditSpec:
    """A validated, complete edit description (see ``to_json`` for the fields)."""

    op: str
    layer: str
    rank: int
    goal: str
    solver: str
    steps: int
    lr: float
    ridge: float
    truncation: float
    keep: dict
    stats: dict
    erase: dict
    copy: Region | None = None
    paste: list[Region] = dataclasses.field(default_factory=list)
    context: list[Region] = dataclasses.field(default_factory=list)

    @classmethod
    def from_json(cls, spec: dict, model: Generator) -> "EditSpec":
        """Validate ``spec`` against ``model`` and fill in every default; InvalidArgument names the field."""
        if not isinstance(spec, dict):
            raise InvalidArgument("spec", "must be a JSON object")
        allowed = set(DEFAULTS) | {"layer", "copy", "paste", "context", "model", "name", "description"}
        unknown = set(spec) - allowed
        if unknown:
            raise InvalidArgument("spec", f"unknown fields {sorted(unknown)}")
        s = {**copy.deepcopy(DEFAULTS), **{k: v for k, v in spec.items() if k in DEFAULTS}}
        for key in ("keep", "stats", "erase"):
            s[key] = _merge(DEFAULTS[key], spec.get(key) or {}, key)
        if s["op"] not in OPS:
            raise InvalidArgument("op", f"must be one of {list(OPS)}, got {s['op']!r}")
        if s["goal"] not in GOALS:
            raise InvalidArgument("goal", f"must be one of {list(GOALS)}, got {s['goal']!r}")
        if s["solver"] not in SOLVERS:
            raise InvalidArgument("solver", f"must be one of {list(SOLVERS)}, got {s['solver']!r}")
        layer = spec.get("layer") or model.default_layer()
        try:
            info = {i.name: i for i in model.layer_infos()}[layer]
        except KeyError:
            names = ", ".join(i.name for i in model.layer_infos())
            raise InvalidArgument("layer", f"{layer!r} is not a rewritable layer of this {model.arch}; "
                                  f"rewritable: {names}") from None
        _number(s, "rank", int, 1, 1 << 30, "rank")
        if s["rank"] > info.key_shape[0]:
            raise InvalidArgument("rank", f"rank {s['rank']} exceeds the key dimension {info.key_shape[0]} of {layer}")
        _number(s, "steps", int, 1, 100_000, "steps")
        _number(s, "lr", float, 1e-8, 10.0, "lr")
        _number(s, "ridge", float, 0.0, 1.0, "ridge")
        _number(s, "truncation", float, 0.0, 1.0, "truncation")
        try:
            model.check_truncation(s["truncation"])
        except ValueError as exc:
            raise InvalidArgument("truncation", str(exc)) from None
        _number(s["keep"], "weight", float, 0.0, 1e4, "keep.weight")
        for key, hi in (("pool_start", 2**62), ("pool_size", 100_000), ("per_step", 1024), ("seed", 2**62)):
            _number(s["keep"], key, int, 0 if key in ("pool_start", "seed") else 1, hi, f"keep.{key}")
        _number(s["stats"], "samples", int, 1, 10_000_000, "stats.samples")
        _number(s["stats"], "seed_start", int, 0, 2**62, "stats.seed_start")
        if s["op"] == "erase":
            _number(s["erase"], "units", int, 1, info.value_shape[0], "erase.units")
        if s["solver"] == "closed_form" and (s["goal"] != "value" or not info.linear):
            raise InvalidArgument("solver", "closed_form needs goal 'value' on a layer whose value is linear "
                                  f"in its weight ({layer} linear={info.linear}, goal={s['goal']})")

        res = model.resolution
        regions = {}
        for key in ("copy",):
            regions[key] = Region.from_spec(spec[key], key) if spec.get(key) is not None else None
        for key in ("paste", "context"):
            items = spec.get(key) or []
            if not isinstance(items, list):
                raise InvalidArgument(key, "must be a list of regions")
            regions[key] = [Region.from_spec(item, f"{key}[{i}]") for i, item in enumerate(items)]
        if regions["copy"] is not None:
            regions["copy"].validate(res, "copy")
        for key in ("paste", "context"):
            for i, region in enumerate(regions[key]):
                region.validate(res, f"{key}[{i}]")
        if s["op"] == "rewrite":
            if regions["copy"] is None:
                raise InvalidArgument("copy", "a rewrite needs a copy region (seed + mask or box)")
            if not regions["paste"]:
                raise InvalidArgument("paste", "a rewrite needs at least one paste target")
        elif not regions["context"]:
            raise InvalidArgument("context", f"{s['op']} needs at least one context region")
        return cls(layer=layer, copy=regions["copy"], paste=regions["paste"], context=regions["context"],
                   **{k: s[k] for k in DEFAULTS})

    def to_json(self) -> dict:
        """The complete spec as JSON (what versions record and replays read)."""
        out = {k: copy.deepcopy(getattr(self, k)) for k in DEFAULTS}
        out["layer"] = self.layer
        if self.copy is not None:
            out["copy"] = self.copy.to_spec()
        out["paste"] = [r.to_spec() for r in self.paste]
        out["context"] = [r.to_spec() for r in self.context]
        return out


@dataclasses.dataclass
class Edit:
    """What an edit produced: low-rank deltas (what is stored), the layer, spec and metrics."""

    layer: str
    deltas: list[LowRankDelta]
    spec: dict
    metrics: dict


class AppliedEdit:
    """An edit applied in place to a model's weights; ``remove()`` restores them exactly."""

    def __init__(self, model: Generator, edit: Edit):
        self._saved: list[tuple[torch.nn.Parameter, torch.Tensor]] = []
        params = dict(model.public_parameters())
        missing = [d.weight_key for d in edit.deltas if d.weight_key not in params]
        if missing:
            raise InvalidArgument("edit", f"edits weights this model lacks: {missing}")
        with torch.no_grad():
            for d in edit.deltas:
                p = params[d.weight_key]
                if tuple(p.shape) != d.weight_shape:
                    self.remove()
                    raise InvalidArgument("edit", f"delta for {d.weight_key} has shape {d.weight_shape}, "
                                          f"weight is {tuple(p.shape)}")
                self._saved.append((p, p.detach().clone()))
                p.add_(d.dense().to(device=p.device, dtype=p.dtype))

    def remove(self) -> None:
        """Put the original weights back (bit-exact); safe to call twice."""
        with torch.no_grad():
            for p, original in reversed(self._saved):
                p.copy_(original)
        self._saved.clear()

    def __enter__(self) -> "AppliedEdit":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_edit(model: Generator, edit: Edit) -> AppliedEdit:
    """Apply ``edit`` to ``model`` in place; the handle's ``remove()`` undoes it."""
    return AppliedEdit(model, edit)


def edited_weights(model: Generator, edits: Sequence[Edit]) -> dict[str, torch.Tensor]:
    """{parameter name: edited weight} for a lineage, computed without touching the model."""
    names = {id(p): n for n, p in model.named_parameters()}
    params = dict(model.public_parameters())
    out: dict[str, torch.Tensor] = {}
    for edit in edits:
        for d in edit.deltas:
            if d.weight_key not in params:
                raise InvalidArgument("edit", f"edits weight {d.weight_key!r}, which this model lacks")
            p = params[d.weight_key]
            name = names[id(p)]
            current = out.get(name, p.detach())
            out[name] = current + d.dense().to(device=p.device, dtype=p.dtype)
    return out


def render_edited(model: Generator, edits: Sequence[Edit], z: torch.Tensor, truncation: float = 1.0) -> torch.Tensor:
    """Images of the edited model for ``z``; the shared model's weights are never changed."""
    from torch.func import functional_call

    with torch.no_grad():
        return functional_call(model, edited_weights(model, edits), (z, truncation))


class AppliedLineage:
    """A chain of applied edits; ``remove()`` undoes them in reverse order."""

    def __init__(self, model: Generator, edits: Sequence[Edit]):
        self.handles: list[AppliedEdit] = []
        try:
            for edit in edits:
                self.handles.append(AppliedEdit(model, edit))
        except Exception:
            self.remove()
            raise

    def remove(self) -> None:
        """Undo every edit, newest first."""
        while self.handles:
            self.handles.pop().remove()

    def __enter__(self) -> "AppliedLineage":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def apply_lineage(model: Generator, edits: Sequence[Edit]) -> AppliedLineage:
    """Apply a lineage (oldest edit first) in place."""
    return AppliedLineage(model, edits)
