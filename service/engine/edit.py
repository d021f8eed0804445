"""Edit specs, edits, and applying them to a loaded model.

- ``EditDraft``: a spec as given, its regions decoded once (``EditDraft.from_json(d)`` parses the
  JSON form; a transport may build one from its own message).
- ``EditSpec``: the complete, JSON-serializable description of an edit (every default filled in),
  replayable on another version of the model. ``EditSpec.complete(draft, model)`` migrates what
  an earlier release recorded, fills in the defaults and checks the bounds;
  ``EditSpec.from_json(d, model)`` is parse then complete; ``to_json()`` gives back the full form
  (the JSON form of the API's EditSpec, what a version records).
- ``upgrade_json(d)``: a first-release spec's JSON in today's shape (its masks, ``found_given``).
- ``Edit``: the result — low-rank deltas, the layer, the spec, metrics.
- ``check_improved(edit)``: ``EditDidNotImprove`` for a fit that ended at no edit (its parent's pictures).
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

from rulewright.service.engine.delta import LowRankDelta
from rulewright.service.engine.errors import EditDidNotImprove, InvalidArgument
from rulewright.service.engine.generators.base import Generator
from rulewright.service.engine.regions import Region, upgrade_region

OPS = ("rewrite", "erase", "zero")
GOALS = ("image", "value")
METHODS = ("multilayer", "single")
SOLVERS = ("adam", "closed_form")
FACTORS = ("free", "context")
QUALITIES = ("draft", "final")
STRENGTH_BOUNDS = (-10.0, 10.0)   # an edit's strength, in a spec or per request

# Defaults chosen from `python -m benchmarks.edit_quality --pareto` on the faces model
# (docs/editing.md). None means "the method's default" (METHOD_DEFAULTS), filled in by from_json.
DEFAULTS: dict[str, Any] = {
    "op": "rewrite",
    "method": "multilayer",
    "layers": [],              # multilayer: the layers that get a low-rank delta; empty = every rewritable one
    "factors": "free",         # multilayer: "free" factors, or input factors fixed to each layer's context directions
    "rank": None,
    "goal": "image",
    "solver": "adam",
    "steps": None,
    "lr": None,
    "ridge": 1e-4,            # C + ridge·tr(C)/d·I before whitening
    "truncation": 1.0,
    "strength": None,         # scale of the stored delta (exact for the low-rank form); 1 = as fitted
    "quality": "final",       # multilayer: which defaults fill steps, found targets and fit (QUALITY)
    "keep": {"weight": None, "pool_start": 1_000_000, "pool_size": 256, "per_step": 4, "seed": 0},
    "stats": {"samples": 1000, "seed_start": 0},
    "erase": {"units": 8},
    # Extra targets found by context search: the candidates whose keys in a paste box respond most
    # to the context direction get the copy pasted there too (erase: are erased there too).
    "search": {"targets": None, "candidates": 600, "seed_start": 2_000_000},
    # How the multilayer fit draws its targets: ``batch`` targets per step drawn afresh from all of
    # them (0: every target every step), the paste's edge ``feather`` (Gaussian sigma, pixels) in the
    # goal pictures, and the weight of an ``edges`` term (L1 between the rendered and the goal
    # pictures' finite differences: structure as well as colour).
    "fit": {"batch": None, "feather": None, "edges": None},
}

METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    # Low-rank deltas on every rewritable layer, image L1 on the (user + found) targets; steps,
    # found targets, strength and fit come from the spec's quality (QUALITY) unless given.
    "multilayer": {"rank": 4, "steps": 50, "lr": 2e-3, "keep_weight": 0.0, "search_targets": 16, "strength": 0.6,
                   "fit": {"batch": 0, "feather": 0.0, "edges": 0.0}},
    # The paper's edit: one layer, the update confined to the context directions, the user's targets.
    "single": {"rank": 8, "steps": 2001, "lr": 0.05, "keep_weight": 16.0, "search_targets": 0, "strength": 1.0,
               "fit": {"batch": 0, "feather": 0.0, "edges": 0.0}},
}

# The multilayer method's defaults by quality: a quick draft (the earlier default), or the final fit
# (more found targets, drawn a batch per step, more steps), which draws the object itself.
# Measured with each edit's detector (benchmarks.edit_quality --pareto, 200 held-out faces): on the
# shipped edits the final fit at strength 1 is seen on 8-61% of faces (the draft at 0.6: 2-3%) at
# a side effect below fine-tuning's; drawing 32 of its 128 targets a step keeps it to about 4-5x
# the draft's time. 64 targets, 16 a step, was about 2x the draft's time and 10-19 points lower.
# The final paste is feathered by 1 pixel: pasting the copy box's hard edges taught the glasses and
# mask edits a visible rectangle (box edge 0.43-0.50); feathered, the object stays and the block goes
# (box edge about 0.2, benchmarks.edit_gallery --override '{"fit": {"feather": 1}}').
QUALITY: dict[str, dict[str, Any]] = {
    "draft": {"steps": 50, "search_targets": 16, "strength": 0.6, "fit": {"batch": 0, "feather": 0.0, "edges": 0.0}},
    "final": {"steps": 200, "search_targets": 128, "strength": 1.0, "fit": {"batch": 32, "feather": 1.0, "edges": 0.0}},
}

# Specs recorded before the multilayer method said solver "optimize" (Adam on one layer) and had
# no search: read them as that, so a replay of an old version does what it did then.
_LEGACY = {"method": "single", "search": {"targets": 0}}   # and strength 1, the single method's default
# What a recorded spec (one that lists its found targets) meant before it had a "fit" field.
_LEGACY_FIT = {"batch": 0, "feather": 0.0, "edges": 0.0}


# The fields of a spec that are not regions, and its lists of regions.
SETTINGS = frozenset(DEFAULTS) | {"layer", "model", "name", "description"}
REGION_LISTS = ("paste", "context", "found")


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


def upgrade_json(spec: dict) -> dict:
    """A spec's JSON in today's shape: first-release masks rewritten (bytes unchanged), and
    ``found_given`` set where a ``found`` list is given (even empty), as the API's EditSpec holds it."""
    out = dict(spec)
    if out.get("copy") is not None:
        out["copy"] = upgrade_region(out["copy"])
    for key in REGION_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [upgrade_region(r) for r in out[key]]
    if out.get("found") is not None:
        out["found_given"] = True
    return out


