"""On the gRPC side: a broken ImportModel stream is no INTERNAL error, a public
metrics address needs tokens, and after SIGTERM health answers NOT_SERVING while work drains."""

from __future__ import annotations

import ctypes
import json
import logging
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rulewright.service.server.app import create_server
from rulewright.v1 import edit_pb2, generator_service_pb2 as gen, generator_service_pb2_grpc as gen_grpc
from rulewright.v1 import registry_service_pb2 as reg, registry_service_pb2_grpc as reg_grpc
from tests.builders import tiny_domain
from tests.support import free_port

from .test_config import clean_env, cli, health_of, one_error_line, rulewright_exe, wait_serving  # noqa: F401

NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
REPO = Path(__file__).resolve().parents[2]
SYS_TGKILL = {"x86_64": 234, "aarch64": 131}[platform.machine()]


def test_import_stream_broken_by_an_oversized_message_is_not_logged_as_internal(tmp_path, caplog):
    domain = tiny_domain(tmp_path)
    server, port = create_server(domain, max_message_bytes=1 << 20)
    try:
        options = [("grpc.max_send_message_length", 8 << 20)]
        with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as channel:
            def requests():
                yield reg.ImportModelRequest(metadata=reg.ImportModelMetadata(model_id="big", arch="dcgan"))
                yield reg.ImportModelRequest(chunk=b"\0" * (2 << 20))
            with caplog.at_level(logging.INFO, logger="rulewright"), pytest.raises(grpc.RpcError) as err:
                reg_grpc.RegistryServiceStub(channel).ImportModel(requests(), timeout=10)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        deadline = time.monotonic() + 5          # the server's side of the call ends a moment later
        while not [r for r in caplog.records if getattr(r, "method", "") == "ImportModel"] \
                and time.monotonic() < deadline:
            time.sleep(0.05)
        calls = [r for r in caplog.records if getattr(r, "method", "") == "ImportModel"]
        assert calls and all(getattr(r, "code", "") != "INTERNAL" for r in calls), [r.__dict__ for r in calls]
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    finally:
        server.stop(0).wait()
        domain.close()


def test_public_metrics_address_without_tokens_exits_2(cli):  # noqa: F811 -- the fixture
    rc, err = cli("--metrics-address", "0.0.0.0:0")
    assert rc == 2
    line = one_error_line(err)
    assert "without auth" in line and "0.0.0.0:0" in line


def _tiny_data(tmp_path: Path) -> Path:
    """A data directory whose registry holds the tiny DCGAN as ``tiny``."""
    from safetensors.torch import save_file

    from rulewright.service.domain.core import Domain
    from tests.builders import dcgan_state

    data = tmp_path / "data"
    path = tmp_path / "tiny.safetensors"
    save_file({k: v.contiguous() for k, v in dcgan_state(z_dim=16, widths=(32, 16, 8, 3)).items()}, str(path))
    seeded = Domain.open(data, device="cpu")
    seeded.bootstrap("tiny", path)
    seeded.close()
    return data


