"""A detector per edit: a small CNN that tells each face's ideal result from its unedited original.

Pixel L1 to the ideal rewards a diffuse brightness shift as much as the object's structure; a
detector trained on the edit's own positives (``evaluate.ideal_images``: the copy pasted into each
face's own features and rendered) against the unedited faces counts faces on which the object
actually appears — the way the paper counted images in which a segmenter found the new object.

- ``DetectorConfig``: training seeds, epochs, crop margin; ``train_seeds()`` / ``check_seeds()``
  are the seed ranges it uses, disjoint from every other seed set of the project (statistics from
  0, held-out faces from 50,000, the keep pool from 10^6, the search candidates from 2·10^6).
- ``train_detector(model, spec, config)`` → ``(Detector, info)``: seeded, so the same inputs train
  the same detector; ``info`` gives its seeds and its accuracy on its own held-out pairs.
- ``Detector.probability(images)``: P(edited) per image; a face counts as detected at ≥ 0.5
  (``evaluate.heldout_metrics(..., detect=detector.probability)``).
- ``model_fingerprint(model)`` / ``detector_key(model, spec, config)``: what a cached detector is
  valid for (the weights, the edit's geometry, the seeds and the training recipe).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time

import torch
import torch.nn.functional as F
from torch import nn

from rulewright.service.engine.edit import EditSpec
from rulewright.service.engine.evaluate import ideal_images, paste_geometry
from rulewright.service.engine.regions import bbox
from rulewright.service.engine.sampling import latents

# Far above every other seed range the project draws from (see the module docstring): statistics
# jobs may cover up to 10^7 seeds from 0, so 10^12 leaves room for all of them.
TRAIN_START = 10**12
CHECK_START = 10**12 + 10**7
# The spec fields each face's ideal result depends on (the fit's settings do not change it).
IDEAL_FIELDS = ("op", "layer", "truncation", "copy", "paste", "context", "erase", "stats")
RECIPE = 1                # bump when the architecture or the training loop changes (invalidates caches)


@dataclasses.dataclass(frozen=True)
class DetectorConfig:
    """How a detector is trained: its seeds, its schedule, and the crop around the edit's box."""

    train: int = 400          # training faces (each gives one ideal and one original)
    check: int = 200          # held-out faces of the detector's own accuracy check
    epochs: int = 12
    batch: int = 64
    lr: float = 2e-3
    margin: int = 6           # pixels of context around the box in the crop
    jitter: int = 2           # random shift (pixels) of the crop while training
    width: int = 16           # channels of the first convolution
    seed: int = 0

    def train_seeds(self) -> range:
        """The faces the detector is trained on."""
        return range(TRAIN_START, TRAIN_START + self.train)

    def check_seeds(self) -> range:
        """The faces its accuracy is measured on (never trained on)."""
        return range(CHECK_START, CHECK_START + self.check)


class Detector(nn.Module):
    """P(edited) of an image, looking at a crop around the edit's box."""

    def __init__(self, crop: tuple[int, int, int, int], width: int = 16, jitter: int = 0):
        super().__init__()
        self.crop, self.jitter = crop, jitter        # (y0, x0, y1, x1), end exclusive
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * w, 4 * w, 3, padding=1), nn.ReLU())
        self.head = nn.Linear(8 * w, 1)

    def _crop(self, images: torch.Tensor, dy: int = 0, dx: int = 0) -> torch.Tensor:
        y0, x0, y1, x1 = self.crop
        j = self.jitter
        padded = F.pad(images, (j, j, j, j), mode="replicate") if j else images
        return padded[..., y0 + j + dy:y1 + j + dy, x0 + j + dx:x1 + j + dx]

    def logits(self, images: torch.Tensor, dy: int = 0, dx: int = 0) -> torch.Tensor:
        """(N,) logits of P(edited); (dy, dx) shifts the crop (training jitter)."""
        h = self.net(self._crop(images, dy, dx))
        h = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)    # where the object is varies a little
        return self.head(h)[:, 0]

    def probability(self, images: torch.Tensor) -> torch.Tensor:
        """(N,) P(edited) of images in [-1, 1]."""
        with torch.no_grad():
            return torch.sigmoid(self.logits(images.to(next(self.parameters()).device)))


