"""What the client returns: plain dataclasses, built from the API's messages (``from_pb``)."""

from __future__ import annotations

import datetime as dt
import io
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from google.protobuf import json_format
from PIL import Image

from rulewright.client.images import grid
from rulewright.client.spec import spec_dict
from rulewright.v1 import generator_service_pb2 as gen
from rulewright.v1 import images_pb2, jobs_service_pb2 as jobs_pb, registry_service_pb2 as reg, resources_pb2

__all__ = [
    "SampledImage", "SampledImages", "Layer", "Layers", "UnitScore", "UnitMap", "Dissection", "ContextMatch", "ContextSearch",
    "Progress", "Preview", "RewriteResult", "StrengthCurve", "StrengthPoint", "StatisticsResult", "Model", "Version", "Alias", "AliasMove",
    "Export", "Import", "version_number",
]


def _time(ts) -> dt.datetime | None:
    return ts.ToDatetime(tzinfo=dt.timezone.utc) if ts.seconds or ts.nanos else None


def _struct(s) -> dict[str, Any]:
    return json_format.MessageToDict(s) if s is not None else {}


def _json(text: str) -> dict[str, Any]:
    return json.loads(text) if text else {}


def version_number(name: str) -> int:
    """The number at the end of ``models/{model}/versions/{n}``."""
    return int(name.rsplit("/", 1)[-1])


@dataclass(frozen=True)
class SampledImage:
    """One rendered image: ``seed`` (None for raw latents), the resolved ``version`` it came from,
    and its pixels as received (``format`` ``"png"`` or ``"raw"``: 8-bit RGB, row-major)."""

    seed: int | None
    version: str
    width: int
    height: int
    format: str
    data: bytes = field(repr=False)
    strength: float | None = None     # the strength of the version's own edit it was drawn at (None: an import)

    @classmethod
    def from_pb(cls, im: images_pb2.Image, version: str, strength: float | None = None) -> "SampledImage":
        """From the API's Image."""
        fmt = "raw" if im.format == images_pb2.IMAGE_FORMAT_RAW_RGB8 else "png"
        return cls(seed=im.seed if im.HasField("seed") else None, version=version, width=im.width,
                   height=im.height, format=fmt, data=im.data, strength=strength)

    @property
    def array(self) -> np.ndarray:
        """The pixels as a uint8 array (height, width, 3)."""
        if self.format == "raw":
            return np.frombuffer(self.data, dtype=np.uint8).reshape(self.height, self.width, 3)
        return np.asarray(self.image)

    @property
    def image(self) -> Image.Image:
        """The pixels as an RGB PIL image."""
        if self.format == "raw":
            return Image.fromarray(self.array, "RGB")
        return Image.open(io.BytesIO(self.data)).convert("RGB")

    @property
    def png(self) -> bytes:
        """The image as PNG bytes (the server's own bytes when it sent PNG)."""
        if self.format == "png":
            return self.data
        buf = io.BytesIO()
        self.image.save(buf, format="PNG")
        return buf.getvalue()

    def _repr_png_(self) -> bytes:
        """Jupyter shows the image itself."""
        return self.png


def _grid_png(images: list[SampledImage]) -> bytes | None:
    """A grid of ``images`` as PNG bytes (what Jupyter shows for a list of them); None when empty."""
    if not images:
        return None
    buf = io.BytesIO()
    grid(images).save(buf, format="PNG")
    return buf.getvalue()


class SampledImages(list):
    """The images of one call, in request order: a plain list of ``SampledImage`` that Jupyter
    shows as a grid (8 a row, enlarged 2x)."""

    def _repr_png_(self) -> bytes | None:
        """Jupyter shows the images as one grid."""
        return _grid_png(self)


