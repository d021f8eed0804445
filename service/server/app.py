"""Server construction, apart from the servicers: message sizes, health, reflection, shutdown, logs.

- ``create_server(domain, address="127.0.0.1:0", ...) -> (server, port)``: a started gRPC server
  with both services, dataset jobs (``jobs``: JobService and ``google.longrunning.Operations``;
  unfinished jobs in the store resume), the Open Inference Protocol (``oip``),
  ``grpc.health.v1`` and reflection; port 0 binds a free port (tests).
  ``tokens`` (``auth.Token`` entries) turn bearer-token auth on; without them the address must
  be loopback (``auth.AuthConfigError`` otherwise).
- ``serve(config)``: runs a ``config.ServeConfig`` (defaults: the embedded server: filesystem
  registry under the data directory, in-process statistics cache, faces model): starts
  NOT_SERVING, bootstraps the faces model, goes SERVING, and on SIGTERM or SIGINT goes
  NOT_SERVING and stops with a grace period. TLS, metrics, S3 and Redis as configured; the HTTP
  side (``web``: the editor and its JSON API) where ``web_address(config)`` says. Before it
  returns, the worker threads of cancelled streams and editor jobs get another grace period to
  reach their next cancellation check: the interpreter must never exit with one inside torch
  (that aborts the process); one that still runs then makes the process leave at once (exit 0).
- ``WorkLimiter``: a server interceptor that admits calls by lane, each with its own bound, on a
  pool with threads for every lane and ``RESERVED_WORKERS`` more, so health checks and OIP
  liveness/readiness never wait behind work: Sample and ModelInfer while batching dynamically
  (``max_sample_calls``: they wait for a shared forward pass, taking no work slot), long calls
  (Rewrite, Dissect, SearchContext, ComputeStatistics: ``max_long_calls`` at once and
  ``long_call_queue`` waiting) and the rest (``max_workers`` at once and as many waiting). Past a
  lane's bound RESOURCE_EXHAUSTED names its setting; during a drain (after SIGTERM) new work is
  refused with UNAVAILABLE while health answers NOT_SERVING.
- ``StoreWatch``: probes a store that can be probed (S3) every few seconds; while it is
  unreachable ``rulewright.v1.RegistryService`` is NOT_SERVING in health and OIP ``ServerReady``
  is false, while the server as a whole stays SERVING (resident versions still serve, and a
  liveness probe must not restart every replica over a store outage).
- ``JsonFormatter`` / ``configure_logging()`` (from ``logs``): one JSON object per log line.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import sys
import threading
import time
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from google.longrunning import operations_pb2, operations_pb2_grpc

from rulewright.inference import grpc_predict_v2_pb2_grpc as oip_grpc
from rulewright.v1 import generator_service_pb2 as gen, generator_service_pb2_grpc as gen_grpc
from rulewright.v1 import jobs_service_pb2 as jobs_pb, jobs_service_pb2_grpc as jobs_grpc
from rulewright.v1 import registry_service_pb2 as reg, registry_service_pb2_grpc as reg_grpc

from rulewright.service.server.auth import AuthInterceptor, check_auth_config, is_loopback
from rulewright.service.server.logs import JsonFormatter, configure_logging  # noqa: F401 -- the server's log format
from rulewright.service.server.metrics import rewrap
from rulewright.service.server.oip import SERVICE_NAME as OIP_SERVICE, InferenceServicer
from rulewright.service.server.jobs import JobServicer, OperationsServicer
from rulewright.service.server.servicers import MAX_IMPORT_BYTES, GeneratorServicer, RegistryServicer

log = logging.getLogger(__name__)

AUTO_WEB_ADDRESS = "127.0.0.1:8080"   # the HTTP side of the embedded default (web_address "auto")
MAX_MESSAGE_BYTES = 64 << 20      # requests and responses (a 64-image PNG album fits easily)
GRACE_S = 10.0                    # in-flight RPCs get this long on shutdown
SIGNAL_POLL_S = 0.5               # longest a SIGTERM another thread caught waits to be acted on
SERVICES = (gen.DESCRIPTOR.services_by_name["GeneratorService"].full_name,
            reg.DESCRIPTOR.services_by_name["RegistryService"].full_name, OIP_SERVICE,
            jobs_pb.DESCRIPTOR.services_by_name["JobService"].full_name,
            operations_pb2.DESCRIPTOR.services_by_name["Operations"].full_name)


RESERVED_WORKERS = 4              # pool threads only probes and discovery use (see WorkLimiter)
# Methods that never count as work: health, reflection, OIP liveness and readiness.
UNLIMITED_PREFIXES = (f"/{health.SERVICE_NAME}/", "/grpc.reflection.", f"/{OIP_SERVICE}/ServerLive",
                      f"/{OIP_SERVICE}/ServerReady")
REGISTRY_SERVICE = SERVICES[1]
GENERATOR_SERVICE = SERVICES[0]
# Calls that wait for a shared forward pass (the batcher does their work) and calls that run long.
SAMPLE_METHODS = frozenset({"Sample", "ModelInfer"})
LONG_METHODS = frozenset({"Rewrite", "Dissect", "SearchContext", "ComputeStatistics"})
STORE_PROBE_S = 2.0               # how often StoreWatch asks the store


@dataclasses.dataclass
class Lane:
    """One admission lane: at most ``limit`` calls at once and ``queue`` more waiting for a slot (until
    their deadline); beyond that RESOURCE_EXHAUSTED naming ``settings``, the server settings that bound it."""

    name: str
    limit: int
    queue: int
    settings: str
    busy: int = 0
    waiting: int = 0

    @property
    def threads(self) -> int:
        """Pool threads this lane can hold at once (its calls and those waiting)."""
        return self.limit + self.queue


class WorkLimiter(grpc.ServerInterceptor):
    """Admission by lane: Samples waiting for a shared forward pass (``sample``), long calls (``long``:
    Rewrite, Dissect, SearchContext, ComputeStatistics) and the rest (``work``) each get their own bound,
    so no kind can shut another out. The rest of the pool answers probes. Refuses work while draining."""

    def __init__(self, limit: int, queue: int | None = None, sample_calls: int = 0, long_calls: int = 0,
                 long_queue: int = 0):
        work = Lane("work", limit, limit if queue is None else queue, "max_workers")
        self.lanes = {"work": work}
        if sample_calls > 0:          # Samples wait in the batcher, not on a worker: a lane of their own
            self.lanes["sample"] = Lane("sample", sample_calls, 0, "max_sample_calls")
        if long_calls > 0:
            self.lanes["long"] = Lane("long", long_calls, long_queue, "max_long_calls and long_call_queue")
        self.limit, self.queue = work.limit, work.queue
        self.draining = False
        self._cond = threading.Condition()

    @property
    def busy(self) -> int:
        """Calls admitted and running, over every lane."""
        return sum(lane.busy for lane in self.lanes.values())

    @property
    def threads(self) -> int:
        """Pool threads the lanes can hold at once (the server's pool needs these plus ``RESERVED_WORKERS``)."""
        return sum(lane.threads for lane in self.lanes.values())

    def lane(self, method: str, request=None) -> Lane:
        """The lane a call of ``method`` is admitted through (``request``: a unary call's message)."""
        name = method.rpartition("/")[2]
        if name in SAMPLE_METHODS and "sample" in self.lanes:
            # Samples with unit interventions run alone on their own thread: they are work, not waiting.
            return self.lanes["work" if getattr(request, "interventions", None) else "sample"]
        if name in LONG_METHODS and method.startswith(f"/{GENERATOR_SERVICE}/") and "long" in self.lanes:
            return self.lanes["long"]
        return self.lanes["work"]

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.startswith(UNLIMITED_PREFIXES):
            return handler
        method = handler_call_details.method
        unary = not handler.request_streaming

        def wrap(behavior, streaming: bool):
            if streaming:
                def limited_stream(request_or_iterator, context):
                    lane = self.lane(method, request_or_iterator if unary else None)
                    self._enter(lane, context)
                    try:
                        yield from behavior(request_or_iterator, context)
                    finally:
                        self._leave(lane)
                return limited_stream

            def limited(request_or_iterator, context):
                lane = self.lane(method, request_or_iterator if unary else None)
                self._enter(lane, context)
                try:
                    return behavior(request_or_iterator, context)
                finally:
                    self._leave(lane)
            return limited
        return rewrap(handler, wrap)

    def _enter(self, lane: Lane, context) -> None:
        with self._cond:
            if self.draining:
                context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry (another replica)")
            if lane.busy >= lane.limit and lane.waiting >= lane.queue:
                context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                              f"the server is busy: {lane.busy} {lane.name} calls in progress and {lane.waiting} "
                              f"waiting (server setting {lane.settings}); retry with backoff")
            lane.waiting += 1
            try:
                while lane.busy >= lane.limit:        # a bounded queue, in arrival order of wake-ups
                    if self.draining:
                        context.abort(grpc.StatusCode.UNAVAILABLE, "the server is shutting down; retry elsewhere")
                    left = context.time_remaining()
                    if left <= 0 or not context.is_active():
                        context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the deadline passed waiting for a worker")
                    self._cond.wait(min(0.1, left))
            finally:
                lane.waiting -= 1
            lane.busy += 1

    def _leave(self, lane: Lane) -> None:
        with self._cond:
            lane.busy -= 1
            self._cond.notify_all()

    def drain(self, timeout_s: float) -> bool:
        """Refuse new work and wait up to ``timeout_s`` for the work in progress; whether it all finished."""
        with self._cond:
            self.draining = True
            return self._cond.wait_for(lambda: self.busy == 0, timeout=timeout_s)


