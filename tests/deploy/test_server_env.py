"""The real server process, started with the environment the Kubernetes manifests give the pod.

The cpu overlay is rendered; the container's environment is taken as the kubelet builds it
(image ENV, then the Deployment's env with ConfigMap and Secret references resolved and
$(REDIS_PASSWORD) expanded). Only what cannot be the same on this machine is replaced: the
MinIO and Redis host:port (by the test servers'), the listening ports, and the image's paths.
The server must go SERVING, answer a Sample with a token from the example Secret, use Redis
(with the Secret's password) for statistics and S3 for the registry, pass the image's
HEALTHCHECK, serve metrics, and drain within the pod's termination grace period.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from rulewright.service.server.auth import load_tokens
from rulewright.v1 import generator_service_pb2 as gen, generator_service_pb2_grpc as gen_grpc
from rulewright.v1 import images_pb2
from tests.deploy.manifests import DEPLOY, container, container_env, image_command, image_env, one, render
from tests.support import free_port, missing

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def password_redis(tmp_path):
    """A redis-server that, like the manifests' Redis, requires the Secret's password."""
    import shutil

    from tests.backends import RedisServer

    binary = shutil.which("redis-server")
    if binary is None:
        missing("redis-server")
    server = RedisServer(binary, tmp_path)
    server.start()
    yield server
    server.stop()


def token_for(tokens: str, role: str) -> str:
    secret = next(t.secret for t in load_tokens(text=tokens) if t.role == role)
    return secret.decode() if isinstance(secret, bytes) else secret


def wait_serving(port: int, proc: subprocess.Popen, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"server exited with {proc.returncode}:\n{proc.communicate()[1][-3000:]}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise AssertionError("the server did not go SERVING in time")


def healthcheck(env: dict[str, str]) -> subprocess.CompletedProcess:
    """The image's HEALTHCHECK command, with the container's environment."""
    return subprocess.run([sys.executable, str(DEPLOY / "healthcheck.py")], env=env, capture_output=True,
                          text=True, timeout=30)


def test_server_runs_with_the_manifests_environment(tmp_path, cache_dir, faces_path, moto_server, password_redis):
    import boto3
    import redis

    objects = render("overlays/cpu")
    manifest_env = container_env(objects)
    image = {k: v for k, v in image_env().items() if k.startswith("RULEWRIGHT_")}
    pod_env = {**image, **manifest_env}          # the Deployment's env overrides the image's ENV

    s3 = moto_server.config()
    grpc_port, metrics_port = free_port(), free_port()
    redis_password = pod_env["REDIS_PASSWORD"]
    redis.Redis(port=password_redis.port).config_set("requirepass", redis_password)

    # Every replacement, each one host:port or path; nothing else may change.
    replace = {
        "RULEWRIGHT_S3_ENDPOINT": ("rulewright-minio:9000", s3.endpoint),
        "RULEWRIGHT_STATS_CACHE": ("@rulewright-redis:6379/", f"@127.0.0.1:{password_redis.port}/"),
        "RULEWRIGHT_ADDRESS": (":50051", f":{grpc_port}"),
        "RULEWRIGHT_METRICS_ADDRESS": (":9464", f":{metrics_port}"),
        "RULEWRIGHT_CACHE_DIR": ("/opt/rulewright/cache", str(cache_dir)),
        "RULEWRIGHT_DATA_DIR": ("/home/rulewright/data", str(tmp_path / "data")),
    }
    env = dict(pod_env)
    for name, (old, new) in replace.items():
        assert old in env[name], (name, env[name])
        env[name] = env[name].replace(old, new)
    assert set(env) == set(pod_env)
    assert {k for k in env if env[k] != pod_env[k]} == set(replace)
    # The pod's password and bucket are used unchanged against the test servers.
    assert env["RULEWRIGHT_STATS_CACHE"] == f"redis://:{redis_password}@127.0.0.1:{password_redis.port}/0"
    assert env["RULEWRIGHT_ADDRESS"].startswith("0.0.0.0:")       # public: auth must be on
    assert env["RULEWRIGHT_CREATE_BUCKET"] == "false"

    # What the create-bucket Job does in the cluster.
    bucket = env["RULEWRIGHT_REGISTRY_URI"].removeprefix("s3://").split("/")[0]
    client = boto3.client("s3", endpoint_url=s3.endpoint_url(), aws_access_key_id=s3.access_key,
                          aws_secret_access_key=s3.secret_key, region_name=s3.region)
    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass

    # moto accepts any key pair; the container's are the Secret's placeholders.
    assert env["RULEWRIGHT_S3_ACCESS_KEY"].startswith("replace-me")
    process_env = {**env, "PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}
    command = image_command()
    proc = subprocess.Popen([str(Path(sys.executable).with_name(command[0])), *command[1:]], env=process_env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        assert healthcheck(process_env).returncode == 1       # nothing serving yet, or NOT_SERVING
        wait_serving(grpc_port, proc)
        check = healthcheck(process_env)
        assert check.returncode == 0, check.stderr

        tokens = env["RULEWRIGHT_TOKENS"]
        with grpc.insecure_channel(f"127.0.0.1:{grpc_port}") as channel:
            stub = gen_grpc.GeneratorServiceStub(channel)
            with pytest.raises(grpc.RpcError) as err:                      # auth is on
                stub.Sample(gen.SampleRequest(model="faces", seeds=[0]), timeout=60)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
            reader = (("authorization", f"Bearer {token_for(tokens, 'reader')}"),)
            r = stub.Sample(gen.SampleRequest(model="faces", seeds=[0]), metadata=reader, timeout=60)
            assert r.version == "models/faces/versions/1"
            assert len(r.images) == 1 and r.images[0].format == images_pb2.IMAGE_FORMAT_PNG
            assert r.images[0].data.startswith(PNG_MAGIC) and (r.images[0].width, r.images[0].height) == (64, 64)

            # The statistics land in the password-protected Redis the URL was composed for.
            editor = (("authorization", f"Bearer {token_for(tokens, 'editor')}"),)
            events = list(stub.ComputeStatistics(gen.ComputeStatisticsRequest(
                model="faces", stats={"samples": 32}), metadata=editor, timeout=120))
            assert events[-1].HasField("result")
        assert redis.Redis(port=password_redis.port, password=redis_password).dbsize() > 0

        keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket).get("Contents", [])]
        prefix = env["RULEWRIGHT_REGISTRY_URI"].removeprefix(f"s3://{bucket}/")
        assert f"{prefix}/docs/models/faces/model.json" in keys, keys
        assert not (tmp_path / "data").exists()                        # no embedded registry

        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as resp:
            assert 'rulewright_requests_total{code="OK",rpc="GeneratorService/Sample"}' in resp.read().decode()

        # SIGTERM (after the preStop sleep) must end in time for the kubelet's SIGKILL.
        budget = one(objects, "Deployment", "rulewright")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        pre_stop = float(container(objects)["lifecycle"]["preStop"]["exec"]["command"][1])
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=budget - pre_stop) == 0
        assert time.monotonic() - started < budget - pre_stop
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
