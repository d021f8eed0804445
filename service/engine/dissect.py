"""Dissection: what the units of a layer draw, which units make a region, and switching them.

A unit is one output channel of a layer's value (for the DCGAN: a transposed convolution's
channel after its eval-mode BatchNorm, before the ReLU). Recipe::

    thr = unit_thresholds(model, "main.6", range(1000))              # cache it like C
    ranked = rank_units(model, "main.6", Region(seed=0, box=(22, 46, 46, 60)), thr)
    top = [r.unit for r in ranked[:10]]
    images = sample_with_interventions(model, [0], "main.6", [Intervention(top)])

- ``unit_maps(model, layer, seeds=..., z=...)``: the units' activation maps (N, units, H, W).
- ``unit_thresholds(model, layer, seeds, q=0.99)``: per-unit q-quantile over every location of
  every sample (or read from a precomputed ``Quantile``).
- ``upsample(maps, resolution)``: maps bilinearly resized to the image grid.
- ``unit_masks(maps, thresholds, resolution)``: maps upsampled (bilinear) to the image and
  thresholded: (N, units, R, R) bool.
- ``region_scores(maps, alphas, thresholds)``: per-unit soft IoU with soft masks and mean
  activation inside / outside them, as tensors.
- ``rank_units(model, layer, regions, thresholds, by="iou")``: ``UnitScore`` records (unit, iou,
  inside, outside, contrast), best first.
- ``class_iou(model, layer, seeds, segmenter, thresholds)``: (units, classes) IoU with the
  classes of a segmentation model (TorchScript: images → labels (N, R, R) or logits (N, C, R, R)).
- ``label_units(...)``: ``UnitLabel`` (unit, label, iou) per unit, best first.
- ``Intervention(units, mode="zero" | "set", value, mask)``: switch units off or to a value,
  everywhere or blended inside a soft mask at image resolution.
- ``intervene(model, layer, interventions)``: a context in which every pass applies them.
- ``sample_with_interventions(model, seeds, layer, interventions)``: images with them applied.

Scores. IoU is the *soft* (fuzzy Jaccard) IoU between a unit's binary mask ``u`` (its map,
bilinearly upsampled to the image, above the unit's threshold) and a region's soft alpha ``α``:
``Σ min(u, α) / Σ max(u, α)``, summed over all regions' pixels before dividing (as GAN
Dissection pools a unit's IoU over a data set). For a binary mask (a box) it is the ordinary
IoU. ``inside`` / ``outside`` are the means of the upsampled (unthresholded) map weighted by
``α`` and ``1 − α``; ``contrast = inside − outside``. ``rank_units`` sorts by IoU and breaks
ties — most often the many units with IoU 0, which never pass their threshold there — by contrast
(``by="iou"``), or by contrast then IoU (``by="contrast"``).

Validation raises ``InvalidArgument`` naming the field; an unknown layer raises ``LookupError``.
Every hook lives in a ``Trace`` and is removed on exit; nothing here changes a weight.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import operator
from typing import Iterator, Literal, Sequence

import torch
import torch.nn.functional as F

from rulewright.service.engine import nethook
from rulewright.service.engine.errors import InvalidArgument
from rulewright.service.engine.generators.base import Generator
from rulewright.service.engine.regions import Region, resample
from rulewright.service.engine.sampling import check_seeds, latents, sample
from rulewright.service.engine.stats import Quantile, value_quantiles

DEFAULT_QUANTILE = 0.99
_EPS = 1e-12


# ---------------------------------------------------------------------------------- validation


def _value_shape(model: Generator, layer: str) -> tuple[int, int, int]:
    """(units, H, W) of ``layer``'s value; ``LookupError`` for an unknown layer."""
    model.layer(layer)
    return next(info.value_shape for info in model.layer_infos() if info.name == layer)


def _seeds(seeds: Sequence[int], field: str = "seeds") -> list[int]:
    try:
        out = check_seeds(list(seeds))
    except ValueError as exc:
        raise InvalidArgument(field, str(exc)) from exc
    if not out:
        raise InvalidArgument(field, "must not be empty")
    return out


def _truncation(model: Generator, truncation: float) -> None:
    try:
        model.check_truncation(truncation)
    except ValueError as exc:
        raise InvalidArgument("truncation", str(exc)) from exc