class StoreWatch:
    """Probes the domain's store (if it can be probed) every ``period_s``; ``available`` is the last answer.

    While the store is unreachable, health marks the RegistryService NOT_SERVING (only while the
    server as a whole is SERVING, so startup and shutdown keep their own status).
    """

    def __init__(self, domain, health_servicer: health.HealthServicer, period_s: float = STORE_PROBE_S):
        self.store = domain.store
        self.health = health_servicer
        self.period_s = period_s
        self.available = True
        self._stop = threading.Event()
        self._thread = None
        if hasattr(self.store, "probe"):
            self._thread = threading.Thread(target=self._run, name="store-watch", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                available = bool(self.store.probe(timeout_s=min(self.period_s, 2.0)))
            except Exception:  # noqa: BLE001 -- a failing probe reads as unreachable
                available = False
            if available != self.available:
                log.warning("store " + ("reachable" if available else "unreachable"),
                            extra={"event": "store_health", "available": available, "store": self.store.uri})
            self.available = available
            if _serving(self.health):
                self.health.set(REGISTRY_SERVICE, health_pb2.HealthCheckResponse.SERVING if available
                                else health_pb2.HealthCheckResponse.NOT_SERVING)

    def stop(self) -> None:
        """Stop probing."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


def set_health(servicer: health.HealthServicer, serving: bool) -> None:
    """Mark the server and each service SERVING or NOT_SERVING."""
    status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
    for name in ("",) + SERVICES:
        servicer.set(name, status)


def _serving(servicer: health.HealthServicer) -> bool:
    """Whether the server as a whole (health service "") is SERVING."""
    return servicer.Check(health_pb2.HealthCheckRequest(service=""), None).status == \
        health_pb2.HealthCheckResponse.SERVING


def create_server(
    domain,                                     # the domain layer the servicers call
    address: str = "127.0.0.1:0",              # host:port; port 0 picks a free one
    max_message_bytes: int = MAX_MESSAGE_BYTES,  # largest request and response accepted
    max_workers: int = 16,                      # concurrent RPCs (other than Samples and long calls)
    max_sample_calls: int = 64,                 # Samples and ModelInfers admitted at once while batching
    max_long_calls: int = 2,                    # Rewrites, Dissects, SearchContexts, statistics streams at once
    long_call_queue: int = 16,                  # more long calls that may wait for a slot
    health_servicer: health.HealthServicer | None = None,  # None: SERVING if a model is registered
    tokens=None,                                # auth.Token entries; None or empty: auth off (loopback only)
    credentials: grpc.ServerCredentials | None = None,  # TLS or mTLS (see tls.py); None: plaintext
    metrics=None,                               # metrics.Metrics: counts every RPC, batch and cache lookup
    max_import_bytes: int = MAX_IMPORT_BYTES,   # largest ImportModel upload
    job_workers: int = 2,                       # dataset shards rendered at once (the local executor)
    job_executor=None,                          # jobs.Executor where shards run; None: a local thread pool
    job_output_prefixes=(),                     # output locations a dataset job may name; empty: none
) -> tuple[grpc.Server, int]:
    """A started server with GeneratorService, RegistryService, JobService and google.longrunning.Operations,
    the OIP service, health and reflection; unfinished dataset jobs in the store resume."""
    check_auth_config(address, tokens)
    # Metrics outermost, so refused calls (UNAUTHENTICATED, PERMISSION_DENIED, busy) are counted too.
    limiter = WorkLimiter(max_workers, sample_calls=max_sample_calls if domain.batcher is not None else 0,
                          long_calls=max_long_calls, long_queue=long_call_queue)
    interceptors = (([metrics.interceptor()] if metrics is not None else []) + [limiter]
                    + ([AuthInterceptor(tokens)] if tokens else []))
    if metrics is not None:
        metrics.bind(domain)
    # Threads for every lane's calls and those waiting for a slot, and a few that answer health and
    # OIP readiness however busy the server is.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=limiter.threads + RESERVED_WORKERS,
                                                    thread_name_prefix="rpc"),
                         interceptors=interceptors, options=[
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        ("grpc.so_reuseport", 0),
    ])
    server.limiter = limiter
    server.generator_servicer = GeneratorServicer(domain)
    gen_grpc.add_GeneratorServiceServicer_to_server(server.generator_servicer, server)
    reg_grpc.add_RegistryServiceServicer_to_server(RegistryServicer(domain, max_import_bytes), server)
    runners = _add_job_services(server, domain, job_workers, job_executor, job_output_prefixes)
    watch = _add_health_services(server, domain, health_servicer)
    port = _bind(server, address, credentials)
    server.start()
    _resume(runners)
    stop = server.stop

    def stop_all(grace):
        """grpc.Server.stop, and the store watch and this server's job runners with it (their jobs resume
        on the next start)."""
        watch.stop()
        for runner in runners:
            runner.close()
        return stop(grace)
    server.stop = stop_all
    return server, port


def _add_job_services(server: grpc.Server, domain, job_workers: int, job_executor, job_output_prefixes) -> tuple:
    """JobService and google.longrunning.Operations over dataset and statistics jobs: (jobs, stat_jobs),
    also set as ``server.jobs`` and ``server.stat_jobs``."""
    from rulewright.service.jobs.dataset import DatasetJobs
    from rulewright.service.jobs.statistics import StatisticsJobs

    jobs = server.jobs = DatasetJobs(domain, job_executor, max_workers=job_workers,
                                     output_prefixes=job_output_prefixes)
    stat_jobs = server.stat_jobs = StatisticsJobs(domain, job_executor)     # shards on the same executor
    jobs_grpc.add_JobServiceServicer_to_server(JobServicer(jobs, stat_jobs), server)
    operations_pb2_grpc.add_OperationsServicer_to_server(OperationsServicer(jobs, stat_jobs), server)
    return jobs, stat_jobs


def _add_health_services(server: grpc.Server, domain, health_servicer: health.HealthServicer | None) -> "StoreWatch":
    """Health (None: SERVING if a model is registered), the OIP service whose readiness follows it and
    the store, and reflection; the store watch they read."""
    if health_servicer is None:
        health_servicer = health.HealthServicer()
        set_health(health_servicer, domain.has_models())
    server.health_servicer = health_servicer
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    watch = server.store_watch = StoreWatch(domain, health_servicer)
    # OIP ServerReady follows the overall health status (both probes agree during startup and shutdown)
    # and the store: a replica that cannot reach its registry is not ready.
    oip_grpc.add_GRPCInferenceServiceServicer_to_server(
        InferenceServicer(domain, lambda: _serving(health_servicer) and watch.available), server)
    reflection.enable_server_reflection(SERVICES + (health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    return watch


def _bind(server: grpc.Server, address: str, credentials: grpc.ServerCredentials | None) -> int:
    """The port ``address`` bound (TLS when ``credentials``); ``OSError`` naming it when it cannot be."""
    try:
        port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    except RuntimeError as exc:       # grpcio raises rather than returning 0 for an address in use
        raise OSError(f"could not bind {address}: {exc}") from None
    if port == 0:
        raise OSError(f"could not bind {address}")
    return port


def _resume(runners) -> None:
    """Jobs a stopped server left unfinished, from their state in the store."""
    for kind in runners:
        try:
            kind.resume()
        except Exception as exc:  # noqa: BLE001 -- an unreachable store must not keep the server from serving
            log.warning(f"{kind.noun} jobs not resumed", extra={"event": f"{kind.noun}_jobs_not_resumed",
                                                                "error": str(exc)})


def job_executor(config, domain):
    """The dataset jobs' executor the settings name: None (the local thread pool) or a ``RayExecutor``
    whose workers open the same store, with the store's non-secret S3 settings."""
    if config.job_executor != "ray":
        return None
    from rulewright.service.jobs.ray_executor import RayExecutor

    s3 = {"connect_timeout_s": config.s3_connect_timeout_s, "read_timeout_s": config.s3_read_timeout_s,
          "max_attempts": config.s3_max_attempts, "call_timeout_s": config.store_timeout_s}
    return RayExecutor(domain.store.uri, address=config.ray_address, max_in_flight=config.job_workers,
                       max_retries=config.ray_max_retries, num_gpus=config.ray_gpus_per_shard,
                       device=config.device, batch_size=config.max_batch, s3=s3)


