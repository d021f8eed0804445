"""Request schemas: a JSON body (or a path and query) as the domain's typed request.

Each ``*_request`` maps its JSON to the same typed request (``domain/requests.py``) the gRPC
servicers build; ``Domain`` checks it with the one set of bounds. Only what JSON itself can get
wrong is refused here: types, unknown fields, and counts and mask sizes before a list is walked
or a mask inflated. ``*_FIELDS`` name the few fields JSON spells differently from the domain
(``errors.renamed``).
"""

from __future__ import annotations

import json
import math
from typing import Any, Iterable

from rulewright.service.domain.limits import Limits, check_count, check_region_json
from rulewright.service.domain.requests import (AliasRequest, DissectRequest, Intervention, Region,
                                               SampleRequest, SearchRequest)
from rulewright.service.errors import InvalidArgument

MAX_INT64 = 2**63 - 1
SEED_RANGE_FIELDS = {"seeds": "seed_range.count"}          # a search over seed_range: its count
DISSECT_FIELDS = {"regions[0]": "region"}                   # a dissection takes one region
ABLATE_FIELDS = {"interventions[0].units": "ablate", "interventions[0]": "ablate"}


# ---- the body --------------------------------------------------------------------------------

def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def parse_body(data: bytes) -> dict:
    """The JSON object of a request body (empty: ``{}``)."""
    if not data.strip():
        return {}
    try:
        body = json.loads(data, parse_constant=_refuse_constant)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidArgument("body", f"not valid JSON: {exc}") from None
    except RecursionError:                # the parser recurses per level: 1 MiB of '[' is too deep for it
        raise InvalidArgument("body", "JSON nested too deeply") from None
    if not isinstance(body, dict):
        raise InvalidArgument("body", f"must be a JSON object, got {type(body).__name__}")
    return body


def only(body: dict, allowed: Iterable[str]) -> dict:
    """``body``, refused if it has fields outside ``allowed``."""
    unknown = set(body) - set(allowed)
    if unknown:
        raise InvalidArgument("body", f"unknown fields {sorted(unknown)}")
    return body


# ---- JSON values -----------------------------------------------------------------------------

def integer(body: dict, key: str, default: Any = None, lo: int = 0, hi: int = MAX_INT64, field: str | None = None):
    """``body[key]`` as an integer in [lo, hi]; ``default`` when absent or null."""
    field = field or key
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidArgument(field, f"must be an integer, got {json.dumps(value)[:80]}")
    if not lo <= value <= hi:
        raise InvalidArgument(field, f"must lie in [{lo}, {hi}], got {value}")
    return value


def required_int(body: dict, key: str, lo: int = 0, hi: int = MAX_INT64) -> int:
    """``body[key]`` as an integer in [lo, hi], which must be there."""
    if body.get(key) is None:
        raise InvalidArgument(key, "is required")
    return integer(body, key, lo=lo, hi=hi)


def number(body: dict, key: str) -> float | None:
    """``body[key]`` as a finite number; None when absent or null."""
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidArgument(key, f"must be a finite number, got {json.dumps(value)}")
    return float(value)


def string(body: dict, key: str, default: str = "", required: bool = False, limit: int = 256) -> str:
    """``body[key]`` as a string of at most ``limit`` characters; ``default`` when absent, null or empty."""
    value = body.get(key)
    if value is None or value == "":
        if required:
            raise InvalidArgument(key, "is required")
        return default
    if not isinstance(value, str):
        raise InvalidArgument(key, f"must be a string, got {json.dumps(value)}")
    if len(value) > limit:
        raise InvalidArgument(key, f"must be at most {limit} characters")
    return value


def boolean(body: dict, key: str) -> bool:
    """``body[key]`` as true or false; false when absent or null."""
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidArgument(key, f"must be true or false, got {json.dumps(value)}")
    return value


def int_list(body: dict, key: str, limit: int, what: str, setting: str) -> list[int]:
    """``body[key]`` as a list of integers; [] when absent or null. Its length is checked first, against
    the domain's cap (``limit`` ``what``, the server setting ``setting``) in the domain's words."""
    value = body.get(key)
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidArgument(key, f"must be a list of integers, got {json.dumps(value)[:80]}")
    check_count(len(value), limit, key, what, setting)
    return [integer({"v": v}, "v", field=f"{key}[{i}]") for i, v in enumerate(value)]


def _stats(body: dict, key: str) -> tuple[int | None, int]:
    """(samples or None for the default, first seed) of a statistics object ``{samples, seed_start}``."""
    value = body.get(key) or {}
    if not isinstance(value, dict):
        raise InvalidArgument(key, "must be an object {samples, seed_start}")
    unknown = set(value) - {"samples", "seed_start"}
    if unknown:
        raise InvalidArgument(key, f"unknown fields {sorted(unknown)}")
    return (integer(value, "samples", None, field=f"{key}.samples") or None,
            integer(value, "seed_start", 0, field=f"{key}.seed_start"))


def target(body: dict) -> tuple[str, int]:
    """(model, version number) a body's ``model`` and ``version`` name."""
    return string(body, "model", required=True, limit=128), required_int(body, "version", lo=1)


def _ref(body: dict) -> str:
    """The version a body names, as a reference (``model/N``)."""
    model, number = target(body)
    return f"{model}/{number}"


def _options(body: dict, keys: Iterable[str]) -> dict[str, float]:
    return {k: v for k in keys if (v := number(body, k)) is not None}


def _regions(limits: Limits, items: list, field: str) -> list[Region]:
    """Regions of JSON items, each mask's size checked before it is inflated."""
    for i, r in enumerate(items):
        check_region_json(limits, r, f"{field}[{i}]")
    return [Region.from_spec(r, f"{field}[{i}]") for i, r in enumerate(items)]