def test_after_sigterm_health_answers_not_serving_while_work_drains(tmp_path):
    data = _tiny_data(tmp_path)
    port = free_port()
    log = tmp_path / "server.log"           # a file, not a pipe: nobody reads it until the end
    with log.open("w") as err:
        proc = subprocess.Popen(
            [str(rulewright_exe()), "serve", "--bootstrap", "none", "--data-dir", str(data), "--web-address", "off",
             "--address", f"127.0.0.1:{port}", "--device", "cpu", "--grace-s", "4"],
            env=clean_env(), stdout=subprocess.DEVNULL, stderr=err, text=True, cwd=tmp_path)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            wait_serving(channel, proc, timeout_s=60)
            request = gen.ComputeStatisticsRequest(model="tiny", layer="main.6",
                                                   stats=edit_pb2.StatisticsSpec(samples=100_000))
            stream = gen_grpc.GeneratorServiceStub(channel).ComputeStatistics(request, timeout=30)
            assert next(stream).HasField("progress")              # work in flight
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            status = health_of(channel)
            assert status == NOT_SERVING, status
            with pytest.raises(grpc.RpcError) as err:              # new work goes elsewhere
                gen_grpc.GeneratorServiceStub(channel).Sample(gen.SampleRequest(model="tiny", seeds=[0]), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            stream.cancel()
        rc = proc.wait(timeout=30)
        assert rc == 0, f"the server exited with {rc}; its stderr:\n{log.read_text()[-6000:]}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _event(line: str) -> str | None:
    try:
        return json.loads(line).get("event")
    except ValueError:
        return None


def _wait_file(path: Path, proc: subprocess.Popen, log: Path, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert proc.poll() is None, f"the server exited with {proc.returncode}:\n{log.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"no {path.name} after {timeout_s} s:\n{log.read_text()[-4000:]}"
        time.sleep(0.05)


@pytest.mark.parametrize("torch_s, grace_s, left_running", [(3, 10, False), (60, 1, True)],
                         ids=["worker-ends-within-grace", "worker-outlasts-grace"])
def test_sigterm_while_a_cancelled_streams_worker_is_still_inside_torch_exits_0(tmp_path, torch_s, grace_s,
                                                                              left_running):
    """What a heavily loaded machine did once, forced in order (``tests/server/race_serve.py``): the
    RPC thread of a cancelled statistics stream ends while its worker thread is still inside
    torch. The server waits for that worker before the interpreter exits (a thread inside torch
    at exit aborts the process); one that outlasts the grace period is logged and the process
    leaves without finalizing. Either way: exit 0."""
    data = _tiny_data(tmp_path)
    race = tmp_path / "race"
    race.mkdir()
    port = free_port()
    log = tmp_path / "server.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.server.race_serve", "serve", "--bootstrap", "none", "--data-dir", str(data),
             "--web-address", "off", "--address", f"127.0.0.1:{port}", "--device", "cpu", "--grace-s", str(grace_s)],
            env=clean_env(PYTHONPATH=str(REPO), RULEWRIGHT_RACE_DIR=str(race), RULEWRIGHT_RACE_TORCH_S=str(torch_s)),
            stdout=subprocess.DEVNULL, stderr=err, cwd=REPO)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            wait_serving(channel, proc, timeout_s=60)
            request = gen.ComputeStatisticsRequest(model="tiny", layer="main.6",
                                                   stats=edit_pb2.StatisticsSpec(samples=100_000))
            stream = gen_grpc.GeneratorServiceStub(channel).ComputeStatistics(request, timeout=60)
            assert next(stream).HasField("progress")
            _wait_file(race / "in-torch", proc, log)                 # the worker is past its cancellation check
            proc.send_signal(signal.SIGTERM)
            stream.cancel()
        rc = proc.wait(timeout=60)
        assert rc == 0, f"the server exited with {rc}; its stderr:\n{log.read_text()[-6000:]}"
        events = [_event(line) for line in log.read_text().splitlines()]
        assert "stopped" in events and ("exit_with_work_running" in events) == left_running, log.read_text()[-6000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _signal_thread(pid: int, tid: int, sig: int) -> None:
    """``tgkill``: ``sig`` to one thread of ``pid`` (the kernel may hand a process's signal to any thread)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(SYS_TGKILL, pid, tid, sig) != 0:
        raise OSError(ctypes.get_errno(), f"tgkill {pid} {tid}")


def test_sigterm_caught_by_a_thread_other_than_the_main_one_still_stops_the_server(tmp_path):
    """A process-directed SIGTERM is taken by whichever thread the kernel picks, often a busy worker;
    Python runs its handler only on the main thread, when that thread next runs Python code. Sent
    here to one gRPC thread on purpose: the server must still go NOT_SERVING, stop and exit 0."""
    data = _tiny_data(tmp_path)
    port = free_port()
    log = tmp_path / "server.log"
    with log.open("w") as err:
        proc = subprocess.Popen(
            [str(rulewright_exe()), "serve", "--bootstrap", "none", "--data-dir", str(data), "--web-address", "off",
             "--address", f"127.0.0.1:{port}", "--device", "cpu", "--grace-s", "1"],
            env=clean_env(), stdout=subprocess.DEVNULL, stderr=err, text=True, cwd=tmp_path)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            wait_serving(channel, proc, timeout_s=60)
        others = [int(t.name) for t in Path(f"/proc/{proc.pid}/task").iterdir() if int(t.name) != proc.pid]
        assert others, "the server has no threads besides the main one"
        _signal_thread(proc.pid, others[0], signal.SIGTERM)
        try:
            rc = proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            rc = None
        outcome = "did not stop" if rc is None else f"exited with {rc}"
        assert rc == 0, f"the server {outcome}:\n{log.read_text()[-4000:]}"
        assert "shutdown" in [_event(line) for line in log.read_text().splitlines()]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