def output_prefixes(text: str) -> tuple[str, ...]:
    """The ``job_output_prefixes`` setting as a tuple of URI prefixes (comma-separated; blanks ignored)."""
    return tuple(p.strip() for p in (text or "").split(",") if p.strip())


def web_address(config) -> str | None:
    """Where the HTTP side listens: ``web_address`` as set; ``auto``: ``AUTO_WEB_ADDRESS`` when the
    gRPC address is loopback without TLS (the embedded default's shape), else None; ``off``/empty: None."""
    value = config.web_address
    if value in ("", "off"):
        return None
    if value == "auto":
        return AUTO_WEB_ADDRESS if is_loopback(config.address) and not (config.tls_cert or config.tls_key) else None
    return value


def serve(config, on_ready=None) -> int:
    """Run the server a ``config.ServeConfig`` describes until SIGTERM or SIGINT; 0 after a graceful stop.

    Opens the domain (registry and statistics cache the config names), starts NOT_SERVING,
    bootstraps the faces model unless ``bootstrap`` is ``none``, goes SERVING, and on a signal
    goes NOT_SERVING and stops with ``grace_s``. ``on_ready(port, web_url)`` is called once serving
    (``web_url`` None when the HTTP side is off).
    """
    from rulewright.service.domain.core import Domain

    tokens, web_at, credentials = _checked_settings(config)
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGTERM, signal.SIGINT)}
    domain = metrics_http = server = web = None
    still_running: list[threading.Thread] = []
    try:
        domain = Domain.from_config(config)
        metrics, metrics_http = _start_metrics(config)
        health_servicer = health.HealthServicer()
        set_health(health_servicer, False)
        server, port = _create_from_config(domain, config, health_servicer, tokens, credentials, metrics)
        if web_at:
            web = _start_web(domain, config, web_at, tokens, health_servicer)
        if not stop.is_set():
            _bootstrap(domain, config)
            set_health(health_servicer, True)
            log.info("serving", extra={"event": "serving", "port": port})
            if on_ready is not None:
                on_ready(port, web.url if web is not None else None)
        # Woken now and then: a signal caught by another thread (the kernel may hand a process's
        # signal to any thread, a busy one more often) runs its Python handler only once this
        # thread runs Python code again; a wait without a timeout would never see it.
        while not stop.wait(SIGNAL_POLL_S):
            pass
    finally:
        if server is not None:
            still_running = _shut_down(server, web, config.grace_s)
        if domain is not None:
            domain.close()
        if metrics_http is not None:
            metrics_http.shutdown()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if still_running:
        log.warning("work still running at exit", extra={"event": "exit_with_work_running",
                                                         "threads": sorted(t.name for t in still_running)})
    log.info("stopped", extra={"event": "stopped"})
    if still_running:
        _exit_now(0)
    return 0


