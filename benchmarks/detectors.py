"""Per-edit detectors for the edit-quality benchmarks, trained once and cached on disk.

A detector (``rulewright.service.engine.detector``) depends on the model's weights, the edit's
geometry (what its ideal result is), its seeds and its recipe; ``detector_key`` hashes all of them,
so a cached detector is reused only where it would be trained the same.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import load_file, save_file

from rulewright.service.engine.detector import Detector, DetectorConfig, detector_key, train_detector
from rulewright.service.engine.edit import EditSpec

CACHE = Path("out/detectors")


def load_or_train(model, spec: EditSpec, config: DetectorConfig = DetectorConfig(), cache: Path = CACHE,
                  fingerprint: str | None = None) -> tuple[Detector, dict]:
    """The edit's detector from ``cache`` if one was trained for the same inputs, else trained and cached."""
    key = detector_key(model, spec, config, fingerprint)
    weights, meta = cache / f"{key}.safetensors", cache / f"{key}.json"
    if weights.exists() and meta.exists():
        info = json.loads(meta.read_text())
        detector = Detector(tuple(info["crop"]), config.width, config.jitter)
        detector.load_state_dict(load_file(str(weights)))
        detector.eval().requires_grad_(False)
        return detector, {**info, "cached": True, "key": key}
    detector, info = train_detector(model, spec, config)
    cache.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in detector.state_dict().items()}, str(weights))
    meta.write_text(json.dumps(info, indent=1))
    return detector, {**info, "cached": False, "key": key}


def describe(info: dict) -> str:
    """One line: the detector's seeds and its held-out accuracy."""
    t, c = info["train_seeds"], info["check_seeds"]
    how = "cached" if info.get("cached") else f"trained in {info['seconds']:.0f} s"
    return (f"detector: trained on ideal vs original of seeds {t[0]}..{t[0] + t[1] - 1}, accuracy "
            f"{100 * info['check_accuracy']:.1f}% on seeds {c[0]}..{c[0] + c[1] - 1} ({how})")