@dataclass(frozen=True)
class Layer:
    """A rewritable layer: ``name`` (``main.6``), key/value/weight shapes, the key grid's
    ``resolution``, whether its value is ``linear`` in the weight, and its ``weight_key``."""

    name: str
    key_shape: tuple[int, ...]
    value_shape: tuple[int, ...]
    weight_shape: tuple[int, ...]
    resolution: int
    linear: bool
    weight_key: str


@dataclass(frozen=True)
class Layers:
    """A version's rewritable layers (input to output), its default layer, image size and z size."""

    version: str
    layers: list[Layer]
    default_layer: str
    image_resolution: int
    z_dim: int

    @classmethod
    def from_pb(cls, r: gen.ListLayersResponse) -> "Layers":
        """From ListLayersResponse."""
        return cls(version=r.version, default_layer=r.default_layer, image_resolution=r.image_resolution,
                   z_dim=r.z_dim, layers=[Layer(l.name, tuple(l.key_shape), tuple(l.value_shape),
                                                tuple(l.weight_shape), l.resolution, l.linear, l.weight_key)
                                          for l in r.layers])


@dataclass(frozen=True)
class UnitScore:
    """How well one unit matches the regions (soft ``iou``, mean activation ``inside`` and
    ``outside``, their difference ``contrast``, and the unit's ``threshold``)."""

    unit: int
    iou: float
    inside: float
    outside: float
    contrast: float
    threshold: float


@dataclass(frozen=True)
class UnitMap:
    """One unit's activation map on one seed: ``values`` is a float32 array (height, width)."""

    unit: int
    seed: int
    values: np.ndarray


@dataclass(frozen=True)
class Dissection:
    """The units of ``layer`` ranked against the regions, best first, with their maps if asked."""

    version: str
    layer: str
    units: list[UnitScore]
    maps: list[UnitMap]

    @classmethod
    def from_pb(cls, r: gen.DissectResponse) -> "Dissection":
        """From DissectResponse."""
        return cls(version=r.version, layer=r.layer,
                   units=[UnitScore(u.unit, u.iou, u.inside, u.outside, u.contrast, u.threshold) for u in r.units],
                   maps=[UnitMap(m.unit, m.seed, np.asarray(m.values, dtype=np.float32).reshape(m.height, m.width))
                         for m in r.maps])


@dataclass(frozen=True)
class ContextMatch:
    """One sample's response to a context direction: the strongest ``score``, the share of
    locations ``above`` the threshold, and the ``response`` map (height, width) if asked."""

    seed: int
    score: float
    above: float
    response: np.ndarray | None


@dataclass(frozen=True)
class ContextSearch:
    """Samples ranked by their response to the context regions' direction, strongest first."""

    version: str
    layer: str
    threshold: float
    matches: list[ContextMatch]

    @classmethod
    def from_pb(cls, r: gen.SearchContextResponse) -> "ContextSearch":
        """From SearchContextResponse."""
        return cls(version=r.version, layer=r.layer, threshold=r.threshold, matches=[
            ContextMatch(m.seed, m.score, m.above,
                         np.asarray(m.response, dtype=np.float32).reshape(m.height, m.width) if m.response else None)
            for m in r.matches])


_STAGES = {gen.Progress.STAGE_STATISTICS: "statistics", gen.Progress.STAGE_OPTIMIZE: "optimize",
           gen.Progress.STAGE_PREVIEW: "preview", gen.Progress.STAGE_COMMIT: "commit"}


@dataclass(frozen=True)
class Progress:
    """How far a long call is: ``stage`` (``statistics``, ``optimize``, ``preview``, ``commit``),
    ``step`` of ``steps`` units of work, and the current ``loss`` while optimizing."""

    stage: str
    step: int
    steps: int
    loss: float | None = None

    @classmethod
    def from_pb(cls, p: gen.Progress) -> "Progress":
        """From the API's Progress."""
        return cls(stage=_STAGES.get(p.stage, "unspecified"), step=p.step, steps=p.steps,
                   loss=p.loss if p.HasField("loss") else None)