def _checked_settings(config) -> tuple:
    """(tokens, web address or None, gRPC credentials or None), every address checked against the
    auth rule before anything is opened or downloaded (``AuthConfigError``: one line, exit 2)."""
    from rulewright.service.server.auth import tokens_from_env
    from rulewright.service.server.tls import TlsFiles, server_credentials

    tokens = tokens_from_env(config.tokens_file or None)
    check_auth_config(config.address, tokens)
    web_at = web_address(config)
    if web_at:
        check_auth_config(web_at, tokens)                  # the HTTP side obeys the same rule
    if config.metrics_address:
        # /metrics has no auth of its own: without tokens (a loopback-only server) it stays on loopback too
        check_auth_config(config.metrics_address, tokens)
    credentials = server_credentials(TlsFiles(config.tls_cert or None, config.tls_key or None,
                                              config.tls_client_ca or None))
    return tokens, web_at, credentials


def _start_metrics(config) -> tuple:
    """(metrics, its HTTP server) on ``metrics_address``; (None, None) without one."""
    if not config.metrics_address:
        return None, None
    from rulewright.service.server.metrics import Metrics

    metrics = Metrics()
    metrics_http, metrics_port = metrics.serve_http(config.metrics_address)
    log.info("metrics", extra={"event": "metrics", "address": config.metrics_address, "port": metrics_port})
    return metrics, metrics_http