@dataclasses.dataclass(frozen=True)
class EditDraft:
    """An edit spec as given: its settings (absent ones left out) and its regions, decoded once.

    What a transport builds from its request; ``EditSpec.complete(draft, model)`` checks it
    against a model and fills in every default. ``found`` is None when no list was given.
    """

    settings: dict
    copy: Region | None = None
    paste: tuple[Region, ...] = ()
    context: tuple[Region, ...] = ()
    found: tuple[Region, ...] | None = None

    @classmethod
    def from_json(cls, spec: Any) -> "EditDraft":
        """Parse a spec's JSON form (masks decoded here, once); InvalidArgument names the field."""
        if not isinstance(spec, dict):
            raise InvalidArgument("spec", "must be a JSON object")
        spec = upgrade_json(spec)
        unknown = set(spec) - SETTINGS - {"copy", "found_given", *REGION_LISTS}
        if unknown:
            raise InvalidArgument("spec", f"unknown fields {sorted(unknown)}")
        lists = {}
        for key in REGION_LISTS:
            items = spec.get(key) or []
            if not isinstance(items, list):
                raise InvalidArgument(key, "must be a list of regions")
            lists[key] = tuple(Region.from_spec(item, f"{key}[{i}]") for i, item in enumerate(items))
        return cls(settings={k: v for k, v in spec.items() if k in SETTINGS},
                   copy=Region.from_spec(spec["copy"], "copy") if spec.get("copy") is not None else None,
                   paste=lists["paste"], context=lists["context"],
                   found=lists["found"] if spec.get("found_given") else None)

    def regions(self) -> int:
        """How many regions the spec holds (copy, paste, context, found)."""
        return int(self.copy is not None) + len(self.paste) + len(self.context) + len(self.found or ())


def _migrate(given: dict, recorded: bool) -> dict:
    """What a spec recorded by an earlier release meant, in today's terms (``recorded``: it lists
    its found targets)."""
    s = dict(given)
    if s.get("solver") == "optimize":          # the name Adam had before "adam"
        s["solver"] = "adam"
        if "method" not in s:
            s["method"] = _LEGACY["method"]
            s["search"] = {**_LEGACY["search"], **(s.get("search") or {})}
    if recorded and "quality" not in s:
        s["quality"] = "draft"                 # recorded before there was a choice: the draft's defaults
    if recorded and "fit" not in s:
        s["fit"] = dict(_LEGACY_FIT)
    return s


