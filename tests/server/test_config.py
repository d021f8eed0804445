"""``rulewright serve`` settings (server/config.py) and the command itself.

- ``resolve``: defaults, precedence flag > ``RULEWRIGHT_*`` > TOML file > default, parsing and checks.
- ``rulewright serve --help`` documents every setting with its flag and environment variable.
- Known misconfigurations exit 2 with one ``rulewright: error: ...`` line, no traceback.
- The real ``rulewright serve`` process: mTLS, metrics, S3 (moto) registry, Redis cache, the faces
  model bootstrapped from the cache, JSON logs, SIGTERM → exit 0; and ``--bootstrap none``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rulewright.service.cli import server_main
from rulewright.service.server.config import SETTINGS, ConfigError, ServeConfig, add_arguments, resolve
from rulewright.v1 import generator_service_pb2 as gen, generator_service_pb2_grpc as gen_grpc
from rulewright.v1 import images_pb2, registry_service_pb2 as reg, registry_service_pb2_grpc as reg_grpc
from tests.support import free_port, missing

SERVING = health_pb2.HealthCheckResponse.SERVING
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GRPC_CORE_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ")


def parse(*argv: str) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    add_arguments(p)
    return p.parse_args(list(argv))


def write_toml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---- resolve ---------------------------------------------------------------------------------------


def test_defaults_with_no_flags_env_or_file():
    config = resolve(parse(), {})
    assert config == ServeConfig()
    assert [f.name for f in dataclasses.fields(ServeConfig)] == [s.name for s in SETTINGS]
    assert (config.address, config.max_batch, config.dynamic_batching, config.bootstrap, config.registry_uri,
            config.stats_cache, config.grace_s) == ("127.0.0.1:50051", 16, True, "faces", "", "memory://", 10.0)
    assert resolve(None, {}) == config


def test_flag_beats_env_beats_file_beats_default(tmp_path):
    file = write_toml(tmp_path / "serve.toml", 'max_batch = 4\naddress = "127.0.0.1:7001"\n'
                                               'dynamic_batching = false\nmax_workers = 3\ngrace_s = 1.5\n')
    env = {"RULEWRIGHT_CONFIG": str(file), "RULEWRIGHT_MAX_BATCH": "8", "RULEWRIGHT_ADDRESS": "127.0.0.1:7002",
           "RULEWRIGHT_DYNAMIC_BATCHING": "true"}

    c = resolve(parse("--max-batch", "12"), env)
    assert c.max_batch == 12                      # flag over env and file
    assert c.address == "127.0.0.1:7002"          # env over file
    assert c.dynamic_batching is True             # env over file
    assert (c.max_workers, c.grace_s) == (3, 1.5)  # file over default
    assert c.max_resident == 1024                 # default

    c = resolve(parse(), env)
    assert (c.max_batch, c.address) == (8, "127.0.0.1:7002")
    c = resolve(parse(), {"RULEWRIGHT_CONFIG": str(file)})
    assert (c.max_batch, c.address, c.dynamic_batching) == (4, "127.0.0.1:7001", False)
    c = resolve(parse("--dynamic-batching", "off", "--address", "127.0.0.1:7003"), env)
    assert (c.dynamic_batching, c.address) == (False, "127.0.0.1:7003")


def test_empty_env_counts_as_unset(tmp_path):
    file = write_toml(tmp_path / "serve.toml", "max_batch = 4\n")
    c = resolve(parse(), {"RULEWRIGHT_CONFIG": str(file), "RULEWRIGHT_MAX_BATCH": "", "RULEWRIGHT_ADDRESS": ""})
    assert (c.max_batch, c.address) == (4, "127.0.0.1:50051")


def test_config_flag_beats_config_env(tmp_path):
    a = write_toml(tmp_path / "a.toml", "max_batch = 2\n")
    b = write_toml(tmp_path / "b.toml", "max_batch = 3\n")
    assert resolve(parse("--config", str(a)), {"RULEWRIGHT_CONFIG": str(b)}).max_batch == 2
    assert resolve(parse(), {"RULEWRIGHT_CONFIG": str(b)}).max_batch == 3


@pytest.mark.parametrize("text, value", [("false", False), ("0", False), ("off", False), ("no", False),
                                         ("FALSE", False), (" Off ", False), ("true", True), ("1", True),
                                         ("on", True), ("yes", True), ("True", True)])
def test_bool_parsing(text, value):
    assert resolve(parse(), {"RULEWRIGHT_DYNAMIC_BATCHING": text}).dynamic_batching is value
    assert resolve(parse("--create-bucket", text), {}).create_bucket is value


def test_bad_bool_names_its_source(tmp_path):
    with pytest.raises(ConfigError, match="RULEWRIGHT_DYNAMIC_BATCHING.*maybe"):
        resolve(parse(), {"RULEWRIGHT_DYNAMIC_BATCHING": "maybe"})
    with pytest.raises(ConfigError, match="--create-bucket"):
        resolve(parse("--create-bucket", "sometimes"), {})


def test_toml_booleans_and_numbers(tmp_path):
    file = write_toml(tmp_path / "serve.toml", 'create_bucket = true\ndynamic_batching = false\n'
                                               'batch_delay_ms = 0\nmemory_budget_mb = 512\nmax_batch = "6"\n')
    c = resolve(parse("--config", str(file)), {})
    assert (c.create_bucket, c.dynamic_batching) == (True, False)
    assert (c.batch_delay_ms, c.memory_budget_mb, c.max_batch) == (0.0, 512.0, 6)
    assert isinstance(c.batch_delay_ms, float) and isinstance(c.max_batch, int)


def test_unknown_key_in_file_is_named(tmp_path):
    file = write_toml(tmp_path / "serve.toml", "max_batch = 4\nmax_btach = 8\n[server]\nport = 1\n")
    with pytest.raises(ConfigError, match=r"unknown settings max_btach, server") as err:
        resolve(parse("--config", str(file)), {})
    assert str(file) in str(err.value)


def test_unreadable_or_invalid_file(tmp_path):
    with pytest.raises(ConfigError, match="missing.toml"):
        resolve(parse("--config", str(tmp_path / "missing.toml")), {})
    bad = write_toml(tmp_path / "bad.toml", "max_batch = = 4\n")
    with pytest.raises(ConfigError, match="bad.toml"):
        resolve(parse(), {"RULEWRIGHT_CONFIG": str(bad)})


def test_bad_values_name_setting_and_source(tmp_path):
    with pytest.raises(ConfigError, match="max_batch from RULEWRIGHT_MAX_BATCH") as err:
        resolve(parse(), {"RULEWRIGHT_MAX_BATCH": "lots"})
    assert "lots" in str(err.value)
    with pytest.raises(ConfigError, match="max_batch from --max-batch"):
        resolve(parse("--max-batch", "1.5"), {})
    with pytest.raises(ConfigError, match="grace_s from RULEWRIGHT_GRACE_S"):
        resolve(parse(), {"RULEWRIGHT_GRACE_S": "soon"})
    file = write_toml(tmp_path / "serve.toml", "max_batch = true\n")
    with pytest.raises(ConfigError, match=f"max_batch from {file}"):
        resolve(parse("--config", str(file)), {})


@pytest.mark.parametrize("args, env, message", [
    (("--max-batch", "0"), {}, "max_batch must be at least 1, got 0"),
    ((), {"RULEWRIGHT_MAX_RESIDENT": "0"}, "max_resident must be at least 1"),
    ((), {"RULEWRIGHT_MAX_WORKERS": "-2"}, "max_workers must be at least 1"),
    (("--batch-delay-ms", "-1"), {}, "batch_delay_ms must not be negative"),
    (("--grace-s", "nan"), {}, "grace_s must be finite"),
    (("--grace-s", "-1"), {}, "grace_s must not be negative"),
    (("--metrics-address", "127.0.0.1"), {}, "metrics_address must be host:port, got '127.0.0.1'"),
    ((), {"RULEWRIGHT_ADDRESS": "localhost:http"}, "address must be host:port"),
    ((), {"RULEWRIGHT_MAX_MESSAGE_MB": "0"}, "max_message_mb must be positive"),
    ((), {"RULEWRIGHT_MAX_IMPORT_MB": "-5"}, "max_import_mb must be positive"),
    (("--bootstrap", "other"), {}, "bootstrap must be faces or none, got 'other'"),
    ((), {"RULEWRIGHT_BOOTSTRAP": "Faces"}, "bootstrap must be faces or none"),
    (("--job-executor", "dask"), {}, "job_executor must be local or ray, got 'dask'"),
    ((), {"RULEWRIGHT_RAY_MAX_RETRIES": "-1"}, "ray_max_retries must not be negative"),
    (("--ray-gpus-per-shard", "nan"), {}, "ray_gpus_per_shard must be a non-negative number"),
])
def test_out_of_range_values(args, env, message):
    with pytest.raises(ConfigError, match=message):
        resolve(parse(*args), env)


def test_fractional_int_in_file_is_refused(tmp_path):
    """``max_batch = 8.5`` must not silently become 8 (the flag and env refuse "8.5" already)."""
    file = write_toml(tmp_path / "serve.toml", "max_batch = 8.5\n")
    with pytest.raises(ConfigError, match="max_batch"):
        resolve(parse("--config", str(file)), {})


@pytest.mark.parametrize("name", ["max_message_mb", "max_import_mb", "memory_budget_mb"])
def test_infinite_sizes_are_refused(name):
    """``inf`` passes the range checks but ``serve`` crashes on ``int(inf * 2**20)`` (OverflowError)."""
    with pytest.raises(ConfigError, match=name):
        resolve(parse(), {f"RULEWRIGHT_{name.upper()}": "inf"})


def _sample(setting) -> str:
    """A valid value for ``setting`` that differs from its default."""
    if setting.name == "bootstrap":
        return "none"
    if setting.name == "job_executor":
        return "ray"
    if setting.name == "default_alias":
        return "stable"
    if setting.name == "job_output_prefixes":
        return "s3://datasets/team-a,file:///srv/datasets"
    if setting.default is True or setting.default is False:
        return str(not setting.default).lower()
    if isinstance(setting.default, (int, float)):
        return str(setting.default + 3)
    if setting.name.endswith("address"):
        return "127.0.0.1:7777"
    return f"value-of-{setting.name}"


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: s.name)
def test_every_setting_reaches_its_field_by_flag_env_and_file(setting, tmp_path):
    text = _sample(setting)
    expected = setting.parse(text)
    assert expected != setting.default
    assert getattr(resolve(parse(setting.flag, text), {}), setting.name) == expected
    assert getattr(resolve(parse(), {setting.env: text}), setting.name) == expected
    file = write_toml(tmp_path / "serve.toml", f"{setting.name} = {json.dumps(text)}\n")
    assert getattr(resolve(parse("--config", str(file)), {}), setting.name) == expected


@pytest.mark.parametrize("value", ["Production", "3", "prod_1", "-x"])
def test_default_alias_must_be_an_alias_name(value):
    with pytest.raises(ConfigError, match="default_alias"):
        resolve(parse(), {"RULEWRIGHT_DEFAULT_ALIAS": value})


@pytest.mark.parametrize("value", ["datasets/team-a", "s3://", "http://example.com/x", "s3://b/x,file:/x"])
def test_job_output_prefixes_must_be_store_uris(value):
    with pytest.raises(ConfigError, match="job_output_prefixes"):
        resolve(parse(), {"RULEWRIGHT_JOB_OUTPUT_PREFIXES": value})


# ---- help --------------------------------------------------------------------------------------------


def test_serve_help_documents_every_setting(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    with pytest.raises(SystemExit) as exit_:
        server_main(["serve", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out and "RULEWRIGHT_CONFIG" in out
    for s in SETTINGS:
        assert s.help.strip(), s.name
        assert s.flag in out, s.flag
        assert f"${s.env}" in out, s.env
    assert len({s.flag for s in SETTINGS}) == len(SETTINGS) == len({s.env for s in SETTINGS})


# ---- command-line errors, in process --------------------------------------------------------------------


@pytest.fixture
def cli(monkeypatch, tmp_path, capsys):
    """Run ``rulewright`` in this process with no RULEWRIGHT_* environment; returns (rc, stderr lines).

    ``serve`` replaces the root log handlers and the SIGTERM/SIGINT handlers: both are restored. A
    timer sends SIGTERM after 30 s so a server that wrongly starts serving cannot hang the run.
    """
    for name in list(os.environ):
        if name.startswith("RULEWRIGHT_"):
            monkeypatch.delenv(name)
    root = logging.getLogger()
    saved_logging = (root.handlers[:], root.level)
    saved_signals = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    timer = threading.Timer(30, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()

    def run(*argv: str) -> tuple[int, list[str]]:
        capsys.readouterr()
        rc = server_main(["serve", "--data-dir", str(tmp_path / "data"), "--bootstrap", "none", *argv])
        return rc, capsys.readouterr().err.splitlines()

    yield run
    timer.cancel()
    for sig, handler in saved_signals.items():
        signal.signal(sig, handler)
    root.handlers[:], _ = saved_logging
    root.setLevel(saved_logging[1])


def one_error_line(lines: list[str]) -> str:
    assert len(lines) == 1, lines
    assert lines[0].startswith("rulewright: error: "), lines
    return lines[0]


def test_public_address_without_tokens_exits_2(cli):
    rc, err = cli("--address", "0.0.0.0:0")
    assert rc == 2
    line = one_error_line(err)
    assert "without auth" in line and "RULEWRIGHT_TOKENS" in line and "0.0.0.0:0" in line


def test_tls_cert_without_key_exits_2(cli, tmp_path):
    rc, err = cli("--tls-cert", str(tmp_path / "server.crt"))
    assert rc == 2
    assert "RULEWRIGHT_TLS_KEY" in one_error_line(err)


def test_client_ca_without_cert_exits_2(cli, tmp_path):
    rc, err = cli("--tls-client-ca", str(tmp_path / "ca.crt"))
    assert rc == 2
    assert "RULEWRIGHT_TLS_CERT" in one_error_line(err)


def test_max_batch_zero_exits_2(cli):
    rc, err = cli("--max-batch", "0")
    assert rc == 2
    assert "max_batch must be at least 1" in one_error_line(err)


def test_bad_env_value_exits_2(cli, monkeypatch):
    monkeypatch.setenv("RULEWRIGHT_MAX_BATCH", "many")
    rc, err = cli()
    assert rc == 2
    assert "RULEWRIGHT_MAX_BATCH" in one_error_line(err)


def test_unknown_registry_scheme_exits_2(cli):
    rc, err = cli("--registry-uri", "ftp://x")
    assert rc == 2
    line = one_error_line(err)
    assert "ftp://x" in line and "s3://" in line


def test_unknown_stats_cache_exits_2(cli):
    rc, err = cli("--stats-cache", "bogus://x")
    assert rc == 2
    assert "bogus://x" in one_error_line(err)


def test_busy_address_exits_2(cli):
    """gRPC raises RuntimeError (not OSError, and add_*_port never returns 0) when a port is taken."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        rc, err = cli("--address", f"127.0.0.1:{port}")
    assert rc == 2
    assert str(port) in one_error_line(err)