def _create_from_config(domain, config, health_servicer, tokens, credentials, metrics) -> tuple[grpc.Server, int]:
    """``create_server`` with the settings' limits, jobs and security; logs where it listens."""
    server, port = create_server(domain, config.address, max_message_bytes=int(config.max_message_mb * 2**20),
                                 max_workers=config.max_workers, max_sample_calls=config.max_sample_calls,
                                 max_long_calls=config.max_long_calls, long_call_queue=config.long_call_queue,
                                 health_servicer=health_servicer, tokens=tokens,
                                 credentials=credentials, metrics=metrics,
                                 max_import_bytes=int(config.max_import_mb * 2**20),
                                 job_workers=config.job_workers, job_executor=job_executor(config, domain),
                                 job_output_prefixes=output_prefixes(config.job_output_prefixes))
    log.info("listening", extra={"event": "listening", "address": config.address, "port": port,
                                 "auth": bool(tokens), "tls": "mutual" if config.tls_client_ca else bool(credentials),
                                 "registry": domain.store.uri,
                                 "stats_cache": _redacted(config.stats_cache), "device": str(domain.device),
                                 "dynamic_batching": config.dynamic_batching, "max_batch": config.max_batch})
    return server, port


def _bootstrap(domain, config) -> None:
    """The faces model imported (once) and loaded before the first request, unless ``bootstrap`` is none."""
    if config.bootstrap != "faces":
        return
    from rulewright.service.importers.faces import import_faces

    version = domain.bootstrap("faces", import_faces(config.cache_dir or None))
    domain.generator(version)
    log.info("bootstrapped", extra={"event": "bootstrapped", "model": version.model, "version": version.number})