def crop_box(geometry: dict, resolution: int, margin: int) -> tuple[int, int, int, int]:
    """(y0, x0, y1, x1): the edit's image box grown by ``margin`` and clipped to the image."""
    y0, x0, y1, x1 = bbox(geometry["image_box"])
    return (max(0, y0 - margin), max(0, x0 - margin), min(resolution, y1 + margin), min(resolution, x1 + margin))


def pairs(model, spec: EditSpec, seeds: range, geometry: dict, batch: int = 50) -> tuple[torch.Tensor, torch.Tensor]:
    """(originals, ideals) of ``seeds``, on the CPU."""
    device = next(model.parameters()).device
    base, ideal = [], []
    for i in range(0, len(seeds), batch):
        z = latents(seeds[i:i + batch], model.z_dim).to(device)
        with torch.no_grad():
            base.append(model(z, spec.truncation).cpu())
        ideal.append(ideal_images(model, spec, z, geometry).cpu())
    return torch.cat(base), torch.cat(ideal)


def accuracy(detector: Detector, originals: torch.Tensor, ideals: torch.Tensor) -> float:
    """Share of ideal-vs-original images classified right at threshold 0.5."""
    right = (detector.probability(ideals) >= 0.5).sum() + (detector.probability(originals) < 0.5).sum()
    return right.item() / (len(ideals) + len(originals))


def train_detector(model, spec: EditSpec, config: DetectorConfig = DetectorConfig()) -> tuple[Detector, dict]:
    """A detector for ``spec``'s edit, trained on ``config.train_seeds()``; seeded, so reproducible."""
    started = time.perf_counter()
    spec = dataclasses.replace(spec, found=[])
    geometry = paste_geometry(model, spec)
    crop = crop_box(geometry, model.resolution, config.margin)
    originals, ideals = pairs(model, spec, config.train_seeds(), geometry)
    x = torch.cat([originals, ideals])
    y = torch.cat([torch.zeros(len(originals)), torch.ones(len(ideals))])
    gen = torch.Generator().manual_seed(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)                 # the initial weights
        detector = Detector(crop, config.width, config.jitter)
    opt = torch.optim.Adam(detector.parameters(), lr=config.lr)
    steps = config.epochs * ((len(x) + config.batch - 1) // config.batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=config.lr, total_steps=steps)
    j = config.jitter
    for _ in range(config.epochs):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), config.batch):
            idx = order[i:i + config.batch]
            dy, dx = (torch.randint(-j, j + 1, (2,), generator=gen).tolist() if j else (0, 0))
            loss = F.binary_cross_entropy_with_logits(detector.logits(x[idx], dy, dx), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    detector.eval().requires_grad_(False)
    check_originals, check_ideals = pairs(model, spec, config.check_seeds(), geometry)
    info = {"train_seeds": [config.train_seeds().start, len(config.train_seeds())],
            "check_seeds": [config.check_seeds().start, len(config.check_seeds())],
            "train_accuracy": accuracy(detector, originals, ideals),
            "check_accuracy": accuracy(detector, check_originals, check_ideals),
            "crop": list(crop), "seconds": time.perf_counter() - started, "config": dataclasses.asdict(config)}
    return detector, info


def model_fingerprint(model) -> str:
    """sha256 of a model's parameters and buffers (names, shapes, bytes): what its images depend on."""
    h = hashlib.sha256(str(getattr(model, "arch", type(model).__name__)).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def detector_key(model, spec: EditSpec, config: DetectorConfig, fingerprint: str | None = None) -> str:
    """The cache key of a detector: the model, the edit as replayed without its found targets, the recipe."""
    whole = dataclasses.replace(spec, found=None).to_json()
    spec_json = {k: whole.get(k) for k in IDEAL_FIELDS}
    blob = json.dumps({"model": fingerprint or model_fingerprint(model), "spec": spec_json, "recipe": RECIPE,
                       "config": dataclasses.asdict(config)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:32]