def _latents(model: Generator, seeds: Sequence[int] | None, z: torch.Tensor | None) -> torch.Tensor:
    """Latents from exactly one of seeds or raw ``z`` (checked for shape and finiteness)."""
    if (seeds is None) == (z is None):
        raise InvalidArgument("seeds", "give exactly one of seeds or z")
    if z is None:
        return latents(_seeds(seeds), model.z_dim)
    if z.ndim != 2 or z.shape[1] != model.z_dim or z.shape[0] == 0:
        raise InvalidArgument("z", f"must have shape (N, {model.z_dim}) with N >= 1, got {tuple(z.shape)}")
    if not torch.isfinite(z).all():
        raise InvalidArgument("z", "latents must be finite (found NaN or infinity)")
    return z.float()


def _regions(regions: Region | Sequence[Region], resolution: int, field: str) -> list[Region]:
    regions = [regions] if isinstance(regions, Region) else list(regions)
    if not regions:
        raise InvalidArgument(field, "give at least one region")
    for i, region in enumerate(regions):
        if not isinstance(region, Region):
            raise InvalidArgument(f"{field}[{i}]", f"must be a Region, got {type(region).__name__}")
        region.validate(resolution, f"{field}[{i}]")
    return regions


def _device(model: Generator) -> torch.device:
    return next(model.parameters()).device


def _batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidArgument("batch_size", f"must be a positive integer, got {batch_size!r}")
    return batch_size


def _unit_index(u: object, units: int, field: str) -> int:
    """``u`` as an int in [0, units); ``InvalidArgument`` naming ``field`` otherwise."""
    try:
        index = operator.index(u) if not isinstance(u, bool) else None
    except TypeError:
        index = None
    if index is None or not 0 <= index < units:
        raise InvalidArgument(field, f"unit {u!r} out of range: the layer has units 0..{units - 1}")
    return index


# ------------------------------------------------------------------------- maps and thresholds


def unit_maps(
    model: Generator,
    layer: str,
    seeds: Sequence[int] | None = None,   # one map stack per seed
    z: torch.Tensor | None = None,        # or raw latents (N, z_dim); exactly one of seeds / z
    truncation: float = 1.0,
    batch_size: int = 32,                 # samples per forward pass (memory, not results)
) -> torch.Tensor:
    """The layer's values for each sample, (N, units, H, W) float32 on the CPU."""
    _value_shape(model, layer)
    z = _latents(model, seeds, z)
    _truncation(model, truncation)
    batch_size = _batch_size(batch_size)
    out = []
    with torch.no_grad():
        for start in range(0, z.shape[0], batch_size):
            chunk = z[start : start + batch_size].to(_device(model))
            out.append(nethook.latents_to_values(model, layer, chunk, truncation).float().cpu())
    return torch.cat(out)


def unit_thresholds(
    model: Generator,
    layer: str,
    seeds: Sequence[int] | None = None,   # samples for the statistic (ignored with ``quantiles``)
    q: float = DEFAULT_QUANTILE,          # the quantile a unit must exceed to count as "on"
    truncation: float = 1.0,
    batch_size: int = 32,
    quantiles: Quantile | None = None,    # a precomputed (cached) ``value_quantiles`` result
) -> torch.Tensor:
    """Per-unit q-quantile of the layer's values over every location of every sample, (units,)."""
    units = _value_shape(model, layer)[0]
    if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0 < q < 1:
        raise InvalidArgument("q", f"must lie strictly between 0 and 1, got {q!r}")
    if quantiles is None:
        if seeds is None:
            raise InvalidArgument("seeds", "give seeds (or a precomputed quantiles statistic)")
        _truncation(model, truncation)
        quantiles = value_quantiles(model, layer, _seeds(seeds), truncation, _batch_size(batch_size))
    if quantiles.units != units:
        raise InvalidArgument("quantiles", f"has {quantiles.units} units, layer {layer} has {units}")
    return quantiles.quantile(float(q))