def _shut_down(server: grpc.Server, web, grace_s: float) -> list[threading.Thread]:
    """NOT_SERVING, the HTTP side stopped, then the gRPC server drained and stopped within ``grace_s``;
    the work threads still running after that."""
    log.info("shutting down", extra={"event": "shutdown", "grace_s": grace_s})
    server.health_servicer.enter_graceful_shutdown()          # NOT_SERVING, answered until the drain ends
    if web is not None:
        web.shutdown()                                        # running editor jobs are cancelled: they create nothing
    started = time.monotonic()
    server.limiter.drain(grace_s)                             # new work: UNAVAILABLE; health still answers
    server.stop(max(grace_s - (time.monotonic() - started), 0.0)).wait()
    # A stream's RPC thread can end (its call cancelled) while its worker thread is still inside
    # torch; so can an editor job's thread. They were told to stop and do at their next check.
    work = [*server.generator_servicer.workers, *(web.running_work() if web is not None else [])]
    return _finish(work, grace_s)


def _finish(threads: list[threading.Thread], timeout_s: float) -> list[threading.Thread]:
    """Wait up to ``timeout_s`` in all for ``threads`` (told to stop already); those still running."""
    deadline = time.monotonic() + timeout_s
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [t for t in threads if t.is_alive()]


def _exit_now(code: int) -> None:
    """End the process without interpreter finalization, which would abort it: a daemon thread
    that takes the GIL back inside torch during finalization is unwound through C++ code that
    must not throw (``terminate called without an active exception``, SIGABRT)."""
    logging.shutdown()                        # flush every handler: the log is all an operator gets
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    os._exit(code)


