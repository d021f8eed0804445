"""Reading deploy/ the way Kubernetes, Docker and Compose would, for the tests of tests/deploy.

- ``render(kustomization)``: ``kubectl kustomize`` output as objects (missing kubectl: see
  tests.support.missing).
- ``container_env(objects)``: the rulewright container's environment as the kubelet builds it:
  ConfigMap and Secret references resolved from the rendered objects, ``$(VAR)`` expanded.
- ``image_env()``, ``image_command()``: ENV and ENTRYPOINT + CMD of the Dockerfile's final stage.
- ``compose_env()``: the compose service's environment after interpolation with the defaults.
- ``KNOWN_ENV``: every ``RULEWRIGHT_*`` name the server reads.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import yaml

from rulewright.service.server.config import SETTINGS
from tests.support import missing

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
K8S = DEPLOY / "k8s"

# config.py's settings, plus what is read only from the environment (registry/s3store.py's S3
# connection, server/auth.py's tokens, config.py's --config file).
KNOWN_ENV = {s.env for s in SETTINGS} | {
    "RULEWRIGHT_S3_ENDPOINT", "RULEWRIGHT_S3_ACCESS_KEY", "RULEWRIGHT_S3_SECRET_KEY", "RULEWRIGHT_S3_REGION",
    "RULEWRIGHT_S3_SECURE", "RULEWRIGHT_S3_CA_BUNDLE", "RULEWRIGHT_S3_ADDRESSING_STYLE",
    "RULEWRIGHT_TOKENS", "RULEWRIGHT_CONFIG",
}


def kubectl() -> str:
    found = shutil.which("kubectl")
    if found is None:
        missing("kubectl (with kustomize)")
    return found


def render(kustomization: str) -> list[dict]:
    proc = subprocess.run([kubectl(), "kustomize", str(K8S / kustomization)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    return [doc for doc in yaml.safe_load_all(proc.stdout) if doc]


def find(objects: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objects if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objects: list[dict], kind: str, name: str) -> dict:
    found = find(objects, kind, name)
    assert len(found) == 1, f"{kind}/{name}: {len(found)} objects"
    return found[0]


def container(objects: list[dict], workload: str = "rulewright", kind: str = "Deployment",
              name: str | None = None) -> dict:
    spec = one(objects, kind, workload)["spec"]["template"]["spec"]
    containers = spec["containers"]
    return next(c for c in containers if c["name"] == (name or containers[0]["name"]))


_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(value: str, defined: dict[str, str]) -> str:
    """Kubernetes' dependent variables: $(NAME) of an earlier entry, $$ escapes, unknown kept."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return defined.get(m.group(1), m.group(0))
    return _REF.sub(sub, value)


def secret_data(secret: dict) -> dict[str, str]:
    data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
    data.update(secret.get("stringData") or {})
    return data


def container_env(objects: list[dict], c: dict | None = None) -> dict[str, str]:
    """The environment the kubelet gives container ``c`` (default: the rulewright server's)."""
    c = c if c is not None else container(objects)
    assert not c.get("envFrom"), "envFrom is not resolved here; use env entries"
    maps = {o["metadata"]["name"]: o.get("data") or {} for o in find(objects, "ConfigMap")}
    secrets = {o["metadata"]["name"]: secret_data(o) for o in find(objects, "Secret")}
    env: dict[str, str] = {}
    for entry in c.get("env", []):
        name = entry["name"]
        if "value" in entry:
            env[name] = expand(str(entry["value"]), env)
            continue
        source = entry["valueFrom"]
        if "configMapKeyRef" in source:
            ref, table, what = source["configMapKeyRef"], maps, "ConfigMap"
        elif "secretKeyRef" in source:
            ref, table, what = source["secretKeyRef"], secrets, "Secret"
        else:
            raise AssertionError(f"{name}: unsupported valueFrom {source}")
        assert ref["name"] in table, f"{name}: {what} {ref['name']} is not in the rendered objects"
        assert ref["key"] in table[ref["name"]], f"{name}: {what} {ref['name']} has no key {ref['key']}"
        env[name] = table[ref["name"]][ref["key"]]
    return env


def _dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of every instruction, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for line in (DEPLOY / "Dockerfile").read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = (pending + line).strip()
        pending = ""
        word, _, rest = text.partition(" ")
        out.append((word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    instructions = _dockerfile_instructions()
    last = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last:]


def image_env() -> dict[str, str]:
    """The final stage's ENV (its own; ``$NAME`` references are left as written)."""
    env: dict[str, str] = {}
    for word, rest in final_stage():
        if word == "ENV":
            for item in shlex.split(rest):
                key, _, value = item.partition("=")
                env[key] = value
    return env


def image_command() -> list[str]:
    """ENTRYPOINT followed by CMD of the final stage (exec form only)."""
    parts = {word: json.loads(rest) for word, rest in final_stage() if word in ("ENTRYPOINT", "CMD")}
    return parts.get("ENTRYPOINT", []) + parts.get("CMD", [])


def compose(name: str = "compose.yaml") -> dict:
    return yaml.safe_load((DEPLOY / name).read_text())


_INTERPOLATION = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}")


def interpolate(value: str, environ: dict[str, str]) -> str:
    """Compose's ${NAME}, ${NAME:-default} and $$ (the subset compose.yaml uses)."""
    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        return environ.get(m.group(1)) or (m.group(2) or "")
    return _INTERPOLATION.sub(sub, value)


def compose_env(service: str = "rulewright", environ: dict[str, str] | None = None) -> dict[str, str]:
    env = compose()["services"][service]["environment"]
    assert isinstance(env, dict), "environment as a mapping"
    return {k: interpolate(str(v), environ or {}) for k, v in env.items()}