def _defaults(given: dict) -> dict:
    """Every setting (the layer apart): the given ones, the method's and the quality's defaults for the rest."""
    s = {**copy.deepcopy(DEFAULTS), **{k: v for k, v in given.items() if k in DEFAULTS}}
    if "method" not in given and (given.get("solver") == "closed_form" or given.get("goal") == "value"):
        s["method"] = "single"                     # only the one-layer edit has them
    for key in ("keep", "stats", "erase", "search", "fit"):
        s[key] = _merge(DEFAULTS[key], given.get(key) or {}, key)
    for key, allowed_values in (("op", OPS), ("method", METHODS), ("goal", GOALS), ("solver", SOLVERS),
                                ("factors", FACTORS), ("quality", QUALITIES)):
        if s[key] not in allowed_values:
            raise InvalidArgument(key, f"must be one of {list(allowed_values)}, got {s[key]!r}")
    if s["method"] == "multilayer" and s["op"] == "zero":
        s["method"] = "single"                     # zero removes a direction of one layer: nothing to fit
    method = dict(METHOD_DEFAULTS[s["method"]])
    if s["method"] == "multilayer":
        method.update(QUALITY[s["quality"]])
    for key in ("rank", "steps", "lr", "strength"):
        if s[key] is None:
            s[key] = method[key]
    if s["keep"]["weight"] is None:
        s["keep"]["weight"] = method["keep_weight"]
    if s["search"]["targets"] is None:
        s["search"]["targets"] = method["search_targets"]
    for key, value in method["fit"].items():
        if s["fit"][key] is None:
            s["fit"][key] = value
    if s["method"] == "multilayer" and s["goal"] != "image":
        raise InvalidArgument("goal", "the multilayer method fits images; use method 'single' for goal 'value'")
    if s["method"] == "multilayer" and s["solver"] != "adam":
        raise InvalidArgument("solver", "the multilayer method is solved by adam; closed_form needs method 'single'")
    return s


def _check_layers(s: dict, layer: str, model: Generator):
    """The edited layer (its LayerInfo), ``layers`` and the rank against the model's layers."""
    infos = {i.name: i for i in model.layer_infos()}
    if layer not in infos:
        raise InvalidArgument("layer", f"{layer!r} is not a rewritable layer of this {model.arch}; "
                              f"rewritable: {', '.join(infos)}")
    info = infos[layer]
    _number(s, "rank", int, 1, 1 << 30, "rank")
    if s["rank"] > info.key_shape[0]:
        raise InvalidArgument("rank", f"rank {s['rank']} exceeds the key dimension {info.key_shape[0]} of {layer}")
    if not isinstance(s["layers"], list) or not all(isinstance(n, str) for n in s["layers"]):
        raise InvalidArgument("layers", "must be a list of layer names")
    for i, name in enumerate(s["layers"]):
        if name not in infos:
            raise InvalidArgument(f"layers[{i}]", f"{name!r} is not a rewritable layer of this {model.arch}; "
                                  f"rewritable: {', '.join(infos)}")
    if len(set(s["layers"])) != len(s["layers"]):
        raise InvalidArgument("layers", "names a layer twice")
    if s["method"] != "multilayer" and s["layers"]:
        raise InvalidArgument("layers", f"method {s['method']!r} edits one layer, named by 'layer'; 'layers' "
                              "lists the layers of method 'multilayer'")
    if s["method"] == "multilayer":
        for name in s["layers"] or list(infos):
            if s["rank"] > infos[name].key_shape[0]:
                raise InvalidArgument("rank", f"rank {s['rank']} exceeds the key dimension of layer {name}")
    return info


def _check_bounds(s: dict, info, model: Generator) -> None:
    """Every number of the settings within its bounds (the erase units and the solver against ``info``)."""
    _number(s, "strength", float, *STRENGTH_BOUNDS, "strength")
    _number(s["search"], "targets", int, 0, 256, "search.targets")
    _number(s["search"], "candidates", int, 1, 100_000, "search.candidates")
    _number(s["search"], "seed_start", int, 0, 2**62, "search.seed_start")
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
    _number(s["fit"], "batch", int, 0, 256, "fit.batch")
    _number(s["fit"], "feather", float, 0.0, 16.0, "fit.feather")
    _number(s["fit"], "edges", float, 0.0, 100.0, "fit.edges")
    _number(s["stats"], "samples", int, 1, 10_000_000, "stats.samples")
    _number(s["stats"], "seed_start", int, 0, 2**62, "stats.seed_start")
    if s["op"] == "erase":
        _number(s["erase"], "units", int, 1, info.value_shape[0], "erase.units")
    if s["solver"] == "closed_form" and (s["goal"] != "value" or not info.linear):
        raise InvalidArgument("solver", "closed_form needs goal 'value' on a layer whose value is linear "
                              f"in its weight ({info.name} linear={info.linear}, goal={s['goal']})")


