"""JSON answers rendered from the domain's typed results (``domain/requests.py``), the same results
the gRPC servicers turn into messages: one function per result, the editor's field names
(``docs/web-api.md``). Computed images go into ``Renders`` and appear as URLs."""

from __future__ import annotations

from typing import Sequence

from rulewright.service.domain.core import _json_metrics
from rulewright.service.domain.requests import (DissectResult, Event, LayersResult, ModelSummary, RewriteResult,
                                               SearchResult, VersionSummary)
from rulewright.service.server import convert
from rulewright.service.server.web.render import Renders, png


def _time(t) -> str:
    return t.isoformat()


def model(summary: ModelSummary, resolution: int | None) -> dict:
    """A model as ``GET /api/models`` lists it (``resolution``: its images' size)."""
    m = summary.model
    return {"name": m.name, "arch": m.arch, "latest_version": summary.latest, "resolution": resolution,
            "z_dim": (m.config or {}).get("z_dim"), "description": m.description,
            "aliases": {a.alias: a.version for a in summary.aliases}}


def alias(state, history: Sequence) -> dict:
    """An alias with every move it made (``registry.AliasState`` and its ``AliasEntry`` list)."""
    return {"alias": state.alias, "version": state.version, "etag": state.etag, "updated": _time(state.updated_at),
            "history": [{"seq": e.seq, "from": e.from_version, "to": e.to_version, "author": e.author,
                         "time": _time(e.time), "reason": e.reason} for e in history]}


def version(found: VersionSummary) -> dict:
    """A version with its lineage, spec, metrics, its own edit's strength (None for an import) and
    where an edit that was not fitted here came from: ``rescaled_from`` (a version number; 0 or
    None: fitted) or ``adapter`` (the exported version's name)."""
    v = found.version
    return {"number": v.number, "parent": v.parent, "lineage": found.lineage, "kind": v.kind, "author": v.author,
            "created": _time(v.created_at), "spec": v.spec or {}, "metrics": _json_metrics(v.metrics or {}),
            "strength": v.edit_strength, "rescaled_from": v.rescaled_from,
            "adapter": (v.adapter or {}).get("source_version")}


def layers(result: LayersResult) -> dict:
    """A version's rewritable layers and the shape of its images and latents."""
    return {"model": result.version.model, "version": result.version.number, "default_layer": result.default_layer,
            "image_resolution": result.resolution, "z_dim": result.z_dim,
            "layers": [{"name": i.name, "resolution": i.resolution, "in_channels": i.key_shape[0],
                        "out_channels": i.value_shape[0], "key_shape": list(i.key_shape),
                        "value_shape": list(i.value_shape), "linear": i.linear} for i in result.layers]}


def search(result: SearchResult, renders: Renders) -> dict:
    """A context search's matches, each with its response map as a heatmap URL."""
    return {"model": result.version.model, "version": result.version.number, "layer": result.layer,
            "threshold": result.threshold,
            "matches": [{"seed": m.seed, "score": m.score, "above": m.above,
                         "map_url": renders.heatmap(m.response, result.threshold, result.resolution)}
                        for m in result.matches]}


def dissect(result: DissectResult, seed: int, renders: Renders) -> dict:
    """A dissection's units, each with its threshold and its map on ``seed`` as a heatmap URL."""
    thresholds = result.thresholds.tolist()
    maps = {unit: m for unit, _, m in result.maps}

    def unit(u) -> dict:
        url = renders.heatmap(maps[u.unit], thresholds[u.unit], result.resolution) if u.unit in maps else None
        return {"unit": u.unit, "iou": u.iou, "contrast": u.contrast, "inside": u.inside, "outside": u.outside,
                "threshold": thresholds[u.unit], "map_url": url}

    return {"model": result.version.model, "version": result.version.number, "layer": result.layer, "seed": seed,
            "units": [unit(u) for u in result.units]}


def rewrite(result: RewriteResult, preview_seeds: Sequence[int], renders: Renders) -> dict:
    """A rewrite's outcome: the new version (None for a dry run), its metrics and found targets, and
    the previews as image URLs."""
    out = {"model": result.parent.model, "parent": result.parent.number,
           "version": result.version.number if result.version is not None else None,
           "dry_run": result.version is None, "replayed": result.replayed,
           "metrics": _json_metrics(result.edit.metrics or {}), "found": (result.edit.spec or {}).get("found")}
    if result.previews is not None:
        out["previews"] = [{"seed": s, "url": renders.put(data)} for s, data in zip(preview_seeds, png(result.previews))]
    return out


def progress(event: Event) -> dict | None:
    """A progress event as the editor's JSON (the stages gRPC streams); None for the others."""
    stage = convert.progress_stage(event)
    if stage is None:
        return None
    out = {"stage": stage, "step": event.done, "steps": event.total}
    if event.loss is not None:
        out["loss"] = event.loss
    return out


def job(found) -> dict:
    """An editor job (``jobs.editor.Job``): its state, what it is about, its URLs and its outcome once done."""
    out = {"job": found.id, "state": found.state, **found.info, "events_url": f"/api/rewrites/{found.id}/events",
           "cancel_url": f"/api/rewrites/{found.id}/cancel"}
    last = found.last()
    if last is not None:
        out[last[0]] = last[1].get("error", last[1]) if last[0] == "error" else last[1]
    return out
