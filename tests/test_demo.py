"""``make demo``'s script runs the service end to end (with fewer optimization steps)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.network


def test_demo_samples_rewrites_promotes_and_rolls_back_exactly(faces_path, cache_dir, tmp_path):
    env = {**os.environ, "RULEWRIGHT_CACHE_DIR": str(cache_dir)}
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "demo.py"), "--out", str(tmp_path), "--steps", "30"],
                          capture_output=True, text=True, env=env, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "created models/faces/versions/2" in proc.stdout
    assert "the original pixels, exactly" in proc.stdout
    for name in ("album.png", "before.png", "after.png", "before_after.png"):
        with Image.open(tmp_path / name) as im:
            assert im.size[0] > 0
    with Image.open(tmp_path / "before.png") as b, Image.open(tmp_path / "after.png") as a:
        assert b.size == a.size and b.tobytes() != a.tobytes()        # the edit changed the held-out faces
