"""``examples/rewrite.ipynb`` runs top to bottom in a Jupyter kernel (nbclient, this venv's
interpreter) against a real ``rulewright serve`` on a fresh data dir, and shows what it says."""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from PIL import Image

from tests.support import free_port, missing

REPO = Path(__file__).resolve().parent.parent
NOTEBOOK = REPO / "examples" / "rewrite.ipynb"
KERNEL = "rulewright-test"
pytestmark = pytest.mark.network


def _wait_serving(address: str, proc: subprocess.Popen, log: Path) -> None:
    """Until the server's health check says SERVING (the bootstrap is done), or it exits."""
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for _ in range(600):
            if proc.poll() is not None:
                pytest.fail(f"the server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    pytest.fail(f"the server did not come up:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def server(tmp_path_factory, cache_dir):
    """The gRPC address of ``rulewright serve`` over a fresh data dir (faces bootstrapped)."""
    exe = Path(sys.executable).with_name("rulewright-engine")
    if not exe.exists():
        missing(f"{exe} (pip install -e .)")
    tmp = tmp_path_factory.mktemp("notebook-server")
    address, log = f"127.0.0.1:{free_port()}", tmp / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RULEWRIGHT_")}
    with open(log, "w") as err:
        proc = subprocess.Popen([str(exe), "serve", "--data-dir", str(tmp / "data"), "--address", address,
                                 "--web-address", f"127.0.0.1:{free_port()}", "--device", "cpu",
                                 "--cache-dir", str(cache_dir), "--grace-s", "2"],
                                env=env, stdout=subprocess.DEVNULL, stderr=err, cwd=tmp)
    try:
        _wait_serving(address, proc, log)
        yield address
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def kernel(tmp_path, monkeypatch) -> str:
    """A kernelspec that runs this interpreter: the notebook sees this venv's client."""
    try:
        import ipykernel  # noqa: F401
        import nbclient  # noqa: F401
    except ImportError:
        missing("nbclient, nbformat and ipykernel (pip install -e '.[test]')")
    spec = tmp_path / "jupyter" / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "rulewright tests", "language": "python"}))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
    return KERNEL


def _text(cell) -> str:
    """Everything a code cell printed (stdout and stderr) and its text results."""
    parts = []
    for out in cell.get("outputs", []):
        if out["output_type"] == "stream":
            parts.append(out["text"])
        elif "data" in out:
            parts.append(out["data"].get("text/plain", ""))
    return "".join(parts)


def _pngs(cell) -> list[str]:
    return [out["data"]["image/png"] for out in cell.get("outputs", []) if "image/png" in out.get("data", {})]


def test_notebook_samples_rewrites_compares_promotes_and_rolls_back(server, kernel, monkeypatch):
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), "commit the notebook without outputs"
    monkeypatch.setenv("RULEWRIGHT_ADDRESS", server)
    NotebookClient(nb, kernel_name=kernel, timeout=300, resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()

    code = [c for c in nb.cells if c.cell_type == "code"]
    for cell in code:
        assert not [o for o in cell.outputs if o["output_type"] == "error"]
    connect, album, rewrite, strengths, promote, rollback, history = code
    assert "models/faces (dcgan): production is version 1" in _text(connect)
    assert "drawn by models/faces/versions/1" in _text(album) and len(_pngs(album)) == 1
    with Image.open(io.BytesIO(base64.b64decode(_pngs(album)[0]))) as im:
        assert im.size == (8 * 128, 2 * 128)              # 16 faces of 64 pixels, 8 a row, enlarged 2x
    # the bars ran to their ends (text bars: no ipywidgets here), then the new version and its preview
    bars = _text(rewrite)
    assert "optimize" in bars and "200/200" in bars
    assert "created models/faces/versions/2 from models/faces/versions/1" in bars and len(_pngs(rewrite)) == 1
    assert "models/faces/versions/1 (production)\nfaces/2 at strength 0.5" in _text(strengths)
    assert len(_pngs(strengths)) == 1
    with Image.open(io.BytesIO(base64.b64decode(_pngs(strengths)[0]))) as im:
        assert im.size == (8 * 128, 4 * 128)
        rows = [im.crop((0, 128 * r, im.width, 128 * (r + 1))).tobytes() for r in range(4)]
    assert len(set(rows)) == 4                            # the edit, and each strength, changed the faces
    assert "production draws models/faces/versions/2" in _text(promote) and len(_pngs(promote)) == 1
    assert "production draws models/faces/versions/1 again: the original pixels" in _text(rollback)
    assert len(_pngs(rollback)) == 1
    assert _text(history).splitlines() == ["0 -> 1: bootstrap", "1 -> 2: glasses, reviewed in the notebook",
                                           "2 -> 1: back to the original"]