# ---- paths -----------------------------------------------------------------------------------

def path_version(model: str, version: str) -> str:
    """The reference of a path's model and version number (``model/N``)."""
    if not version.isdigit() or not 1 <= int(version) <= MAX_INT64:
        raise InvalidArgument("version", f"must be a version number, got {version!r}")
    return f"{model}/{int(version)}"


def sample_request(model: str, version: str, seed: str, query: dict[str, list[str]]) -> SampleRequest:
    """``GET .../images/{seed}.png?layer=&ablate=u,v&strength=s``: one image, units zeroed and the
    version's own edit at another strength if asked."""
    ref = path_version(model, version)
    if not seed.isdigit() or int(seed) > MAX_INT64:
        raise InvalidArgument("seed", f"must be an integer in [0, 2**63), got {seed!r}")
    layer = (query.get("layer") or [""])[-1] or None
    ablate = (query.get("ablate") or [""])[-1]
    interventions = []
    if ablate:
        try:
            interventions = [Intervention(units=[int(u) for u in ablate.split(",")])]
        except ValueError:
            raise InvalidArgument("ablate", f"must be unit numbers separated by commas, got {ablate!r}") from None
    return SampleRequest(ref, seeds=[int(seed)], layer=layer, interventions=interventions,
                         strength=_query_number(query, "strength"))


def _query_number(query: dict[str, list[str]], name: str) -> float | None:
    """A number in the query (None if absent); its bounds are the domain's to check."""
    raw = (query.get(name) or [""])[-1]
    if not raw:
        return None
    try:
        return float(raw)
    except ValueError:
        raise InvalidArgument(name, f"must be a number, got {raw!r}") from None


# ---- bodies ----------------------------------------------------------------------------------

def _seeds(body: dict, limits: Limits) -> range | list[int]:
    """A search's candidates: ``seeds`` (a list) or ``seed_range`` ([first, end)), exactly one."""
    if (body.get("seeds") is None) == (body.get("seed_range") is None):
        raise InvalidArgument("seeds", "give exactly one of seeds and seed_range")
    if body.get("seed_range") is None:
        return int_list(body, "seeds", limits.max_search_seeds, "candidate seeds", "max_search_seeds")
    span = body["seed_range"]
    if not isinstance(span, list) or len(span) != 2 or any(isinstance(x, bool) or not isinstance(x, int) for x in span):
        raise InvalidArgument("seed_range", "must be [first, end) as two integers")
    if not 0 <= span[0] < span[1] <= MAX_INT64:
        raise InvalidArgument("seed_range", f"needs 0 <= first < end, got {span}")
    return range(span[0], span[1])


def search_request(body: dict, limits: Limits) -> SearchRequest:
    """``POST /api/search``."""
    only(body, ("model", "version", "layer", "context", "seeds", "seed_range", "rank", "top", "quantile",
                "truncation", "ridge", "stats"))
    ref, context = _ref(body), body.get("context")
    if not isinstance(context, list) or not context:
        raise InvalidArgument("context", "give a list of at least one region")
    check_count(len(context), limits.max_regions, "context", "regions", "max_regions")   # before any mask is inflated
    regions = _regions(limits, context, "context")
    seeds = _seeds(body, limits)
    samples, seed_start = _stats(body, "stats")
    options = _options(body, ("quantile", "truncation", "ridge"))
    return SearchRequest(ref, regions, seeds, layer=string(body, "layer") or None, rank=integer(body, "rank", 1),
                         top=integer(body, "top", 16), samples=samples, seed_start=seed_start, **options)


def dissect_request(body: dict, limits: Limits) -> DissectRequest:
    """``POST /api/dissect``: one region's units, with their maps."""
    only(body, ("model", "version", "layer", "region", "top", "rank_by", "quantile", "truncation", "thresholds"))
    ref = _ref(body)
    if body.get("region") is None:
        raise InvalidArgument("region", "is required (seed and mask or box)")
    check_region_json(limits, body["region"], "region")
    region = Region.from_spec(body["region"], "region")
    samples, seed_start = _stats(body, "thresholds")
    options = _options(body, ("quantile", "truncation"))
    return DissectRequest(ref, [region], layer=string(body, "layer") or None, rank_by=string(body, "rank_by", "iou"),
                          top=integer(body, "top", 8), samples=samples, seed_start=seed_start, include_maps=True,
                          **options)


def alias_request(model: str, alias: str, body: dict, author: str) -> AliasRequest:
    """``PUT .../aliases/{alias}``: a move under ``expected_version`` (null or 0: a new alias) or ``etag``."""
    only(body, ("version", "expected_version", "etag", "reason"))
    if "etag" in body and "expected_version" in body:
        raise InvalidArgument("etag", "give expected_version or etag, not both")
    if "etag" in body:
        expectation: dict[str, Any] = {"etag": string(body, "etag", required=True)}
    elif "expected_version" in body:
        expectation = {"expected_version": integer(body, "expected_version", 0) or 0}
    else:
        raise InvalidArgument("expected_version", "state expected_version (null or 0 for a new alias) or etag")
    return AliasRequest(model, alias, required_int(body, "version"), reason=string(body, "reason", limit=1000),
                        author=author, **expectation)


def rollback_args(body: dict) -> dict[str, Any]:
    """``POST .../aliases/{alias}/rollback``: ``Domain.rollback_alias``'s etag and reason."""
    only(body, ("etag", "reason"))
    return {"etag": string(body, "etag") or None, "reason": string(body, "reason", limit=1000)}
