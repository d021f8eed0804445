"""Protobuf messages to and from the domain's values; nothing here calls the registry or the engine.

- Names: ``model_name``, ``version_name``, ``parse_model``, ``parse_version``, ``parse_alias``.
- Resources: ``model_pb``, ``version_pb``, ``alias_pb``, ``alias_move_pb``, ``layer_pb``.
- Requests: ``sample_request``, ``search_request``, ``dissect_request``, ``statistics_request``,
  ``rewrite_request``: a message as the domain's typed request (``domain/requests.py``), which
  the domain checks; only what the wire format itself can get wrong is refused here.
  ``rewrite_request_json``: the HTTP side's rewrite body, read as the JSON form of a RewriteRequest.
- Guards before decoding: ``check_masks`` (every mask's declared size), ``check_dissect``,
  ``check_search`` (region counts, then masks); the bounds are the domain's (``domain/limits.py``).
- Edits: ``edit_draft`` (an EditSpec as the domain's ``EditDraft``, masks decoded once),
  ``spec_pb`` (a recorded spec's JSON as an EditSpec), ``region``, ``regions``.
- Generator: ``latents_tensor``, ``interventions``, ``image_format``, ``images_pb``,
  ``progress_stage``, ``progress_pb``, ``layers_pb``, ``rewrite_result_pb``,
  ``export_stream``, ``dissect_pb``, ``search_pb``, ``statistics_result_pb``.
- Aliases: ``alias_request`` (SetAlias).
- Import: ``import_upload`` (the client stream: metadata, then chunks, checked for size and
  sha256; ``ImportTooLarge`` → RESOURCE_EXHAUSTED), ``import_args``, ``import_pb``.

Conversion errors are engine ``InvalidArgument``s naming the field as the request spells it.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch
from google.protobuf import json_format, struct_pb2, timestamp_pb2
from google.protobuf.message import Message

from rulewright.service.domain.core import KEY_MOMENT, VALUE_QUANTILE, _json_metrics
from rulewright.service.errors import InvalidArgument
from rulewright.service.errors import Code, Error
from rulewright.service.domain.limits import check_count, check_images, check_mask_pixels, check_spec_regions
from rulewright.service.domain.requests import (DEFAULT_QUANTILE, AliasRequest, DissectRequest, DissectResult, EditDraft,
                                               Event, Intervention, LayersResult, ModelSummary, Region, RewriteRequest,
                                               RewriteResult, SampleRequest, SearchRequest, SearchResult,
                                               StatisticResult, StatisticsRequest, VersionRef, decode_pixels, png_bytes,
                                               upgrade_json)
from rulewright.v1 import edit_pb2, generator_service_pb2 as gen, images_pb2, registry_service_pb2 as reg
from rulewright.v1 import resources_pb2
from rulewright.service.domain.json_fields import check_json

_MODEL = re.compile(r"^models/([^/]+)$")
_VERSION = re.compile(r"^models/([^/]+)/versions/([^/]+)$")
_ALIAS = re.compile(r"^models/([^/]+)/aliases/([^/]+)$")
EXPORT_CHUNK = 1 << 20


# ---- names -----------------------------------------------------------------------------------

def model_name(model: str) -> str:
    return f"models/{model}"


def version_name(version) -> str:
    return f"models/{version.model}/versions/{version.number}"


def _match(pattern: re.Pattern, name: str, field: str, shape: str) -> tuple[str, ...]:
    m = pattern.match(name)
    if not m:
        raise InvalidArgument(field, f"must be {shape}, got {name!r}")
    return m.groups()


def parse_model(name: str, field: str = "name") -> str:
    return _match(_MODEL, name, field, "models/{model}")[0]


def parse_version(name: str, field: str = "name") -> tuple[str, int]:
    model, number = _match(_VERSION, name, field, "models/{model}/versions/{version}")
    if not number.isdigit():
        raise InvalidArgument(field, f"version must be a positive number, got {number!r}")
    return model, int(number)


def parse_alias(name: str, field: str = "name") -> tuple[str, str]:
    return _match(_ALIAS, name, field, "models/{model}/aliases/{alias}")


# ---- resources -------------------------------------------------------------------------------

def _time(t) -> timestamp_pb2.Timestamp:
    ts = timestamp_pb2.Timestamp()
    ts.FromDatetime(t)
    return ts


def _struct(d: dict | None) -> struct_pb2.Struct:
    s = struct_pb2.Struct()
    s.update(_json_metrics(d or {}))
    return s


def alias_pb(state) -> resources_pb2.Alias:
    return resources_pb2.Alias(name=f"models/{state.model}/aliases/{state.alias}", version=state.version or 0,
                               etag=state.etag, update_time=_time(state.updated_at))


def alias_move_pb(entry) -> resources_pb2.AliasMove:
    return resources_pb2.AliasMove(seq=entry.seq, from_version=entry.from_version or 0,
                                   to_version=entry.to_version or 0, author=entry.author,
                                   move_time=_time(entry.time), reason=entry.reason,
                                   etag=entry.etag)


def model_pb(summary: ModelSummary) -> resources_pb2.Model:
    """A model with its aliases and newest version (0: none) as a message."""
    model = summary.model
    return resources_pb2.Model(
        name=model_name(model.name), arch=model.arch, config_json=json.dumps(model.config, sort_keys=True),
        description=model.description, author=model.author, create_time=_time(model.created_at),
        aliases=[alias_pb(a) for a in summary.aliases], latest_version=summary.latest or 0)


def _adapter_pb(origin: dict | None) -> resources_pb2.AdapterOrigin | None:
    """Where an edit imported from an adapter came from (None for every other version)."""
    fields = resources_pb2.AdapterOrigin.DESCRIPTOR.fields_by_name
    return resources_pb2.AdapterOrigin(**{k: v for k, v in origin.items() if k in fields}) if origin else None


def version_pbs(versions, chains: list[list[int]]) -> list[resources_pb2.Version]:
    """Versions as messages with their lineages (root first; ``Domain.lineages``)."""
    out = []
    for v, chain in zip(versions, chains):
        kind = {"import": resources_pb2.Version.KIND_IMPORT, "edit": resources_pb2.Version.KIND_EDIT}[v.kind]
        origin = ({"spec": spec_pb(v.spec or {})} if v.kind == "edit"
                  else {"source_json": json.dumps(v.spec or {}, sort_keys=True)})
        out.append(resources_pb2.Version(
            name=version_name(v), number=v.number, parent_version=v.parent or 0, kind=kind, **origin,
            metrics=_struct(v.metrics), author=v.author, create_time=_time(v.created_at),
            blobs=[resources_pb2.Blob(role=r, sha256=b.sha256, size_bytes=b.size) for r, b in sorted(v.blobs.items())],
            lineage=chain, request_id=v.request_id or "", strength=v.edit_strength,
            rescaled_from=v.rescaled_from or 0, adapter=_adapter_pb(getattr(v, "adapter", None))))
    return out


def version_pb(v, chain: list[int]) -> resources_pb2.Version:
    """One version as a message with its lineage."""
    return version_pbs([v], [chain])[0]


def layer_pb(info) -> gen.LayerInfo:
    return gen.LayerInfo(name=info.name, key_shape=info.key_shape, value_shape=info.value_shape,
                         weight_shape=info.weight_shape, resolution=info.resolution, linear=info.linear,
                         weight_key=info.weight_key)


def layers_pb(result: LayersResult) -> gen.ListLayersResponse:
    """ListLayers' answer for a version's layers."""
    return gen.ListLayersResponse(version=version_name(result.version), layers=map(layer_pb, result.layers),
                                  default_layer=result.default_layer, image_resolution=result.resolution,
                                  z_dim=result.z_dim)


def export_stream(version, data: bytes) -> Iterator[reg.ExportVersionResponse]:
    """Metadata (``version`` as a message), then the safetensors file in chunks."""
    yield reg.ExportVersionResponse(metadata=reg.ExportMetadata(
        version=version, size_bytes=len(data), sha256=hashlib.sha256(data).hexdigest()))
    for i in range(0, len(data), EXPORT_CHUNK):
        yield reg.ExportVersionResponse(chunk=data[i:i + EXPORT_CHUNK])


# ---- images and latents ----------------------------------------------------------------------

def latents_tensor(msg: gen.Latents) -> torch.Tensor:
    if msg.count < 1 or msg.dim < 1:
        raise InvalidArgument("latents", f"count and dim must be positive, got {msg.count} x {msg.dim}")
    if len(msg.values) != msg.count * msg.dim:
        raise InvalidArgument("latents.values", f"holds {len(msg.values)} values, count x dim is "
                              f"{msg.count * msg.dim}")
    return torch.tensor(np.asarray(msg.values, dtype=np.float32)).reshape(msg.count, msg.dim)


def _mask(msg: images_pb2.Mask, field: str) -> torch.Tensor:
    """A Mask message's pixels (H, W) uint8, by the engine's one decoder; its size was checked first."""
    encoding = images_pb2.Mask.Encoding.Name(msg.encoding) if msg.encoding in images_pb2.Mask.Encoding.values() else ""
    return decode_pixels(encoding, msg.width, msg.height, msg.data, field)


def _walk(msg: Message, path: str) -> Iterator[tuple[str, Message]]:
    """Every sub-message of ``msg`` with its path as the request spells it (``context[1].mask``)."""
    for fd, value in msg.ListFields():
        if fd.message_type is None or fd.message_type.GetOptions().map_entry:
            continue
        name = f"{path}.{fd.name}" if path else fd.name
        if fd.is_repeated:
            for i, item in enumerate(value):
                yield f"{name}[{i}]", item
                yield from _walk(item, f"{name}[{i}]")
        else:
            yield name, value
            yield from _walk(value, name)


def check_masks(limits, msg: Message) -> None:
    """Every mask in ``msg``: width x height at most ``max_mask_pixels``, before any is decoded."""
    for path, sub in _walk(msg, ""):
        if isinstance(sub, images_pb2.Mask):
            check_mask_pixels(limits, path, sub.width, sub.height)


def check_dissect(limits, request: gen.DissectRequest) -> None:
    """DissectRequest: how many regions, and their masks, before anything is decoded."""
    check_count(len(request.regions), limits.max_regions, "regions", "regions", "max_regions")
    check_masks(limits, request)


def check_search(limits, request: gen.SearchContextRequest) -> None:
    """SearchContextRequest: how many context regions, and their masks, before anything is decoded."""
    check_count(len(request.context), limits.max_regions, "context", "regions", "max_regions")
    check_masks(limits, request)


def interventions(items: Sequence[gen.UnitIntervention]) -> tuple[str | None, list[Intervention]]:
    """(layer, interventions); this version drives one layer per request."""
    layers = {i.layer for i in items}
    if len(layers) > 1:
        raise InvalidArgument("interventions", "all interventions must name the same layer")
    out = []
    for n, i in enumerate(items):
        mode = "set" if i.mode == gen.UnitIntervention.MODE_SET else "zero"
        mask = _mask(i.mask, f"interventions[{n}].mask") if i.HasField("mask") else None
        out.append(Intervention(units=list(i.units), mode=mode, value=i.value, mask=mask))
    return (layers.pop() or None) if layers else None, out


def image_format(value: int, field: str = "image_format") -> int:
    """An ImageFormat as sent (0: PNG); an unknown number (proto3 enums are open) is refused."""
    if value not in images_pb2.ImageFormat.values():
        raise InvalidArgument(field, f"unknown ImageFormat value {value}")
    return value


def _opt(msg, name: str, default: float) -> float:
    return getattr(msg, name) if msg.HasField(name) else default


def sample_request(request: gen.SampleRequest, limits) -> SampleRequest:
    """A SampleRequest message as the domain's request (truncation absent: 1).

    The count is checked first: latents' values are only read once their count is allowed.
    """
    if request.HasField("latents"):
        check_images(limits, request.latents.count, "latents.count")
    z = latents_tensor(request.latents) if request.HasField("latents") else None
    layer, units = interventions(request.interventions)
    return SampleRequest(request.model, seeds=list(request.seeds) or None, latents=z,
                         truncation=_opt(request, "truncation", 1.0), layer=layer, interventions=units,
                         strength=request.strength if request.HasField("strength") else None)


def images_pb(images: torch.Tensor, fmt: int, seeds: Sequence[int] | None = None) -> list[images_pb2.Image]:
    """(N, H, W, 3) uint8 → Image messages (PNG unless raw RGB8 is asked for)."""
    raw = fmt == images_pb2.IMAGE_FORMAT_RAW_RGB8
    out = []
    for n, img in enumerate(images.cpu().numpy()):
        if raw:
            data = img.tobytes()
        else:
            data = png_bytes(img)
        msg = images_pb2.Image(format=images_pb2.IMAGE_FORMAT_RAW_RGB8 if raw else images_pb2.IMAGE_FORMAT_PNG,
                               width=img.shape[1], height=img.shape[0], data=data)
        if seeds:
            msg.seed = seeds[n]
        out.append(msg)
    return out


# ---- edits -----------------------------------------------------------------------------------

def region(msg: images_pb2.Region, field: str) -> Region:
    """An engine Region for a Region message, its mask decoded (validated later by the engine)."""
    mask = _mask(msg.mask, f"{field}.mask") if msg.HasField("mask") else None
    return Region(seed=msg.seed, mask=mask, box=tuple(msg.box) if msg.box else None)


def _present(msg: Message, names: Sequence[str]) -> dict:
    """The fields of ``msg`` that are set: present where the field tracks presence, else nonzero."""
    return {k: getattr(msg, k) for k in names
            if (msg.HasField(k) if msg.DESCRIPTOR.fields_by_name[k].has_presence else getattr(msg, k))}


_SETTINGS = ("op", "method", "goal", "solver", "factors", "quality", "layer", "rank", "steps", "lr", "ridge",
             "truncation", "strength", "description", "name", "model")
_PARTS = {"keep": ("weight", "pool_start", "pool_size", "per_step", "seed"), "stats": ("samples", "seed_start"),
          "erase": ("units",), "search": ("targets", "candidates", "seed_start"), "fit": ("batch", "feather", "edges")}


def edit_draft(msg: edit_pb2.EditSpec, field: str = "spec") -> EditDraft:
    """The domain's parsed spec for an EditSpec message, its masks decoded once: zero and absent
    fields are left to the defaults (a ``fit`` that is present, even empty, counts as given)."""
    settings = _present(msg, _SETTINGS)
    if msg.layers:
        settings["layers"] = list(msg.layers)
    for key, names in _PARTS.items():
        part = _present(getattr(msg, key), names)
        if part or (key == "fit" and msg.HasField("fit")):
            settings[key] = part
    lists = {key: tuple(region(r, f"{field}.{key}[{i}]") for i, r in enumerate(getattr(msg, key)))
             for key in ("paste", "context", "found")}
    return EditDraft(settings, copy=region(msg.copy, f"{field}.copy") if msg.HasField("copy") else None,
                     paste=lists["paste"], context=lists["context"],
                     found=lists["found"] if msg.found or msg.found_given else None)


def spec_pb(spec: dict) -> edit_pb2.EditSpec:
    """A spec's JSON form (what a version records, any release's) as an EditSpec message."""
    return json_format.ParseDict(upgrade_json(spec), edit_pb2.EditSpec())


def rewrite_request(request: gen.RewriteRequest, author: str, limits, model: str | VersionRef | None = None
                    ) -> RewriteRequest:
    """A RewriteRequest message as the domain's request: its regions counted and masks sized
    before any is decoded, then each decoded once. ``model``: the parent, when the transport
    holds it apart (a ``VersionRef``)."""
    spec = request.spec
    check_spec_regions(limits, {key: len(getattr(spec, key)) for key in ("paste", "context", "found")},
                       spec.HasField("copy"))
    check_masks(limits, request)
    image_format(request.preview_format, "preview_format")
    return RewriteRequest(request.model if model is None else model, edit_draft(spec), author=author,
                          request_id=request.request_id or None, dry_run=request.dry_run,
                          preview_seeds=list(request.preview_seeds))


_PARSE_AT = re.compile(r'at "RewriteRequest\.([\w.\[\]]+)"')


def rewrite_request_json(body: Any, author: str, limits) -> RewriteRequest:
    """The HTTP side's rewrite body (``{"model", "version", "spec", "request_id", "dry_run",
    "preview_seeds"}``, the spec as ``examples/edits/*.json``) as the domain's request: the JSON form
    of a RewriteRequest (``version`` apart), read as gRPC reads it."""
    if not isinstance(body, dict):
        raise InvalidArgument("body", "must be a JSON object")
    version = body.get("version")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise InvalidArgument("version", f"is required: a version number of at least 1, got {json.dumps(version)}")
    if body.get("spec") is None:
        raise InvalidArgument("spec", "is required (an edit spec, as examples/edits/*.json)")
    message = {k: v for k, v in body.items() if k != "version"}
    if isinstance(message["spec"], dict):
        message["spec"] = upgrade_json(message["spec"])
    check_json(gen.RewriteRequest.DESCRIPTOR, message)     # a wrong type or key named by its path
    try:
        request = json_format.ParseDict(message, gen.RewriteRequest())
    except json_format.ParseError as exc:
        at = _PARSE_AT.search(str(exc))
        raise InvalidArgument(at.group(1) if at else "body", str(exc)) from None
    if not request.model:
        raise InvalidArgument("model", "is required")
    return rewrite_request(request, author, limits, VersionRef(request.model, version))


# The stages the API streams (every transport): engine stage → API stage; others are not streamed.
_STAGES = {"statistics": "statistics", "optimize": "optimize", "full_rank": "optimize", "finetune": "optimize",
           "preview": "preview", "commit": "commit"}


def progress_stage(event: Event) -> str | None:
    """The API's name for an event's stage (``statistics``, ``optimize``, ...); None: not streamed."""
    return _STAGES.get(event.stage)


def progress_pb(event: Event) -> gen.Progress | None:
    """A progress event as a Progress message; None for events the API does not stream."""
    stage = progress_stage(event)
    if stage is None:
        return None
    msg = gen.Progress(stage=gen.Progress.Stage.Value(f"STAGE_{stage.upper()}"), step=event.done, steps=event.total)
    if event.loss is not None:
        msg.loss = event.loss
    return msg


def rewrite_result_pb(result: RewriteResult, chain: list[int] | None) -> gen.RewriteResult:
    """Rewrite's result; ``chain`` is the new version's lineage (None for a dry run)."""
    out = gen.RewriteResult(parent=version_name(result.parent), spec=spec_pb(result.edit.spec),
                            metrics=_struct(result.edit.metrics), dry_run=result.version is None)
    if result.version is not None:
        out.version.CopyFrom(version_pb(result.version, chain or []))
    curve = (result.edit.metrics or {}).get("strength_curve")
    if curve:
        json_format.ParseDict(curve, out.strength_curve)
    return out


def empty():
    from google.protobuf import empty_pb2

    return empty_pb2.Empty()


def alias_request(request: reg.SetAliasRequest, model: str, alias: str, author: str) -> AliasRequest:
    """A SetAliasRequest as the domain's request (version 0 unsets the alias)."""
    which = request.WhichOneof("expectation")
    if which is None:
        raise InvalidArgument("expectation", "state expected_version (0 for a new alias) or etag")
    return AliasRequest(model, alias, request.version, expected_version=request.expected_version
                        if which == "expected_version" else None, etag=request.etag if which == "etag" else None,
                        reason=request.reason, author=author)


# ---- dissection, search, statistics ----------------------------------------------------------

def regions(items: Sequence[images_pb2.Region], field: str) -> list[Region]:
    """Engine regions (validated later by the engine, which names ``{field}[i]...``)."""
    return [region(r, f"{field}[{i}]") for i, r in enumerate(items)]


def dissect_request(request: gen.DissectRequest) -> DissectRequest:
    """A DissectRequest message as the domain's request (zero and absent fields: the defaults)."""
    return DissectRequest(request.model, regions(request.regions, "regions"), layer=request.layer or None,
                          rank_by="contrast" if request.rank_by == gen.DissectRequest.RANK_BY_CONTRAST else "iou",
                          top=request.top, samples=request.thresholds.samples or None,
                          seed_start=request.thresholds.seed_start, quantile=_opt(request, "quantile", DEFAULT_QUANTILE),
                          truncation=_opt(request, "truncation", 1.0), include_maps=request.include_maps)


def dissect_pb(result: DissectResult) -> gen.DissectResponse:
    thr = result.thresholds.tolist()
    return gen.DissectResponse(
        version=version_name(result.version), layer=result.layer,
        units=[gen.UnitScore(unit=u.unit, iou=u.iou, inside=u.inside, outside=u.outside, contrast=u.contrast,
                             threshold=thr[u.unit]) for u in result.units],
        maps=[gen.UnitMap(unit=unit, seed=seed, width=m.shape[1], height=m.shape[0], values=m.reshape(-1).tolist())
              for unit, seed, m in result.maps])


def search_request(request: gen.SearchContextRequest) -> SearchRequest:
    """A SearchContextRequest message as the domain's request (zero and absent fields: the defaults)."""
    if bool(request.seeds) == request.HasField("seed_range"):
        raise InvalidArgument("seeds", "give exactly one of seeds and seed_range")
    if request.HasField("seed_range"):
        r = request.seed_range
        if r.count < 1 or r.start < 0:
            raise InvalidArgument("seed_range", f"needs start >= 0 and count >= 1, got {r.start}, {r.count}")
        seeds: range | list[int] = range(r.start, r.start + r.count)
    else:
        seeds = list(request.seeds)
    return SearchRequest(request.model, regions(request.context, "context"), seeds, layer=request.layer or None,
                         rank=request.rank or 1, top=request.top or 16, quantile=_opt(request, "quantile", 0.999),
                         truncation=_opt(request, "truncation", 1.0), ridge=_opt(request, "ridge", 1e-4),
                         samples=request.stats.samples or None, seed_start=request.stats.seed_start)


def search_pb(result: SearchResult, include_maps: bool) -> gen.SearchContextResponse:
    """SearchContext's answer; the response maps only when asked for."""
    return gen.SearchContextResponse(version=version_name(result.version), layer=result.layer,
                                     threshold=result.threshold, matches=[
        gen.ContextMatch(seed=m.seed, score=m.score, above=m.above, width=m.response.shape[1],
                         height=m.response.shape[0],
                         response=m.response.reshape(-1).tolist() if include_maps else ())
        for m in result.matches])


_STATISTICS = {gen.STATISTIC_UNSPECIFIED: KEY_MOMENT, gen.STATISTIC_KEY_MOMENT: KEY_MOMENT,
               gen.STATISTIC_VALUE_QUANTILES: VALUE_QUANTILE}


def statistics_request(request: gen.ComputeStatisticsRequest) -> StatisticsRequest:
    """A ComputeStatisticsRequest message as the domain's request (zero and absent fields: the defaults)."""
    if request.statistic not in _STATISTICS:
        raise InvalidArgument("statistic", f"unknown statistic {request.statistic}")
    return StatisticsRequest(request.model, layer=request.layer or None, kind=_STATISTICS[request.statistic],
                             samples=request.stats.samples or None, seed_start=request.stats.seed_start,
                             truncation=_opt(request, "truncation", 1.0))


def statistics_result_pb(result: StatisticResult) -> gen.StatisticsResult:
    kind = {KEY_MOMENT: gen.STATISTIC_KEY_MOMENT, VALUE_QUANTILE: gen.STATISTIC_VALUE_QUANTILES}[result.kind]
    return gen.StatisticsResult(
        version=version_name(result.version), layer=result.layer, statistic=kind,
        stats=edit_pb2.StatisticsSpec(samples=result.samples, seed_start=result.seed_start), cached=result.cached,
        cache_key=result.key.digest(), size_bytes=result.size_bytes)


# ---- import ----------------------------------------------------------------------------------

class ImportTooLarge(Error):
    """An upload over the server's size limit (→ RESOURCE_EXHAUSTED, reason IMPORT_TOO_LARGE)."""

    code = Code.RESOURCE_EXHAUSTED
    reason = "IMPORT_TOO_LARGE"

    def __init__(self, message: str, field: str = "", **metadata):
        super().__init__(message, field=field, **metadata)


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


def import_upload(requests: Iterable[reg.ImportModelRequest], max_bytes: int) -> tuple[reg.ImportModelMetadata, bytes]:
    """(metadata, weights) from an ImportModel stream, refused as soon as a limit is passed."""
    stream = iter(requests)
    first = next(stream, None)
    if first is None or first.WhichOneof("content") != "metadata":
        raise InvalidArgument("metadata", "the first message must carry the metadata")
    meta = first.metadata
    if meta.size_bytes < 0:
        raise InvalidArgument("metadata.size_bytes", f"must not be negative, got {meta.size_bytes}")
    if meta.size_bytes > max_bytes:
        raise ImportTooLarge(f"declared size {meta.size_bytes} bytes is over the limit of {max_bytes}",
                             limit=max_bytes, size_bytes=meta.size_bytes, field="metadata.size_bytes")
    if meta.sha256 and not _SHA256.match(meta.sha256):
        raise InvalidArgument("metadata.sha256", "must be 64 lowercase hex digits")
    data, digest = bytearray(), hashlib.sha256()
    for msg in stream:
        if msg.WhichOneof("content") != "chunk":
            raise InvalidArgument("metadata", "only the first message may carry metadata")
        data += msg.chunk
        digest.update(msg.chunk)
        if len(data) > max_bytes:
            raise ImportTooLarge(f"upload passed the limit of {max_bytes} bytes", limit=max_bytes, field="chunk")
        if meta.size_bytes and len(data) > meta.size_bytes:
            raise InvalidArgument("metadata.size_bytes", f"declared {meta.size_bytes} bytes, received more")
    if not data:
        raise InvalidArgument("chunk", "no weights were sent after the metadata")
    if meta.size_bytes and len(data) != meta.size_bytes:
        raise InvalidArgument("metadata.size_bytes", f"declared {meta.size_bytes} bytes, received {len(data)}")
    if meta.sha256 and digest.hexdigest() != meta.sha256:
        raise InvalidArgument("metadata.sha256", f"declared {meta.sha256}, the weights hash to {digest.hexdigest()}")
    return meta, bytes(data)


def _json_object(text: str, field: str) -> dict | None:
    if not text:
        return None
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise InvalidArgument(field, f"not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise InvalidArgument(field, f"must be a JSON object, got {type(value).__name__}")
    return value


def import_args(meta: reg.ImportModelMetadata) -> dict:
    """Keyword arguments of ``Domain.import_model`` for the metadata (the weights apart)."""
    if not meta.model_id:
        raise InvalidArgument("metadata.model_id", "required")
    if not meta.arch:
        raise InvalidArgument("metadata.arch", "required (dcgan, progan or stylegan2)")
    return {"name": meta.model_id, "arch": meta.arch, "config": _json_object(meta.config_json, "metadata.config_json"),
            "description": meta.description, "spec": _json_object(meta.spec_json, "metadata.spec_json"),
            "metrics": json_format.MessageToDict(meta.metrics) if meta.HasField("metrics") else None,
            "request_id": meta.request_id or None}


# Engine and registry fields of an import, as the request spells them.
IMPORT_FIELDS = {"weights": "chunk", "arch": "metadata.arch", "config": "metadata.config_json",
                 "spec": "metadata.spec_json", "metrics": "metadata.metrics", "request_id": "metadata.request_id",
                 "model": "metadata.model_id", "name": "metadata.model_id"}


def import_pb(summary: ModelSummary, version) -> reg.ImportModelResponse:
    """ImportModel's answer: the new model and its version 1."""
    return reg.ImportModelResponse(model=model_pb(summary), version=version_pb(version, [version.number]))