def _check_regions(op: str, draft: EditDraft, resolution: int) -> None:
    """The regions inside the image, and those the op needs."""
    if draft.copy is not None:
        draft.copy.validate(resolution, "copy")
    for key in REGION_LISTS:
        for i, region in enumerate(getattr(draft, key) or ()):
            region.validate(resolution, f"{key}[{i}]")
    # A spec that lists its found targets (a recorded one, or a pruned list) is replayed as is.
    if draft.found is not None and len(draft.found) > 256:
        raise InvalidArgument("found", f"at most 256 found targets, got {len(draft.found)}")
    if op == "zero" and draft.found:
        raise InvalidArgument("found", "op zero has no targets to add")
    if op == "rewrite":
        if draft.copy is None:
            raise InvalidArgument("copy", "a rewrite needs a copy region (seed + mask or box)")
        if not draft.paste:
            raise InvalidArgument("paste", "a rewrite needs at least one paste target")
    elif not draft.context:
        raise InvalidArgument("context", f"{op} needs at least one context region")


@dataclasses.dataclass
class EditSpec:
    """A validated, complete edit description (see ``to_json`` for the fields)."""

    op: str
    method: str
    layers: list
    factors: str
    layer: str
    rank: int
    goal: str
    solver: str
    steps: int
    lr: float
    ridge: float
    truncation: float
    strength: float
    quality: str
    keep: dict
    stats: dict
    erase: dict
    search: dict
    fit: dict
    copy: Region | None = None
    paste: list[Region] = dataclasses.field(default_factory=list)
    context: list[Region] = dataclasses.field(default_factory=list)
    found: list[Region] | None = None     # targets found by search (None: not searched yet)
    description: str = ""                 # the caller's free text, recorded with the version's spec

    @property
    def targets(self) -> list[Region]:
        """Every paste target: the user's, then those found by context search."""
        return list(self.paste) + list(self.found or [])

    @classmethod
    def from_json(cls, spec: Any, model: Generator) -> "EditSpec":
        """Validate ``spec`` (the JSON form) against ``model`` and fill in every default; InvalidArgument names the field."""
        return cls.complete(EditDraft.from_json(spec), model)

    @classmethod
    def complete(cls, draft: EditDraft, model: Generator) -> "EditSpec":
        """A parsed spec migrated, completed with its defaults and checked against ``model``."""
        s = _defaults(_migrate(draft.settings, draft.found is not None))
        layer = draft.settings.get("layer") or model.default_layer()
        _check_bounds(s, _check_layers(s, layer, model), model)
        _check_regions(s["op"], draft, model.resolution)
        return cls(layer=layer, copy=draft.copy, paste=list(draft.paste), context=list(draft.context),
                   found=None if draft.found is None else list(draft.found), **{k: s[k] for k in DEFAULTS},
                   description=str(draft.settings.get("description") or ""))

    def to_json(self) -> dict:
        """The complete spec as JSON (what versions record and replays read)."""
        out = {k: copy.deepcopy(getattr(self, k)) for k in DEFAULTS}
        out["layer"] = self.layer
        if self.copy is not None:
            out["copy"] = self.copy.to_spec()
        out["paste"] = [r.to_spec() for r in self.paste]
        out["context"] = [r.to_spec() for r in self.context]
        if self.found is not None:
            out["found"] = [r.to_spec() for r in self.found]
        if self.description:
            out["description"] = self.description
        return out


@dataclasses.dataclass
class Edit:
    """What an edit produced: low-rank deltas (what is stored), the layer, spec and metrics."""

    layer: str
    deltas: list[LowRankDelta]
    spec: dict
    metrics: dict


def check_improved(edit: Edit) -> None:
    """Raise ``EditDidNotImprove`` when the fit left every factor at zero (op zero fits nothing).

    The solvers hand back their best iterate, and the start (no edit) is one: when no step beats
    it the edit draws its parent's pictures at any strength, and storing it would only add a
    version identical to its parent.
    """
    spec, metrics = edit.spec, edit.metrics
    if spec.get("op") == "zero" or any(bool(d.lam.any()) for d in edit.deltas):
        return
    before, after = metrics.get("goal_loss_before"), metrics.get("goal_loss_after")
    fit = ("its least-squares solution is zero" if spec.get("solver") == "closed_form" else
           f"none of its {spec.get('steps')} steps at lr {spec.get('lr')} lowered its loss below no edit's")
    raise EditDidNotImprove(
        f"the fit did not improve on no edit: {fit}, so the edit would draw its parent's pictures "
        f"({spec.get('goal')} goal loss {before:.6g} before, {after:.6g} after); nothing was stored. "
        "More steps or a smaller lr may help.",
        goal=spec.get("goal"), goal_loss_before=before, goal_loss_after=after, method=spec.get("method"),
        solver=spec.get("solver"), steps=spec.get("steps"), lr=spec.get("lr"))


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
                if d.is_zero:
                    continue
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
            if d.is_zero:
                continue
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
