"""Edit specs and regions: the JSON form (``examples/edits/*.json``) as the API's messages.

- ``edit_spec_pb(d)``: an edit spec dict as ``rulewright.v1.EditSpec`` (absent fields: the
  server's defaults), every field of the engine's JSON form included (op, goal, solver, keep,
  stats, erase, box or mask regions).
- ``region_pb(d)``: ``{"seed": 35, "box": [x0, y0, x1, y1]}`` (or a ``mask``) as a Region.
- ``parse_region("35:8,22,56,38")`` and ``parse_seeds("0-15,20")``: the command line's forms.
"""

from __future__ import annotations

import base64
import zlib
from typing import Any, Mapping

from rulewright.v1 import edit_pb2, images_pb2

__all__ = ["edit_spec_pb", "region_pb", "region_dict", "parse_region", "parse_seeds", "SPEC_FIELDS"]

# What an edit spec JSON may hold (the engine's EditSpec.to_json, plus its bookkeeping keys).
SPEC_FIELDS = {"op", "method", "layers", "factors", "layer", "rank", "goal", "solver", "steps", "lr", "ridge",
               "truncation", "strength", "keep", "stats", "erase", "search", "copy", "paste", "context", "found",
               "description", "name", "model"}
_OPS = {"rewrite": edit_pb2.EditSpec.OP_REWRITE, "erase": edit_pb2.EditSpec.OP_ERASE,
        "zero": edit_pb2.EditSpec.OP_ZERO}
_GOALS = {"image": edit_pb2.EditSpec.GOAL_IMAGE, "value": edit_pb2.EditSpec.GOAL_VALUE}
_SOLVERS = {"adam": edit_pb2.EditSpec.SOLVER_OPTIMIZE, "optimize": edit_pb2.EditSpec.SOLVER_OPTIMIZE,
            "closed_form": edit_pb2.EditSpec.SOLVER_CLOSED_FORM}
_METHODS = {"multilayer": edit_pb2.EditSpec.METHOD_MULTILAYER, "single": edit_pb2.EditSpec.METHOD_SINGLE}


def region_pb(d: Mapping[str, Any], field: str = "region") -> images_pb2.Region:
    """A region dict (``seed`` plus ``box`` [x0, y0, x1, y1] or an engine ``mask``) as a Region.

    Masks in the engine's form (``{"encoding": "zlib-base64-u8", "size": [H, W], "data"}``) are
    sent raw. ValueError names ``field`` for anything malformed.
    """
    if not isinstance(d, Mapping) or "seed" not in d:
        raise ValueError(f"{field}: must be an object with seed and box or mask")
    if ("box" in d) == ("mask" in d):
        raise ValueError(f"{field}: give exactly one of box or mask")
    region = images_pb2.Region(seed=int(d["seed"]))
    if "box" in d:
        box = d["box"]
        if len(box) != 4:
            raise ValueError(f"{field}.box: must be [x0, y0, x1, y1], got {box!r}")
        x0, y0, x1, y1 = (int(v) for v in box)
        region.box.CopyFrom(images_pb2.Box(x0=x0, y0=y0, x1=x1, y1=y1))
    else:
        m = d["mask"]
        try:
            if m["encoding"] != "zlib-base64-u8":
                raise ValueError(f"unknown encoding {m['encoding']!r}")
            h, w = (int(v) for v in m["size"])
            raw = zlib.decompress(base64.b64decode(m["data"], validate=True))
        except (KeyError, TypeError, ValueError, zlib.error) as exc:
            raise ValueError(f"{field}.mask: malformed ({exc})") from None
        region.mask.CopyFrom(images_pb2.Mask(encoding=images_pb2.Mask.ENCODING_RAW, width=w, height=h, data=raw))
    return region


def region_dict(seed: int, box: tuple[int, int, int, int]) -> dict[str, Any]:
    """``{"seed": seed, "box": [x0, y0, x1, y1]}``: a box region in the edit spec's JSON form."""
    return {"seed": int(seed), "box": [int(v) for v in box]}


def _enum(d: Mapping[str, Any], key: str, table: Mapping[str, int]) -> int:
    value = d.get(key)
    if value is None:
        return 0
    if value not in table:
        raise ValueError(f"{key}: must be one of {sorted(table)}, got {value!r}")
    return table[value]