# ---- the real process ---------------------------------------------------------------------------------------


def rulewright_exe() -> Path:
    exe = Path(sys.executable).with_name("rulewright")
    if not exe.exists():
        missing(f"{exe} (pip install -e clients/python)")
    return exe


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RULEWRIGHT_")}
    env.update(extra)
    return env


def health_of(channel) -> int | None:
    try:
        return health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5).status
    except grpc.RpcError:
        return None


def wait_serving(channel, proc: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            _, err = proc.communicate(timeout=5)
            raise AssertionError(f"rulewright serve exited with {proc.returncode}:\n{err[-3000:]}")
        if health_of(channel) == SERVING:
            return
        time.sleep(0.2)
    raise AssertionError("rulewright serve did not go SERVING in time")


def stop(proc: subprocess.Popen, sig: int) -> list[dict]:
    """Send ``sig``; the exit code must be 0 within 30 s. Returns the stderr log records.

    Every stderr line is a JSON object, except gRPC C-core's own log lines (``I1127 21:32:08.746967
    17862 ssl_transport_security.cc:2563] Handshake failed ...``), which Python logging never sees.
    """
    proc.send_signal(sig)
    assert proc.wait(timeout=30) == 0
    _, err = proc.communicate(timeout=5)
    records = []
    for line in err.splitlines():
        if not line.strip() or GRPC_CORE_LINE.match(line):
            continue
        try:
            records.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"stderr line is not JSON: {line!r}") from None
    return records