def _thresholds(thresholds: torch.Tensor | Quantile, units: int, q: float = DEFAULT_QUANTILE) -> torch.Tensor:
    """Thresholds as a finite (units,) tensor; a ``Quantile`` is read at ``q``."""
    if isinstance(thresholds, Quantile):
        if thresholds.units != units:
            raise InvalidArgument("thresholds", f"has {thresholds.units} units, the layer has {units}")
        return thresholds.quantile(q)
    t = torch.as_tensor(thresholds, dtype=torch.float32)
    if t.shape != (units,):
        raise InvalidArgument("thresholds", f"must have shape ({units},) (one per unit), got {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise InvalidArgument("thresholds", "must be finite")
    return t


def upsample(maps: torch.Tensor, resolution: int) -> torch.Tensor:
    """(N, U, h, w) maps bilinearly resized to (N, U, R, R)."""
    if maps.shape[-1] == resolution and maps.shape[-2] == resolution:
        return maps.float()
    return F.interpolate(maps.float(), size=(resolution, resolution), mode="bilinear", align_corners=False)


def unit_masks(maps: torch.Tensor, thresholds: torch.Tensor, resolution: int) -> torch.Tensor:
    """Where each unit is on: upsampled maps above their unit's threshold, (N, U, R, R) bool."""
    return upsample(maps, resolution) > thresholds.to(maps.device, torch.float32)[None, :, None, None]


# -------------------------------------------------------------------------- ranking for regions


@dataclasses.dataclass(frozen=True)
class UnitScore:
    """How well one unit matches a region."""

    unit: int
    iou: float          # soft IoU of the thresholded, upsampled map with the region's alpha
    inside: float       # mean activation weighted by alpha
    outside: float      # mean activation weighted by 1 - alpha (0 if the region covers everything)
    contrast: float     # inside - outside

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return dataclasses.asdict(self)


def region_scores(
    maps: torch.Tensor, alphas: torch.Tensor, thresholds: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-unit ``iou``, ``inside``, ``outside``, ``contrast`` (each (U,)) for maps (N, U, h, w)
    and soft masks ``alphas`` (N, R, R), pooled over the N samples."""
    resolution = alphas.shape[-1]
    up = upsample(maps, resolution)                                   # (N, U, R, R)
    on = (up > thresholds.to(up.device, torch.float32)[None, :, None, None]).float()
    a = alphas.to(up.device, torch.float32)[:, None]                  # (N, 1, R, R)
    inter = torch.minimum(on, a).sum(dim=(0, 2, 3))
    union = torch.maximum(on, a).sum(dim=(0, 2, 3))
    inside = (up * a).sum(dim=(0, 2, 3)) / a.sum().clamp_min(_EPS)
    outside = (up * (1 - a)).sum(dim=(0, 2, 3)) / (1 - a).sum().clamp_min(_EPS)
    iou = inter / union.clamp_min(_EPS)
    return {"iou": iou, "inside": inside, "outside": outside, "contrast": inside - outside}


def rank_units(
    model: Generator,
    layer: str,
    regions: Region | Sequence[Region],   # one region, or several (on the same or other seeds)
    thresholds: torch.Tensor | Quantile,  # (units,) from ``unit_thresholds``, or the statistic
    by: Literal["iou", "contrast"] = "iou",
    truncation: float = 1.0,
    q: float = DEFAULT_QUANTILE,          # read from ``thresholds`` when it is a ``Quantile``
    field: str = "regions",               # the request field the regions came from
) -> list[UnitScore]:
    """Every unit of ``layer`` scored against the regions, best first (see the module docstring)."""
    units = _value_shape(model, layer)[0]
    if by not in ("iou", "contrast"):
        raise InvalidArgument("by", f"must be 'iou' or 'contrast', got {by!r}")
    regions = _regions(regions, model.resolution, field)
    thr = _thresholds(thresholds, units, q)
    maps = unit_maps(model, layer, seeds=[r.seed for r in regions], truncation=truncation)
    alphas = torch.stack([r.alpha(model.resolution) for r in regions])
    s = {k: v.tolist() for k, v in region_scores(maps, alphas, thr).items()}
    records = [UnitScore(u, s["iou"][u], s["inside"][u], s["outside"][u], s["contrast"][u]) for u in range(units)]
    first, second = ("iou", "contrast") if by == "iou" else ("contrast", "iou")
    return sorted(records, key=lambda r: (-getattr(r, first), -getattr(r, second), r.unit))


# ------------------------------------------------------------------- labels from a segmenter


@dataclasses.dataclass(frozen=True)
class UnitLabel:
    """The class a unit's "on" region overlaps best."""

    unit: int
    label: int          # class index of the segmentation model
    iou: float          # IoU of the unit's mask with that class's mask, pooled over the seeds

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return dataclasses.asdict(self)


def _class_map(segmenter: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Integer labels (N, R, R) from a segmenter's labels (N, h, w) or logits (N, C, h, w)."""
    n, _, r, _ = images.shape
    with torch.no_grad():
        out = segmenter(images)
    if not isinstance(out, torch.Tensor) or out.ndim not in (3, 4) or out.shape[0] != n:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise InvalidArgument("segmenter", f"must return labels (N, H, W) or logits (N, C, H, W) for N={n}, got {shape}")
    if out.ndim == 4:
        out = out.argmax(dim=1)
    elif out.is_floating_point():
        raise InvalidArgument("segmenter", f"labels (N, H, W) must be integers, got {out.dtype}")
    if out.shape[-2:] != (r, r):
        out = F.interpolate(out[:, None].float(), size=(r, r), mode="nearest")[:, 0]
    return out.long()


def class_iou(
    model: Generator,
    layer: str,
    seeds: Sequence[int],
    segmenter: torch.nn.Module,           # images (N, 3, R, R) in [-1, 1] → labels or logits
    thresholds: torch.Tensor | Quantile,
    truncation: float = 1.0,
    batch_size: int = 16,
    q: float = DEFAULT_QUANTILE,
) -> torch.Tensor:
    """(units, classes) IoU between each unit's thresholded upsampled map and each class's mask,
    pooled over the seeds. Negative labels mean "unlabelled" and count for no class."""
    units = _value_shape(model, layer)[0]
    seeds = _seeds(seeds)
    _truncation(model, truncation)
    thr = _thresholds(thresholds, units, q)
    inter = torch.zeros(units, 0, dtype=torch.float64)
    class_area = torch.zeros(0, dtype=torch.float64)
    unit_area = torch.zeros(units, dtype=torch.float64)
    batch_size = _batch_size(batch_size)
    for start in range(0, len(seeds), batch_size):
        z = latents(seeds[start : start + batch_size], model.z_dim).to(_device(model))
        with torch.no_grad(), nethook.Trace(model, layer, retain_key=False) as tr:
            images = model(z, truncation)
        labels = _class_map(segmenter, images.float().cpu())
        on = unit_masks(tr.value.float().cpu(), thr, model.resolution).flatten(2).float()   # (N, U, P)
        classes = max(int(labels.max()) + 1, inter.shape[1], 0)
        onehot = F.one_hot(labels.clamp_min(-1) + 1, classes + 1)[..., 1:].flatten(1, 2).float()  # (N, P, C)
        inter = F.pad(inter, (0, classes - inter.shape[1])) + torch.einsum("nup,npc->uc", on, onehot).double()
        class_area = F.pad(class_area, (0, classes - class_area.shape[0])) + onehot.sum(dim=(0, 1)).double()
        unit_area += on.sum(dim=(0, 2)).double()
    union = unit_area[:, None] + class_area[None, :] - inter
    return (inter / union.clamp_min(_EPS)).float()


def label_units(
    model: Generator,
    layer: str,
    seeds: Sequence[int],
    segmenter: torch.nn.Module,
    thresholds: torch.Tensor | Quantile,
    truncation: float = 1.0,
    batch_size: int = 16,
    q: float = DEFAULT_QUANTILE,
) -> list[UnitLabel]:
    """Each unit's best-matching class (highest IoU over the seeds), best-matching units first."""
    iou = class_iou(model, layer, seeds, segmenter, thresholds, truncation, batch_size, q)
    if iou.shape[1] == 0:
        raise InvalidArgument("segmenter", "labelled no pixel with a class (all labels negative)")
    best = iou.max(dim=1)
    records = [UnitLabel(u, int(best.indices[u]), float(best.values[u])) for u in range(iou.shape[0])]
    return sorted(records, key=lambda r: (-r.iou, r.unit))


# ------------------------------------------------------------------------------ interventions


@dataclasses.dataclass
class Intervention:
    """Drive some units of a layer to zero or to a value, everywhere or inside a soft mask.

    Inside the mask the chosen units become ``v·(1 − α) + target·α``; ``α`` is the mask
    resampled (area mean) to the layer's grid, or 1 everywhere when ``mask`` is None.
    """

    units: Sequence[int]                        # unit indices of the layer
    mode: Literal["zero", "set"] = "zero"       # "zero" ablates; "set" writes ``value``
    value: float = 0.0                          # the target for "set" (ignored for "zero")
    mask: torch.Tensor | None = None            # (R, R) at image resolution, uint8 or [0, 1]; None = everywhere

    def validate(self, units: int, resolution: int, field: str) -> None:
        """Raise ``InvalidArgument`` naming ``field`` unless this fits a layer of ``units`` units."""
        if isinstance(self.units, (str, bytes)) or not isinstance(self.units, Sequence) or not self.units:
            raise InvalidArgument(f"{field}.units", f"must be a non-empty list of unit indices, got {self.units!r}")
        for u in self.units:
            _unit_index(u, units, f"{field}.units")
        if self.mode not in ("zero", "set"):
            raise InvalidArgument(f"{field}.mode", f"must be 'zero' or 'set', got {self.mode!r}")
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)) or not math.isfinite(self.value):
            raise InvalidArgument(f"{field}.value", f"must be a finite number, got {self.value!r}")
        if self.mask is not None:
            # A Region with a placeholder seed checks the mask exactly as every other mask is checked.
            Region(seed=0, mask=self.mask).validate(resolution, field)

    def target(self) -> float:
        """The value the chosen units are driven to."""
        return 0.0 if self.mode == "zero" else float(self.value)

    def alpha(self, size: int) -> torch.Tensor | None:
        """The mask on the layer's (size, size) grid, or None for everywhere."""
        if self.mask is None:
            return None
        return resample(Region(seed=0, mask=self.mask).alpha(self.mask.shape[-1]), size)


def _apply(value: torch.Tensor, plan: list[tuple[torch.Tensor, float, torch.Tensor | None]]) -> torch.Tensor:
    """The value with each planned (unit indices, target, alpha) intervention blended in, in order."""
    out = value.clone()
    for idx, target, alpha in plan:
        idx = idx.to(value.device)
        if alpha is None:
            out[:, idx] = target
        else:
            a = alpha.to(value.device, value.dtype)
            out[:, idx] = out[:, idx] * (1 - a) + target * a
    return out


@contextlib.contextmanager
def intervene(
    model: Generator,
    layer: str,
    interventions: Intervention | Sequence[Intervention],
    field: str = "interventions",         # the request field the interventions came from
) -> Iterator[None]:
    """A context in which every forward pass applies the interventions to ``layer``'s value.

    Everything is validated before any hook is registered; the hook is removed on exit.
    """
    units, h, _ = _value_shape(model, layer)
    items = [interventions] if isinstance(interventions, Intervention) else list(interventions)
    plan = []
    for i, item in enumerate(items):
        if not isinstance(item, Intervention):
            raise InvalidArgument(f"{field}[{i}]", f"must be an Intervention, got {type(item).__name__}")
        item.validate(units, model.resolution, f"{field}[{i}]")
        idx = sorted({operator.index(u) for u in item.units})
        plan.append((torch.tensor(idx, dtype=torch.long), item.target(), item.alpha(h)))
    with nethook.replace_output(model, layer, lambda v: _apply(v, plan)):
        yield


def sample_with_interventions(
    model: Generator,
    seeds: Sequence[int] | None,
    layer: str,
    interventions: Intervention | Sequence[Intervention],
    truncation: float = 1.0,
    z: torch.Tensor | None = None,        # raw latents instead of seeds (pass seeds=None)
    batch_size: int = 16,
) -> torch.Tensor:
    """Images (N, 3, R, R) in [-1, 1] on the CPU, rendered with the interventions applied."""
    z = _latents(model, seeds, z)
    _truncation(model, truncation)
    with intervene(model, layer, interventions):
        return sample(model, z=z, truncation=truncation, batch_size=_batch_size(batch_size))