@dataclass(frozen=True)
class Preview:
    """Images of the edited model (one per preview seed), rendered before the commit; Jupyter
    shows them as a grid."""

    images: list[SampledImage]

    def _repr_png_(self) -> bytes | None:
        """Jupyter shows the preview images as one grid."""
        return _grid_png(self.images)


@dataclass(frozen=True)
class Blob:
    """A blob a version added (``role`` ``weights`` or ``delta``), named by its sha256."""

    role: str
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class Version:
    """An immutable version: ``kind`` ``import`` or ``edit``, its ``parent_version`` (0 for an
    import), the replayable ``spec``, ``metrics``, ``author``, ``lineage`` (import first), its own
    edit's ``strength`` and ``rescaled_from`` (the source of a rescaled version; 0 otherwise)."""

    name: str
    model: str
    number: int
    parent_version: int
    kind: str
    spec: dict[str, Any]
    metrics: dict[str, Any]
    author: str
    create_time: dt.datetime | None
    lineage: list[int]
    request_id: str
    blobs: list[Blob] = field(default_factory=list)
    adapter: dict[str, Any] | None = None   # an edit imported from an adapter: where it came from
    strength: float | None = None      # its own edit's strength; None for an import
    rescaled_from: int = 0             # the version whose delta it applies at another strength; 0: fitted

    @classmethod
    def from_pb(cls, v: resources_pb2.Version) -> "Version":
        """From the API's Version."""
        kind = {resources_pb2.Version.KIND_IMPORT: "import", resources_pb2.Version.KIND_EDIT: "edit"}.get(v.kind, "")
        spec = spec_dict(v.spec) if v.WhichOneof("origin") == "spec" else _json(v.source_json)
        return cls(name=v.name, model=v.name.split("/")[1] if v.name.count("/") >= 3 else "", number=v.number,
                   parent_version=v.parent_version, kind=kind, spec=spec, metrics=_struct(v.metrics),
                   author=v.author, create_time=_time(v.create_time), lineage=list(v.lineage),
                   request_id=v.request_id, blobs=[Blob(b.role, b.sha256, b.size_bytes) for b in v.blobs],
                   adapter=_adapter(v.adapter) if v.HasField("adapter") else None,
                   strength=v.strength if v.HasField("strength") else None, rescaled_from=v.rescaled_from)


def _adapter(a: resources_pb2.AdapterOrigin) -> dict[str, Any]:
    """Where an adapter came from: ``source_version``, ``source_lineage``, ``base_fingerprint``, ``sha256``."""
    return {"source_version": a.source_version, "source_lineage": list(a.source_lineage),
            "base_fingerprint": a.base_fingerprint, "sha256": a.sha256}


@dataclass(frozen=True)
class StrengthPoint:
    """An edit measured at one strength: the share of the curve's faces it draws (``detected``),
    the pixel change outside its box (``side_effect``) and how much of it sits on the box's border."""

    strength: float
    detected: float
    side_effect: float
    box_edge: float


@dataclass(frozen=True)
class StrengthCurve:
    """An edit's strength curve, the strength its rule picks (``chosen``) and the rule in words."""

    points: list[StrengthPoint]
    chosen: float
    rule: str

    @classmethod
    def from_pb(cls, c: gen.StrengthCurve) -> "StrengthCurve":
        """From the API's StrengthCurve."""
        return cls(points=[StrengthPoint(p.strength, p.detected, p.side_effect, p.box_edge) for p in c.points],
                   chosen=c.chosen, rule=c.rule)


