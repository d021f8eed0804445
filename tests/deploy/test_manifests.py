"""The deployment files, read as Kubernetes, Docker and Compose would (no cluster, no Docker).

- Both overlays render; the Deployment's probes, ports, grace period, security context,
  resources; the headless Service, metrics annotations, PDB and HPA agree with it.
- The GPU overlay differs from the CPU one only in the device, the GPU request and placement.
- Every RULEWRIGHT_* variable (manifests, image, compose) is one the server reads, and the
  whole environment resolves to valid settings.
- compose.yaml sets the same settings as the Kubernetes manifests.
- The Dockerfile installs in the project's order and runs as a non-root user.
- deploy/check.py passes, and fails on a manifest with an unknown field.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys

import pytest

from rulewright.service.server.auth import load_tokens
from rulewright.service.server.config import resolve
from tests.deploy.manifests import (DEPLOY, KNOWN_ENV, compose, compose_env, container, container_env, find,
                                    image_command, image_env, one, render, secret_data, _dockerfile_instructions)

OVERLAYS = ("cpu", "gpu")


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {name: render(f"overlays/{name}") for name in OVERLAYS}


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


def deployment_spec(objects):
    return one(objects, "Deployment", "rulewright")["spec"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_has_every_object_of_a_self_contained_install(rendered, overlay):
    objects = rendered[overlay]
    kinds = {(o["kind"], o["metadata"]["name"].rsplit("-", 1)[0] if o["kind"] == "ConfigMap"
              else o["metadata"]["name"]) for o in objects}
    for expected in [("Deployment", "rulewright"), ("Service", "rulewright-grpc"), ("Service", "rulewright-metrics"),
                     ("ConfigMap", "rulewright-config"), ("Secret", "rulewright-s3"), ("Secret", "rulewright-redis"),
                     ("Secret", "rulewright-tokens"), ("PodDisruptionBudget", "rulewright"),
                     ("HorizontalPodAutoscaler", "rulewright"), ("StatefulSet", "rulewright-minio"),
                     ("StatefulSet", "rulewright-redis"), ("Job", "rulewright-create-bucket"),
                     ("ServiceAccount", "rulewright")]:
        assert expected in kinds, expected
    # One namespace for everything, so the Service names in the settings resolve.
    assert {o["metadata"].get("namespace") for o in objects} == {"rulewright"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_and_ports_follow_the_listening_address(rendered, overlay):
    objects = rendered[overlay]
    env = container_env(objects)
    c = container(objects)
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports["grpc"] == port_of(env["RULEWRIGHT_ADDRESS"])
    assert ports["metrics"] == port_of(env["RULEWRIGHT_METRICS_ADDRESS"])
    # Probes go through grpc.health.v1, which stays NOT_SERVING until the model is loaded.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["grpc"]["port"] == ports["grpc"], probe
    # A slow first load must not trip the liveness probe: the startup probe allows minutes.
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120

    template = deployment_spec(objects)["template"]
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == ports["metrics"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_termination_grace_covers_pre_stop_and_drain(rendered, overlay):
    objects = rendered[overlay]
    env = container_env(objects)
    grace_s = float(env["RULEWRIGHT_GRACE_S"])
    pre_stop = container(objects)["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    budget = deployment_spec(objects)["template"]["spec"]["terminationGracePeriodSeconds"]
    # SIGKILL arrives after the budget: sleep + drain must end before it, with a margin.
    assert budget >= float(pre_stop[1]) + grace_s + 5, (budget, pre_stop, grace_s)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pods_run_restricted(rendered, overlay):
    objects = rendered[overlay]
    pod = deployment_spec(objects)["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    sc = container(objects)["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
    assert sc["capabilities"]["drop"] == ["ALL"]
    # Read-only root: large uploads spool to /tmp, which must be a volume.
    assert "/tmp" in {m["mountPath"] for m in container(objects)["volumeMounts"]}
    # The image's numeric USER is what runAsNonRoot can verify.
    user = [rest for word, rest in _dockerfile_instructions() if word == "USER"][-1]
    assert user.split(":")[0] in ("${UID}", str(pod["securityContext"]["runAsUser"]))
    for kind in ("StatefulSet", "Job"):
        for workload in find(objects, kind):
            spec = workload["spec"]["template"]["spec"]
            assert spec["securityContext"]["runAsNonRoot"] is True, workload["metadata"]["name"]
            for c in spec["containers"]:
                assert c["securityContext"]["allowPrivilegeEscalation"] is False, workload["metadata"]["name"]


def test_gpu_overlay_requests_a_gpu_on_gpu_nodes(rendered):
    gpu, cpu = rendered["gpu"], rendered["cpu"]
    resources = container(gpu)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "1"
    pod = deployment_spec(gpu)["template"]["spec"]
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert resources["requests"]["cpu"] and resources["requests"]["memory"]

    cpu_pod = deployment_spec(cpu)["template"]["spec"]
    assert "nvidia.com/gpu" not in container(cpu)["resources"].get("limits", {})
    assert "nodeSelector" not in cpu_pod and "tolerations" not in cpu_pod
    assert container(cpu)["resources"]["requests"]["cpu"]


def test_gpu_environment_differs_from_cpu_only_in_the_device(rendered):
    cpu, gpu = container_env(rendered["cpu"]), container_env(rendered["gpu"])
    assert set(cpu) == set(gpu)
    differ = {k for k in cpu if cpu[k] != gpu[k]}
    assert differ == {"RULEWRIGHT_DEVICE"}
    assert (cpu["RULEWRIGHT_DEVICE"], gpu["RULEWRIGHT_DEVICE"]) == ("cpu", "cuda")
    assert container(rendered["gpu"])["image"].endswith("-cuda")
    assert container(rendered["cpu"])["image"].endswith("-cpu")


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_environment_is_known_settings_that_resolve(rendered, overlay):
    env = container_env(rendered[overlay])
    names = {k for k in env if k.startswith("RULEWRIGHT_")}
    assert names <= KNOWN_ENV, names - KNOWN_ENV
    # The only other variable is the one RULEWRIGHT_STATS_CACHE is composed from.
    assert set(env) - names == {"REDIS_PASSWORD"}
    assert "$(" not in "".join(env.values())
    merged = {**{k: v for k, v in image_env().items() if k.startswith("RULEWRIGHT_")}, **env}
    config = resolve(None, merged)
    assert config.registry_uri.startswith("s3://") and config.stats_cache.startswith("redis://")
    assert config.create_bucket is False            # the create-bucket Job makes it
    assert config.stats_cache == f"redis://:{env['REDIS_PASSWORD']}@rulewright-redis:6379/0"
    # A public address needs tokens: the secret's must parse and cover every role.
    assert {t.role for t in load_tokens(text=env["RULEWRIGHT_TOKENS"])} == {"admin", "editor", "reader"}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_settings_point_at_the_services_that_exist(rendered, overlay):
    objects = rendered[overlay]
    env = container_env(objects)
    minio = one(objects, "Service", "rulewright-minio")
    host, _, port = env["RULEWRIGHT_S3_ENDPOINT"].partition(":")
    assert host == minio["metadata"]["name"] and int(port) in {p["port"] for p in minio["spec"]["ports"]}
    redis = one(objects, "Service", "rulewright-redis")
    assert f"@{redis['metadata']['name']}:{redis['spec']['ports'][0]['port']}/" in env["RULEWRIGHT_STATS_CACHE"]
    # The Job creates the bucket the registry URI names, on the same MinIO, with the same keys.
    job_env = container_env(objects, container(objects, "rulewright-create-bucket", kind="Job"))
    bucket = env["RULEWRIGHT_REGISTRY_URI"].removeprefix("s3://").split("/")[0]
    job = container(objects, "rulewright-create-bucket", kind="Job")
    assert job["args"][-1] == f"registry/{bucket}"
    assert job_env["MC_HOST_registry"] == (f"http://{env['RULEWRIGHT_S3_ACCESS_KEY']}:"
                                           f"{env['RULEWRIGHT_S3_SECRET_KEY']}@{env['RULEWRIGHT_S3_ENDPOINT']}")
    minio_env = container_env(objects, container(objects, "rulewright-minio", kind="StatefulSet"))
    assert (minio_env["MINIO_ROOT_USER"], minio_env["MINIO_ROOT_PASSWORD"]) == (
        env["RULEWRIGHT_S3_ACCESS_KEY"], env["RULEWRIGHT_S3_SECRET_KEY"])
    redis_env = container_env(objects, container(objects, "rulewright-redis", kind="StatefulSet"))
    assert redis_env["REDIS_PASSWORD"] == env["REDIS_PASSWORD"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_pdb_and_hpa_match_the_deployment(rendered, overlay):
    objects = rendered[overlay]
    spec = deployment_spec(objects)
    labels = spec["template"]["metadata"]["labels"]
    grpc = one(objects, "Service", "rulewright-grpc")["spec"]
    # Headless: DNS lists every ready pod, for client-side round-robin per call.
    assert grpc["clusterIP"] == "None"
    assert grpc["ports"][0]["targetPort"] == "grpc"
    for selector in (grpc["selector"], one(objects, "Service", "rulewright-metrics")["spec"]["selector"],
                     one(objects, "PodDisruptionBudget", "rulewright")["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    hpa = one(objects, "HorizontalPodAutoscaler", "rulewright")["spec"]
    assert (hpa["scaleTargetRef"]["kind"], hpa["scaleTargetRef"]["name"]) == ("Deployment", "rulewright")
    pdb = one(objects, "PodDisruptionBudget", "rulewright")["spec"]
    # A drain can always evict one pod: the autoscaler's floor stays above the budget's.
    assert hpa["minReplicas"] > pdb["minAvailable"]
    # The autoscaler owns the replica count; a fixed one would be reset by every apply.
    assert "replicas" not in spec
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def test_example_secrets_are_marked_replace_me(rendered):
    for secret in find(rendered["cpu"], "Secret"):
        assert secret["metadata"]["labels"]["rulewright.dev/example"] == "replace-me"
        for key, value in secret_data(secret).items():
            assert "replace-me" in value, (secret["metadata"]["name"], key)


def test_compose_sets_the_same_settings_as_kubernetes(rendered):
    k8s = container_env(rendered["cpu"])
    env = compose_env()
    assert set(env) <= KNOWN_ENV, set(env) - KNOWN_ENV
    # Same names and, with compose's placeholder defaults, the same values as the example secrets.
    assert env == {k: v for k, v in k8s.items() if k.startswith("RULEWRIGHT_")}
    # An operator's values replace the placeholders everywhere they are used.
    chosen = compose_env(environ={"REDIS_PASSWORD": "pw1", "S3_ACCESS_KEY": "ak", "S3_SECRET_KEY": "sk12345678"})
    assert chosen["RULEWRIGHT_STATS_CACHE"] == "redis://:pw1@rulewright-redis:6379/0"
    assert (chosen["RULEWRIGHT_S3_ACCESS_KEY"], chosen["RULEWRIGHT_S3_SECRET_KEY"]) == ("ak", "sk12345678")
    services = compose()["services"]
    assert services["rulewright"]["depends_on"]["create-bucket"]["condition"] == "service_completed_successfully"
    assert services["create-bucket"]["command"][-1] == "registry/rulewright"
    stop_grace = int(services["rulewright"]["stop_grace_period"].rstrip("s"))
    assert stop_grace > float(env["RULEWRIGHT_GRACE_S"])
    gpu = compose("compose.gpu.yaml")["services"]["rulewright"]
    assert set(gpu["environment"]) == {"RULEWRIGHT_DEVICE"} and gpu["environment"]["RULEWRIGHT_DEVICE"] == "cuda"


def test_image_environment_and_command():
    env = image_env()
    assert {k for k in env if k.startswith("RULEWRIGHT_")} <= KNOWN_ENV
    assert resolve(None, {k: v for k, v in env.items() if k.startswith("RULEWRIGHT_")}).address == "0.0.0.0:50051"
    assert image_command() == ["rulewright-engine", "serve"]
    healthcheck = [rest for word, rest in _dockerfile_instructions() if word == "HEALTHCHECK"]
    assert len(healthcheck) == 1 and "/opt/rulewright/healthcheck.py" in healthcheck[0]


def test_dockerfile_installs_torch_first_then_stubs_client_server():
    runs = [rest for word, rest in _dockerfile_instructions() if word == "RUN"]
    order = []
    for marker in (r'"torch==\$\{TORCH_VERSION\}"', r"pip install \./protos\b", r"pip install \./clients/python\b",
                   r"pip install \.(\s|$)", r"rulewright-engine import-faces"):
        order.append(next(i for i, run in enumerate(runs) if re.search(marker, run)))
    assert order == sorted(order), order
    text = (DEPLOY / "Dockerfile").read_text()
    assert "https://download.pytorch.org/whl/cu12" in text and "https://download.pytorch.org/whl/cpu" in text
    assert "ARG VARIANT=gpu" in text and "FROM base-${VARIANT}" in text


def _check(path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(path)], capture_output=True, text=True, timeout=120)


def test_deploy_check_passes():
    if shutil.which("kubectl") is None:
        from tests.support import missing

        missing("kubectl (with kustomize)")
    proc = _check(DEPLOY / "check.py")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "deploy-check: ok" in proc.stdout


def test_deploy_check_fails_on_an_unknown_field(tmp_path):
    """A misspelt field is silently dropped by a lenient apply; the strict schemas must refuse it."""
    if shutil.which("kubectl") is None:
        from tests.support import missing

        missing("kubectl (with kustomize)")
    copy = tmp_path / "deploy"
    shutil.copytree(DEPLOY, copy)
    pdb = copy / "k8s" / "base" / "pdb.yaml"
    pdb.write_text(pdb.read_text().replace("minAvailable: 1", "minAvailable: 1\n  maxUnavailabel: 1"))
    proc = _check(copy / "check.py")
    assert proc.returncode == 1
    assert "maxUnavailabel" in proc.stderr and "PodDisruptionBudget/rulewright" in proc.stderr


def test_ray_component_points_the_server_at_its_ray_cluster():
    """overlays/gpu-ray: the server's Ray address is the RayCluster head's Service, its shards in
    flight fill the workers the autoscaler may start, and the workers reach the server's registry."""
    from tests.deploy.manifests import container_env

    objects = render("overlays/gpu-ray")
    cluster = one(objects, "RayCluster", "rulewright-ray")
    env = container_env(objects)
    assert env["RULEWRIGHT_JOB_EXECUTOR"] == "ray"
    assert env["RULEWRIGHT_RAY_ADDRESS"] == f"ray://{cluster['metadata']['name']}-head-svc:10001"
    (workers,) = cluster["spec"]["workerGroupSpecs"]
    assert int(env["RULEWRIGHT_JOB_WORKERS"]) == workers["maxReplicas"]
    assert float(env["RULEWRIGHT_RAY_GPUS_PER_SHARD"]) == \
        float(workers["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    worker_env = {e["name"]: e.get("value", e.get("valueFrom")) for e in workers["template"]["spec"]["containers"][0]["env"]}
    for name in ("RULEWRIGHT_S3_ENDPOINT", "RULEWRIGHT_S3_SECURE", "RULEWRIGHT_S3_REGION", "RULEWRIGHT_S3_ADDRESSING_STYLE"):
        assert worker_env[name] == env[name], name
    assert cluster["spec"]["rayVersion"] in (DEPLOY / "Dockerfile").read_text()     # the image's Ray
    server = one(objects, "Deployment", "rulewright")["spec"]["template"]["spec"]["containers"][0]
    assert {c["image"] for c in workers["template"]["spec"]["containers"]} == {server["image"]}
