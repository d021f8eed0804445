"""The engine CLI writes albums and lists layers; bad input exits 2 with one line, no traceback."""

from __future__ import annotations

import json
import subprocess
import sys

from PIL import Image
from safetensors.torch import save_file

from tests.builders import dcgan_state


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rulewright.service", *args],
                          capture_output=True, text=True, timeout=300)


def test_album_and_layers_for_a_checkpoint(tmp_path):
    path = tmp_path / "g.safetensors"
    save_file({k: v.contiguous() for k, v in dcgan_state(z_dim=16, widths=(32, 16, 8, 3)).items()}, str(path))
    out = tmp_path / "a" / "album.png"
    proc = _run("album", "--model", str(path), "--seeds", "0-5", "--columns", "3", "--scale", "1", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    with Image.open(out) as img:
        assert img.size == (3 * 34 + 2, 2 * 34 + 2)
    proc = _run("layers", "--model", str(path))
    listing = json.loads(proc.stdout)
    assert listing["default_layer"] == "main.6"
    assert [layer["name"] for layer in listing["layers"]] == ["main.3", "main.6", "main.9"]


def test_bad_checkpoint_exits_2_with_the_reason(tmp_path):
    state = dcgan_state()
    del state["main.1.bias"]
    path = tmp_path / "bad.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    proc = _run("layers", "--model", str(path))
    assert proc.returncode == 2
    assert "missing keys: main.1.bias" in proc.stderr and "Traceback" not in proc.stderr
    proc = _run("album", "--model", str(tmp_path / "nope.safetensors"))
    assert proc.returncode == 2 and "No such file" in proc.stderr