@dataclass(frozen=True)
class RewriteResult:
    """The outcome of a rewrite: the new ``version`` (None for a dry run), the ``parent`` it
    edited (a resource name), the complete ``spec`` that ran, the edit's ``metrics`` and its
    ``strength_curve`` (None for op zero)."""

    version: Version | None
    parent: str
    spec: dict[str, Any]
    metrics: dict[str, Any]
    dry_run: bool
    strength_curve: StrengthCurve | None = None

    @classmethod
    def from_pb(cls, r: gen.RewriteResult) -> "RewriteResult":
        """From the API's RewriteResult."""
        curve = StrengthCurve.from_pb(r.strength_curve) if r.HasField("strength_curve") else None
        return cls(version=Version.from_pb(r.version) if r.HasField("version") else None, parent=r.parent,
                   spec=spec_dict(r.spec), metrics=_struct(r.metrics), dry_run=r.dry_run, strength_curve=curve)


@dataclass(frozen=True)
class StatisticsResult:
    """A statistic now in the server's shared cache (``cached``: it was there already)."""

    version: str
    layer: str
    statistic: str
    samples: int
    seed_start: int
    cached: bool
    cache_key: str
    size_bytes: int

    @classmethod
    def from_pb(cls, r: gen.StatisticsResult) -> "StatisticsResult":
        """From the API's StatisticsResult."""
        kind = "value_quantiles" if r.statistic == gen.STATISTIC_VALUE_QUANTILES else "key_moment"
        return cls(version=r.version, layer=r.layer, statistic=kind, samples=r.stats.samples,
                   seed_start=r.stats.seed_start, cached=r.cached, cache_key=r.cache_key, size_bytes=r.size_bytes)


@dataclass(frozen=True)
class Alias:
    """A movable pointer: ``alias`` (``production``) of ``model`` at ``version``, with the
    ``etag`` of its current state (a compare-and-set states it)."""

    name: str
    model: str
    alias: str
    version: int
    etag: str
    update_time: dt.datetime | None

    @classmethod
    def from_pb(cls, a: resources_pb2.Alias) -> "Alias":
        """From the API's Alias."""
        parts = a.name.split("/")
        return cls(name=a.name, model=parts[1] if len(parts) > 1 else "", alias=parts[-1], version=a.version,
                   etag=a.etag, update_time=_time(a.update_time))


@dataclass(frozen=True)
class AliasMove:
    """One entry of an alias's history: ``from_version`` → ``to_version`` (0: unset), by whom,
    when and why, with the ``etag`` of the state it created."""

    seq: int
    from_version: int
    to_version: int
    author: str
    move_time: dt.datetime | None
    reason: str
    etag: str

    @classmethod
    def from_pb(cls, m: resources_pb2.AliasMove) -> "AliasMove":
        """From the API's AliasMove."""
        return cls(m.seq, m.from_version, m.to_version, m.author, _time(m.move_time), m.reason, m.etag)


@dataclass(frozen=True)
class Model:
    """A registered model: ``arch``, its ``config``, the ``aliases`` that are set (by alias name)
    and its newest version, ``latest_version`` (a bare reference means the server's default alias,
    ``production`` unless configured otherwise, not the newest)."""

    name: str
    id: str
    arch: str
    config: dict[str, Any]
    description: str
    author: str
    create_time: dt.datetime | None
    aliases: dict[str, Alias]
    latest_version: int

    @classmethod
    def from_pb(cls, m: resources_pb2.Model) -> "Model":
        """From the API's Model."""
        aliases = [Alias.from_pb(a) for a in m.aliases]
        return cls(name=m.name, id=m.name.split("/", 1)[-1], arch=m.arch, config=_json(m.config_json),
                   description=m.description, author=m.author, create_time=_time(m.create_time),
                   aliases={a.alias: a for a in aliases}, latest_version=m.latest_version)


@dataclass(frozen=True)
class Export:
    """A version's weights written to ``path`` (safetensors), ``size_bytes`` long, whose
    ``sha256`` matched what the server announced."""

    path: str
    version: Version
    size_bytes: int
    sha256: str


@dataclass(frozen=True)
class Import:
    """A model registered by ``import_model``, with its version 1."""

    model: Model
    version: Version

    @classmethod
    def from_pb(cls, r: reg.ImportModelResponse) -> "Import":
        """From ImportModelResponse."""
        return cls(Model.from_pb(r.model), Version.from_pb(r.version))


