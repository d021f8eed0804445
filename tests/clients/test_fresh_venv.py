"""``pip install clients/python`` into a fresh virtual environment (no torch, no server), then its
``rulewright`` command and examples/workflow.py against a live server, end to end.

This is what a user of the client gets: if a dependency on the server or torch crept into the
client, or the stubs' direct reference to protos/ broke, it fails here and nowhere else.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def sh(*cmd, timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=timeout, **kw)


@pytest.mark.network
def test_client_installs_without_torch_and_runs_the_example_edit(live, tmp_path):
    address, _ = live
    venv = tmp_path / "venv"
    made = sh(sys.executable, "-m", "venv", venv)             # no system site packages: only what pip installs
    assert made.returncode == 0, made.stderr
    py, rw = venv / "bin" / "python", venv / "bin" / "rulewright"
    pip = sh(py, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", REPO / "clients" / "python",
             timeout=900)
    assert pip.returncode == 0, pip.stdout + pip.stderr

    probe = sh(py, "-c", "import rulewright.client, rulewright.v1\n"
                         "for name in ('torch', 'rulewright.service'):\n"
                         "    try:\n        __import__(name)\n    except ImportError:\n        print('no', name)")
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split("\n")[:2] == ["no torch", "no rulewright.service"]

    serve = sh(rw, "serve")                                    # the client alone cannot serve
    assert serve.returncode == 2 and serve.stderr.strip() == "rulewright serve needs the server: pip install rulewright"

    edit = sh(rw, "--address", address, "rewrite", "faces", "--spec", REPO / "examples" / "edits" / "glasses.json",
              "--quality", "draft", "--steps", "30", "--promote", "production", cwd=tmp_path)
    assert edit.returncode == 0, edit.stderr
    assert edit.stdout.splitlines() == ["created models/faces/versions/2 (parent models/faces/versions/1)",
                                        "production: 1 -> 2"]
    assert "30/30" in edit.stderr                              # the progress bar reached the last step

    back = sh(rw, "--address", address, "rollback", "faces")
    assert back.returncode == 0, back.stderr
    assert back.stdout.strip() == "production: 2 -> 1"

    out = tmp_path / "workflow"
    flow = sh(py, REPO / "examples" / "workflow.py", "--address", address, "--quality", "draft", "--steps", "20",
              "--out", out)
    assert flow.returncode == 0, flow.stdout + flow.stderr
    assert "created models/faces/versions/3 (parent models/faces/versions/1)" in flow.stdout
    assert "the original pixels, exactly" in flow.stdout
    assert {p.name for p in out.iterdir()} == {"album.png", "regions.png", "before_after.png"}
