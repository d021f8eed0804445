"""Server construction, apart from the servicers: message sizes, health, reflection, shutdown, logs.

- ``create_server(domain, address="127.0.0.1:0", ...) -> (server, port)``: a started gRPC server
  with both services, ``grpc.health.v1`` and reflection; port 0 binds a free port (tests).
  ``tokens`` (``auth.Token`` entries) turn bearer-token auth on; without them the address must
  be loopback (``auth.AuthConfigError`` otherwise).
- ``serve(data_dir, address, device, grace_s, tokens=...)``: the embedded default: opens the
  domain under ``data_dir``, starts NOT_SERVING, bootstraps the faces model, goes SERVING, and on SIGTERM or
  SIGINT goes NOT_SERVING and stops with a grace period. Returns the exit status.
- ``JsonFormatter`` / ``configure_logging()``: one JSON object per log line.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import signal
import sys
import threading
from concurrent import futures
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from rulewright.v1 import generator_service_pb2 as gen, generator_service_pb2_grpc as gen_grpc
from rulewright.v1 import registry_service_pb2 as reg, registry_service_pb2_grpc as reg_grpc

from .auth import AuthInterceptor, check_auth_config
from .servicers import GeneratorServicer, RegistryServicer

log = logging.getLogger(__name__)

MAX_MESSAGE_BYTES = 64 << 20      # requests and responses (a 64-image PNG album fits easily)
GRACE_S = 10.0                    # in-flight RPCs get this long on shutdown
SERVICES = (gen.DESCRIPTOR.services_by_name["GeneratorService"].full_name,
            reg.DESCRIPTOR.services_by_name["RegistryService"].full_name)


def set_health(servicer: health.HealthServicer, serving: bool) -> None:
    """Mark the server and each service SERVING or NOT_SERVING."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("",) + SERVICES:
        servicer.set(name, status)


def create_server(
    domain,                                     # the domain layer the servicers call
    address: str = "127.0.0.1:0",              # host:port; port 0 picks a free one
    max_message_bytes: int = MAX_MESSAGE_BYTES,  # largest request and response accepted
    max_workers: int = 16,                      # concurrent RPCs
    health_servicer: health.HealthServicer | None = None,  # None: SERVING if a model is registered
    tokens=None,                                # auth.Token entries; None or empty: auth off (loopback only)
) -> tuple[grpc.Server, int]:
    """A started server with GeneratorService, RegistryService, health and reflection."""
    check_auth_config(address, tokens)
    interceptors = [AuthInterceptor(tokens)] if tokens else []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="rpc"),
                         interceptors=interceptors, options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
    ])
    server.generator_servicer = GeneratorServicer(domain)
    gen_grpc.add_GeneratorServiceServicer_to_server(server.generator_servicer, server)
    reg_grpc.add_RegistryServiceServicer_to_server(RegistryServicer(domain), server)
    if health_servicer is None:
        health_servicer = health.HealthServicer()
        set_health(health_servicer, bool(domain.registry.list_models(page_size=1).items))
    server.health_servicer = health_servicer
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(SERVICES + (health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise OSError(f"could not bind {address}")
    server.start()
    return server, port


def serve(data_dir: str | Path, address: str = "127.0.0.1:50051", device: str = "auto",
          grace_s: float = GRACE_S, cache_dir: str | Path | None = None, tokens=None) -> int:
    """Run the embedded default until SIGTERM or SIGINT; 0 after a graceful stop."""
    from rulewright.service.domain import Domain
    from rulewright.service.importers.faces import import_faces

    check_auth_config(address, tokens)              # before anything is opened or downloaded
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    domain = Domain.open(data_dir, device=device)
    health_servicer = health.HealthServicer()
    set_health(health_servicer, False)
    server, port = create_server(domain, address, health_servicer=health_servicer, tokens=tokens)
    log.info("listening", extra={"event": "listening", "address": address, "port": port, "auth": bool(tokens),
                                 "data_dir": str(data_dir), "device": str(domain.device)})
    try:
        if not stop.is_set():
            version = domain.bootstrap("faces", import_faces(cache_dir))
            domain.generator(version)                     # loaded before the first request
            set_health(health_servicer, True)
            log.info("serving", extra={"event": "serving", "model": version.model, "version": version.number})
        stop.wait()
    finally:
        log.info("shutting down", extra={"event": "shutdown", "grace_s": grace_s})
        health_servicer.enter_graceful_shutdown()
        server.stop(grace_s).wait()
    log.info("stopped", extra={"event": "stopped"})
    return 0


_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, the record's extra fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
               "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        out.update({k: v for k, v in record.__dict__.items() if k not in _STANDARD})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def configure_logging(level: int = logging.INFO) -> None:
    """Send every log record to stderr as JSON lines."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