_JOB_STATES = {jobs_pb.DatasetJobMetadata.STATE_RUNNING: "running",
               jobs_pb.DatasetJobMetadata.STATE_SUCCEEDED: "succeeded",
               jobs_pb.DatasetJobMetadata.STATE_CANCELLED: "cancelled", jobs_pb.DatasetJobMetadata.STATE_FAILED: "failed"}


@dataclass(frozen=True)
class DatasetShard:
    """One WebDataset tar shard a dataset job wrote: where it is, its images and its sha256."""

    name: str
    uri: str
    samples: int
    first_seed: int
    sha256: str
    size_bytes: int


@dataclass(frozen=True)
class StatisticsJob:
    """A statistics job (a long-running operation): a layer's key moment over many samples, merged
    from shards into the server's statistics cache, where a Rewrite with the same ``stats`` finds it.

    ``name`` is the operation's name (``operations/{id}``); ``state`` as for a ``DatasetJob``.
    """

    name: str
    job: str
    version: str
    layer: str
    state: str
    done: bool
    shards_done: int
    shards_total: int
    samples_done: int
    samples_total: int
    seed_start: int = 0
    shard_size: int = 0
    cache_key: str = ""
    statistic_uri: str = ""
    sha256: str = ""
    error: str = ""
    error_code: int = 0

    @classmethod
    def from_operation(cls, op) -> "StatisticsJob":
        """From a google.longrunning.Operation whose metadata is a StatisticsJobMetadata."""
        meta, result, common = _operation(op, jobs_pb.StatisticsJobMetadata(), jobs_pb.StatisticsJob())
        return cls(**common, layer=meta.layer, samples_done=meta.samples_done, samples_total=meta.samples_total,
                   seed_start=result.stats.seed_start, shard_size=result.shard_size, cache_key=result.cache_key,
                   statistic_uri=result.statistic_uri, sha256=result.sha256)


@dataclass(frozen=True)
class DatasetJob:
    """A dataset job (a long-running operation): progress while it runs, shards and manifest once done.

    ``name`` is the operation's name (``operations/{id}``); ``state`` is ``running``,
    ``succeeded``, ``cancelled`` or ``failed`` (then ``error`` holds the server's message).
    """

    name: str
    job: str
    version: str
    state: str
    done: bool
    shards_done: int
    shards_total: int
    images_done: int
    images_total: int
    manifest_uri: str = ""
    shards: tuple[DatasetShard, ...] = ()
    error: str = ""
    error_code: int = 0
    output_uri: str = ""                # the output location the job was created with (once done); "": the registry's store

    @classmethod
    def from_operation(cls, op) -> "DatasetJob":
        """From a google.longrunning.Operation whose metadata is a DatasetJobMetadata."""
        meta, result, common = _operation(op, jobs_pb.DatasetJobMetadata(), jobs_pb.DatasetJob())
        shards = tuple(DatasetShard(s.name, s.uri, s.samples, s.first_seed, s.sha256, s.size_bytes)
                       for s in result.shards)
        return cls(**common, images_done=meta.images_done, images_total=meta.images_total,
                   manifest_uri=result.manifest_uri, shards=shards, output_uri=result.output_uri)


def _operation(op, meta, result) -> tuple[Any, Any, dict[str, Any]]:
    """A job's operation unpacked: (metadata, response, the fields every kind of job has)."""
    op.metadata.Unpack(meta)
    if op.HasField("response"):
        op.response.Unpack(result)
    failed = op.HasField("error")
    return meta, result, {"name": op.name, "job": meta.job, "version": meta.version,
                          "state": _JOB_STATES.get(meta.state, "unspecified"), "done": op.done,
                          "shards_done": meta.shards_done, "shards_total": meta.shards_total,
                          "error": op.error.message if failed else "", "error_code": op.error.code if failed else 0}