def by_event(records: list[dict]) -> dict[str, dict]:
    return {r["event"]: r for r in records if "event" in r}


@pytest.fixture
def reaper():
    procs: list[subprocess.Popen] = []
    yield procs.append
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_rulewright_serve_with_mtls_metrics_s3_and_redis(tmp_path, cache_dir, faces_path, moto_server, redis_url,
                                                        reaper):
    import boto3

    from rulewright.service.server.tls import channel_credentials
    from tests.certs import write_pki

    pki = write_pki(tmp_path / "pki")
    s3 = moto_server.config()
    bucket = f"serve-{uuid.uuid4().hex[:12]}"
    port, metrics_port = free_port(), free_port()
    config_file = write_toml(tmp_path / "serve.toml", 'grace_s = 5\ndevice = "cpu"\nmax_batch = 2\n')
    env = clean_env(RULEWRIGHT_REGISTRY_URI=f"s3://{bucket}/registry", RULEWRIGHT_CREATE_BUCKET="true",
                    RULEWRIGHT_STATS_CACHE=redis_url, RULEWRIGHT_S3_ENDPOINT=s3.endpoint,
                    RULEWRIGHT_S3_ACCESS_KEY=s3.access_key, RULEWRIGHT_S3_SECRET_KEY=s3.secret_key,
                    RULEWRIGHT_S3_SECURE="false", RULEWRIGHT_CONFIG=str(config_file),
                    RULEWRIGHT_DYNAMIC_BATCHING="off")
    proc = subprocess.Popen(
        [str(rulewright_exe()), "serve", "--data-dir", str(tmp_path / "data"), "--address", f"127.0.0.1:{port}",
         "--cache-dir", str(cache_dir), "--metrics-address", f"127.0.0.1:{metrics_port}",
         "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key), "--tls-client-ca", str(pki.ca),
         "--max-batch", "8"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    reaper(proc)
    creds = channel_credentials(pki.ca, pki.client_cert, pki.client_key)
    with grpc.secure_channel(f"127.0.0.1:{port}", creds) as ch:
        wait_serving(ch, proc)
        r = gen_grpc.GeneratorServiceStub(ch).Sample(gen.SampleRequest(model="faces", seeds=[0, 1]), timeout=30)
        assert r.version == "models/faces/versions/1"
        assert len(r.images) == 2
        for image, seed in zip(r.images, (0, 1)):
            assert image.format == images_pb2.IMAGE_FORMAT_PNG and image.data.startswith(PNG_MAGIC)
            assert (image.width, image.height, image.seed) == (64, 64, seed)
        models = reg_grpc.RegistryServiceStub(ch).ListModels(reg.ListModelsRequest(), timeout=10).models
        assert [m.name for m in models] == ["models/faces"]

    # mutual TLS: a client without a certificate is turned away at the handshake
    with grpc.secure_channel(f"127.0.0.1:{port}", channel_credentials(pki.ca)) as ch:
        assert health_of(ch) is None
    with grpc.secure_channel(f"127.0.0.1:{port}", channel_credentials(pki.ca, pki.other_client_cert,
                                                                       pki.other_client_key)) as ch:
        assert health_of(ch) is None

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    samples = [line for line in text.splitlines() if line.startswith("rulewright_requests_total{")]
    ok = [line for line in samples if 'rpc="GeneratorService/Sample"' in line and 'code="OK"' in line]
    assert len(ok) == 1 and float(ok[0].rsplit(" ", 1)[1]) == 1.0, samples

    client = boto3.client("s3", endpoint_url=s3.endpoint_url(), aws_access_key_id=s3.access_key,
                          aws_secret_access_key=s3.secret_key, region_name=s3.region)
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert keys and all(k.startswith("registry/") for k in keys), keys
    assert "registry/docs/models/faces/model.json" in keys, keys
    assert "registry/docs/models/faces/versions/0000000001.json" in keys, keys
    assert any(k.startswith("registry/blobs/sha256/") for k in keys), keys
    from rulewright.registry import Registry

    with Registry.open(f"s3://{bucket}/registry", s3=s3) as registry:
        assert [m.name for m in registry.list_models().items] == ["faces"]
        assert registry.resolve("faces@production").number == 1
    assert not (tmp_path / "data" / "registry").exists()     # the S3 registry, not the embedded one

    records = stop(proc, signal.SIGTERM)
    events = by_event(records)
    order = [r["event"] for r in records if "event" in r]
    for name in ("listening", "bootstrapped", "serving", "shutdown", "stopped"):
        assert name in events, order
    assert order.index("listening") < order.index("bootstrapped") < order.index("serving") < order.index("stopped")
    listening = events["listening"]
    assert listening["tls"] == "mutual" and listening["auth"] is False and listening["port"] == port
    assert listening["registry"] == f"s3://{bucket}/registry"
    assert listening["stats_cache"] == redis_url
    assert listening["max_batch"] == 8                  # flag over the file's 2
    assert listening["dynamic_batching"] is False       # env
    assert listening["device"] == "cpu"                 # file
    assert events["shutdown"]["grace_s"] == 5.0         # file
    assert (events["bootstrapped"]["model"], events["bootstrapped"]["version"]) == ("faces", 1)
    assert events["metrics"]["port"] == metrics_port
    assert all(r["level"] in ("info", "debug") for r in records), [r for r in records if r["level"] != "info"]


def test_rulewright_serve_bootstrap_none_serves_an_empty_registry(tmp_path, reaper):
    port = free_port()
    empty_cache = tmp_path / "cache"
    empty_cache.mkdir()
    env = clean_env(RULEWRIGHT_CACHE_DIR=str(empty_cache), RULEWRIGHT_BOOTSTRAP="faces")
    proc = subprocess.Popen(
        [str(rulewright_exe()), "serve", "--bootstrap", "none", "--data-dir", str(tmp_path / "data"),
         "--address", f"127.0.0.1:{port}", "--cache-dir", str(empty_cache), "--device", "cpu"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    reaper(proc)
    with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
        wait_serving(ch, proc, timeout_s=30)
        assert list(reg_grpc.RegistryServiceStub(ch).ListModels(reg.ListModelsRequest(), timeout=10).models) == []
        with pytest.raises(grpc.RpcError) as err:
            gen_grpc.GeneratorServiceStub(ch).Sample(gen.SampleRequest(model="faces", seeds=[0]), timeout=10)
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert list(empty_cache.iterdir()) == []                 # the faces model was never fetched
    assert (tmp_path / "data" / "registry").is_dir()         # the embedded filesystem registry
    events = by_event(stop(proc, signal.SIGINT))
    assert "bootstrapped" not in events
    assert {"listening", "serving", "stopped"} <= set(events)
    assert events["listening"]["tls"] is False and events["listening"]["registry"].startswith("file://")


def test_configuration_page_documents_every_setting():
    page = (Path(__file__).resolve().parents[2] / "docs" / "configuration.md").read_text()
    for s in SETTINGS:
        assert f"| `{s.flag}` | `{s.env}` |" in page, s.name