def edit_spec_pb(d: Mapping[str, Any] | edit_pb2.EditSpec) -> edit_pb2.EditSpec:
    """An edit spec (the JSON form of ``examples/edits/*.json``, or already an EditSpec) as the
    API's EditSpec. Absent fields stay unset, so the server fills in its defaults; ``model`` and
    ``name`` are bookkeeping and not sent. ValueError names an unknown or malformed field."""
    if isinstance(d, edit_pb2.EditSpec):
        return d
    if not isinstance(d, Mapping):
        raise ValueError(f"spec: must be a JSON object, got {type(d).__name__}")
    unknown = set(d) - SPEC_FIELDS
    if unknown:
        raise ValueError(f"spec: unknown fields {sorted(unknown)}")
    spec = edit_pb2.EditSpec(op=_enum(d, "op", _OPS), goal=_enum(d, "goal", _GOALS),
                             solver=_enum(d, "solver", _SOLVERS), layer=d.get("layer") or "",
                             rank=int(d.get("rank") or 0), steps=int(d.get("steps") or 0),
                             lr=float(d.get("lr") or 0.0), description=d.get("description") or "")
    if d.get("factors") not in (None, "free"):
        raise ValueError("factors: only 'free' travels over the API")
    # A recorded spec that says solver "optimize" without a method is a first-release edit.
    legacy = d.get("solver") == "optimize" and "method" not in d
    spec.method = edit_pb2.EditSpec.METHOD_SINGLE if legacy else _enum(d, "method", _METHODS)
    spec.layers.extend(str(n) for n in d.get("layers") or [])
    for key in ("ridge", "truncation", "strength"):
        if d.get(key) is not None:
            setattr(spec, key, float(d[key]))
    search = d.get("search") or {}
    if search.get("targets") is not None:
        spec.search.targets = int(search["targets"])
    elif legacy:
        spec.search.targets = 0
    if search.get("candidates"):
        spec.search.candidates = int(search["candidates"])
    if search.get("seed_start") is not None:
        spec.search.seed_start = int(search["seed_start"])
    if d.get("found") is not None:
        spec.found_given = True
        spec.found.extend(region_pb(r, f"found[{i}]") for i, r in enumerate(d["found"]))
    keep = d.get("keep") or {}
    if keep.get("weight") is not None:
        spec.keep.weight = float(keep["weight"])
    if keep.get("pool_start") is not None:
        spec.keep.pool_start = int(keep["pool_start"])
    for key in ("pool_size", "per_step", "seed"):
        if keep.get(key):
            setattr(spec.keep, key, int(keep[key]))
    stats = d.get("stats") or {}
    for key in ("samples", "seed_start"):
        if stats.get(key):
            setattr(spec.stats, key, int(stats[key]))
    if (d.get("erase") or {}).get("units"):
        spec.erase.units = int(d["erase"]["units"])
    if d.get("copy") is not None:
        spec.copy.CopyFrom(region_pb(d["copy"], "copy"))
    for key in ("paste", "context"):
        spec_list = getattr(spec, key)
        spec_list.extend(region_pb(r, f"{key}[{i}]") for i, r in enumerate(d.get(key) or []))
    return spec


def parse_region(text: str) -> dict[str, Any]:
    """``"SEED:x0,y0,x1,y1"`` as a region dict; ValueError if malformed."""
    seed, sep, box = text.partition(":")
    coords = box.split(",")
    try:
        if not sep or len(coords) != 4:
            raise ValueError
        return region_dict(int(seed), tuple(int(c) for c in coords))  # type: ignore[arg-type]
    except ValueError:
        raise ValueError(f"region {text!r}: expected SEED:x0,y0,x1,y1 (integers, image pixels)") from None


def parse_seeds(text: str) -> list[int]:
    """Seeds from ``"0-15"``, ``"1,5,9"`` or a mix like ``"0-3,10"``; ValueError if malformed."""
    seeds: list[int] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        lo, dash, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi if dash else lo)
        except ValueError:
            raise ValueError(f"seeds {text!r}: expected numbers and ranges like 0-15,20") from None
        if last < first:
            raise ValueError(f"seeds {text!r}: empty range {part!r}")
        seeds.extend(range(first, last + 1))
    if not seeds:
        raise ValueError("no seeds given")
    return seeds