def _start_web(domain, config, address: str, tokens, health_servicer):
    """The HTTP side (``web``) with the server's tokens and TLS files; its health follows gRPC's.

    A busy port under ``auto`` leaves the HTTP side off (a second embedded server on one machine);
    an address that was asked for and cannot be bound stops the command.
    """
    from rulewright.service.server.tls import TlsFiles
    from rulewright.service.server.web import create_web_server

    files = TlsFiles(config.tls_cert or None, config.tls_key or None, config.tls_client_ca or None)
    tls = files if files.enabled else None
    try:
        web = create_web_server(domain, address, tokens=tokens, serving=lambda: _serving(health_servicer), tls=tls,
                                max_connections=config.web_max_connections, idle_timeout_s=config.web_idle_timeout_s,
                                request_timeout_s=config.web_request_timeout_s)
    except OSError as exc:
        if config.web_address != "auto":
            raise
        log.warning("web side off", extra={"event": "web_off", "address": address, "error": str(exc)})
        return None
    log.info("web", extra={"event": "web", "address": address, "port": web.port, "url": web.url,
                           "auth": bool(tokens), "tls": tls is not None})
    return web


def _redacted(uri: str) -> str:
    """A cache URI without its password (redis://:secret@host → redis://***@host)."""
    scheme, sep, rest = uri.partition("://")
    if "@" in rest:
        return f"{scheme}{sep}***@{rest.split('@', 1)[1]}"
    return uri
