"""What an edit must draw: the context directions, the goal targets, and the extra targets search finds.

- ``context_direction(C, keys, rank, ridge)``: D, the whitened top-``rank`` directions of keys.
- ``build_goal(model, spec)``: the targets (keys, goal values, goal images, boxes) of a spec
  (op rewrite: the copy pasted into each target; op erase: the rule's units switched off).
- ``find_targets(model, spec, C, goal)``: more targets, found by context search.
- ``value_mean_square(model, layer, seeds)``: per-unit E[a²] of a layer's values (erase's normalizer).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import torch
import torch.nn.functional as F

from rulewright.service.engine import nethook
from rulewright.service.engine.edit import EditSpec
from rulewright.service.engine.errors import InvalidArgument
from rulewright.service.engine.generators.base import Generator
from rulewright.service.engine.regions import Region, bbox
from rulewright.service.engine.sampling import latents


# ---------------------------------------------------------------------------------------------
# Direction


def whitening(C: torch.Tensor, ridge: float) -> torch.Tensor:
    """(C + ridge·tr(C)/d·I)^(-1/2), float64."""
    C = C.double()
    d = C.shape[0]
    reg = C + ridge * torch.trace(C) / d * torch.eye(d, dtype=C.dtype, device=C.device)
    evals, evecs = torch.linalg.eigh(reg)
    evals = evals.clamp_min(evals.max() * 1e-12)
    return (evecs * evals.rsqrt()) @ evecs.T


def context_direction(C: torch.Tensor, keys: torch.Tensor, rank: int, ridge: float = 1e-4) -> torch.Tensor:
    """D (d, rank), orthonormal: span of C^(-1/2)·q for the top right singular vectors q of the
    whitened context keys (rows of ``keys``, already weighted). For one key this is ∝ C⁻¹k."""
    if keys.shape[0] < rank:
        raise InvalidArgument("rank", f"rank {rank} exceeds the {keys.shape[0]} context keys selected")
    w = whitening(C, ridge)
    _, _, vh = torch.linalg.svd(keys.double() @ w, full_matrices=False)
    q = vh[:rank].T
    direction, _ = torch.linalg.qr(w @ q)
    # Sign convention: the context keys project positively (so responses read as "matches").
    signs = torch.sign((keys.double() @ direction).sum(0))
    signs[signs == 0] = 1
    return (direction * signs).float()

# ---------------------------------------------------------------------------------------------
# Goals


@dataclasses.dataclass
class Goal:
    """What the edited layer must draw, for a batch of T target samples."""

    seeds: list[int]
    z: torch.Tensor                  # (T, z_dim)
    key: torch.Tensor                # (T, C_in, Hk, Wk)
    extras: tuple                    # extra layer inputs captured with the keys
    value: torch.Tensor              # (T, C_out, Hv, Wv) the unedited values
    goal_value: torch.Tensor         # (T, C_out, Hv, Wv) v*
    value_box: torch.Tensor          # (T, Hv, Wv) 1 inside each target's goal box
    image: torch.Tensor              # (T, 3, R, R) the unedited images
    goal_image: torch.Tensor         # (T, 3, R, R) the pasted (or erased) pictures
    image_box: torch.Tensor          # (T, R, R) 1 inside each target's goal box
    key_box: torch.Tensor            # (T, Hk, Wk) keys under the goal box
    context_keys: torch.Tensor       # (n, C_in) context keys, rows scaled by sqrt(mask weight)
    info: dict = dataclasses.field(default_factory=dict)


def _shift(x: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """Translate the last two axes by (dy, dx), filling with zeros."""
    out = torch.zeros_like(x)
    h, w = x.shape[-2:]
    ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h), slice(0, h + dy))
    xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w), slice(0, w + dx))
    if h - abs(dy) > 0 and w - abs(dx) > 0:
        out[..., yd, xd] = x[..., ys, xs]
    return out


def _feather(alpha: torch.Tensor, sigma: float) -> torch.Tensor:
    """``alpha`` (R, R) blurred by a Gaussian of ``sigma`` pixels inside its own support: the
    paste fades out towards the box's border instead of ending in a hard rectangle."""
    if sigma <= 0:
        return alpha
    radius = max(1, math.ceil(2.5 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=alpha.dtype, device=alpha.device)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    k = k / k.sum()
    # Eroding by 1.25 sigma first leaves about a tenth of the paste on the box's border and keeps
    # the blurred alpha (almost) inside the box, where the user put it.
    e = math.ceil(1.25 * sigma)
    inner = -F.max_pool2d(-alpha[None, None], 2 * e + 1, stride=1, padding=e)
    blurred = F.conv2d(F.conv2d(inner, k.view(1, 1, 1, -1), padding=(0, radius)), k.view(1, 1, -1, 1),
                       padding=(radius, 0))
    return blurred[0, 0]


def _box_mask(alpha: torch.Tensor) -> torch.Tensor:
    """1 inside the tight box around alpha's nonzero cells."""
    out = torch.zeros_like(alpha)
    b = bbox(alpha)
    if b is not None:
        out[b[0]:b[2], b[1]:b[3]] = 1
    return out


def _center(alpha: torch.Tensor) -> tuple[float, float]:
    y0, x0, y1, x1 = bbox(alpha)
    return (y0 + y1) / 2, (x0 + x1) / 2


def _render(model: Generator, z: torch.Tensor, truncation: float) -> torch.Tensor:
    with torch.no_grad():
        return model(z, truncation)


def _capture(model: Generator, layer: str, z: torch.Tensor, truncation: float):
    with torch.no_grad(), nethook.Trace(model, layer, stop=True) as tr:
        model(z, truncation)
    return tr.key, tr.extras, tr.value


def _context_keys(model: Generator, layer: str, regions: Sequence[Region], truncation: float,
                  device: torch.device) -> torch.Tensor:
    rows = []
    res = model.resolution
    for region in regions:
        key, _, _ = _capture(model, layer, latents([region.seed], model.z_dim).to(device), truncation)
        w = region.at(key.shape[-1], res).to(device).reshape(-1)
        flat = key[0].reshape(key.shape[1], -1).T
        keep = w > 0
        rows.append(flat[keep] * w[keep, None].sqrt())
    return torch.cat(rows)


def _rewrite_goal(model: Generator, spec: EditSpec, device: torch.device) -> Goal:
    res, t = model.resolution, spec.truncation
    z_src = latents([spec.copy.seed], model.z_dim).to(device)
    _, _, v_src = _capture(model, spec.layer, z_src, t)
    img_src = _render(model, z_src, t)
    hv = v_src.shape[-1]
    if res % hv:
        raise InvalidArgument("layer", f"value grid {hv} does not divide the image size {res}")
    cell = res // hv
    a_src_v = spec.copy.at(hv, res).to(device)
    if a_src_v.max() == 0:
        raise InvalidArgument("copy", "the copy region covers no cell of the layer's value grid")
    a_src_img = spec.copy.alpha(res).to(device)
    cy, cx = _center(a_src_v)

    targets = spec.targets                   # the user's pastes, then any found by context search
    z = latents([r.seed for r in targets], model.z_dim).to(device)
    key, extras, value = _capture(model, spec.layer, z, t)
    image = _render(model, z, t)
    goal_value, goal_image = value.clone(), image.clone()
    value_box = torch.zeros(len(targets), hv, hv, device=device)
    image_box = torch.zeros(len(targets), res, res, device=device)
    offsets, pasted_alpha = [], []
    for i, region in enumerate(targets):
        py, px = _center(region.alpha(res))
        dy, dx = round(py / cell - cy), round(px / cell - cx)
        a_v = _shift(a_src_v, dy, dx)
        if a_v.max() == 0:
            field = f"paste[{i}]" if i < len(spec.paste) else f"found[{i - len(spec.paste)}]"
            raise InvalidArgument(field, "the pasted copy falls outside the image")
        a_img = _shift(a_src_img, dy * cell, dx * cell)
        a_goal = _feather(a_img, spec.fit["feather"]) if spec.method == "multilayer" else a_img
        goal_value[i] = value[i] * (1 - a_v) + _shift(v_src[0], dy, dx) * a_v
        goal_image[i] = image[i] * (1 - a_goal) + _shift(img_src[0], dy * cell, dx * cell) * a_goal
        value_box[i] = _box_mask(a_v)
        image_box[i] = _box_mask(a_img)
        offsets.append([dy * cell, dx * cell])
        pasted_alpha.append(a_img.cpu())
    hk = key.shape[-1]
    key_box = F.adaptive_max_pool2d(image_box[:, None], hk)[:, 0] if hk < res else image_box.clone()
    # The context is the user's: found targets add examples of the goal, not of the rule's context.
    context = spec.context or [Region(seed=r.seed, mask=a) for r, a in zip(spec.paste, pasted_alpha)]
    ctx = _context_keys(model, spec.layer, context, t, device)
    return Goal([r.seed for r in targets], z, key, extras, value, goal_value, value_box, image, goal_image,
                image_box, key_box, ctx, {"context": context, "offsets_px": offsets, "copy_alpha_value": a_src_v.cpu(),
                                          "source_value": v_src.cpu(), "source_image": img_src.cpu()})


def value_mean_square(model: Generator, layer: str, seeds: Sequence[int], truncation: float = 1.0,
                      batch_size: int = 32) -> torch.Tensor:
    """Per-unit E[a²] of a layer's values over every location of ``seeds`` (erase's normalizer)."""
    device = next(model.parameters()).device
    total, count = None, 0
    seeds = list(seeds)
    for start in range(0, len(seeds), batch_size):
        v = nethook.latents_to_values(model, layer, latents(seeds[start:start + batch_size], model.z_dim).to(device),
                                      truncation)
        sq = v.detach().double().pow(2).sum(dim=(0, 2, 3))
        total = sq if total is None else total + sq
        count += v.shape[0] * v.shape[2] * v.shape[3]
    return (total / count).float()


def _erase_goal(model: Generator, spec: EditSpec, device: torch.device) -> Goal:
    res, t = model.resolution, spec.truncation
    regions = list(spec.context) + list(spec.found or [])    # found: more samples where the rule holds
    n_user = len(spec.context)
    z = latents([r.seed for r in regions], model.z_dim).to(device)
    key, extras, value = _capture(model, spec.layer, z, t)
    image = _render(model, z, t)
    hv, hk = value.shape[-1], key.shape[-1]
    alpha_v = torch.stack([r.at(hv, res) for r in regions]).to(device)
    seeds = range(spec.stats["seed_start"], spec.stats["seed_start"] + min(spec.stats["samples"], 256))
    energy = value_mean_square(model, spec.layer, seeds, t)
    # The units to switch off are the user's context's: found samples only get the same units erased.
    inside = (value[:n_user].pow(2) * alpha_v[:n_user, None]).sum(dim=(0, 2, 3)) / alpha_v[:n_user].sum().clamp_min(1e-12)
    units = torch.argsort(inside / energy.clamp_min(1e-12), descending=True)[: spec.erase["units"]]
    goal_value = value.clone()
    goal_value[:, units] = value[:, units] * (1 - alpha_v[:, None])
    with torch.no_grad():
        goal_image = nethook.values_to_image(model, spec.layer, z, goal_value, t)
    value_box = torch.stack([_box_mask(a) for a in alpha_v])
    image_box = torch.stack([_box_mask(r.alpha(res)) for r in regions]).to(device)
    key_box = F.adaptive_max_pool2d(image_box[:, None], hk)[:, 0] if hk < res else image_box.clone()
    ctx = _context_keys(model, spec.layer, spec.context, t, device)
    return Goal([r.seed for r in regions], z, key, extras, value, goal_value, value_box, image, goal_image,
                image_box, key_box, ctx, {"units": units.tolist(), "context": list(spec.context)})


def build_goal(model: Generator, spec: EditSpec) -> Goal:
    """The targets of a spec: what the layer must draw where (op rewrite or erase)."""
    device = next(model.parameters()).device
    return _rewrite_goal(model, spec, device) if spec.op == "rewrite" else _erase_goal(model, spec, device)

# ---------------------------------------------------------------------------------------------
# Context search for extra paste targets


def find_targets(model: Generator, spec: EditSpec, C: torch.Tensor, goal: Goal) -> list[Region]:
    """Extra targets: the candidate samples whose keys under a paste box respond most to the
    context direction, each with the copy pasted at that box (one of the user's paste regions).
    For op erase the same with the context regions: more samples to erase the rule from.

    ``goal`` is the goal of the user's own targets (its key boxes say where each paste lands).
    Candidates are seeds ``search.seed_start ..`` (+ ``search.candidates``), minus the edit's own.
    """
    n, count, start = spec.search["targets"], spec.search["candidates"], spec.search["seed_start"]
    if n == 0 or spec.op not in ("rewrite", "erase"):
        return []
    user = spec.paste if spec.op == "rewrite" else spec.context
    device = goal.z.device
    direction = context_direction(C, goal.context_keys, min(spec.rank, goal.context_keys.shape[0]), spec.ridge)
    direction = direction.to(device)
    own = {r.seed for r in user} | ({spec.copy.seed} if spec.copy is not None else set())
    seeds = [s for s in range(start, start + count) if s not in own]
    boxes = goal.key_box[: len(user)]                                        # (P, Hk, Wk)
    area = boxes.sum(dim=(1, 2)).clamp_min(1e-12)
    scores, which = [], []
    for i in range(0, len(seeds), 64):
        key, _, _ = _capture(model, spec.layer, latents(seeds[i:i + 64], model.z_dim).to(device), spec.truncation)
        resp = torch.einsum("nchw,cr->nrhw", key, direction).norm(dim=1)      # (N, Hk, Wk)
        per_box = torch.einsum("nhw,phw->np", resp, boxes) / area             # mean response under each box
        best, idx = per_box.max(dim=1)
        scores.append(best.cpu())
        which.append(idx.cpu())
    scores, which = torch.cat(scores), torch.cat(which)
    order = sorted(range(len(seeds)), key=lambda j: (-float(scores[j]), seeds[j]))[:n]
    return [dataclasses.replace(user[int(which[j])], seed=seeds[j]) for j in order]

