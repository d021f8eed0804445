"""Prometheus metrics for the gRPC server: every RPC, sample batch and statistics-cache lookup.

- ``Metrics(registry=None)``: one set of metrics in its own ``CollectorRegistry``.
- ``Metrics.interceptor()``: a ``grpc.ServerInterceptor`` that counts and times every RPC.
- ``Metrics.bind(domain)``: read resident versions and GPU memory from ``domain`` at scrape time.
- ``Metrics.observe_batch(size)``: record the size of one batched forward pass.
- ``Metrics.observe_stats_cache(kind, hit)``: record one statistics-cache lookup.
- ``Metrics.render()``: the text exposition of every metric.
- ``Metrics.serve_http(address)``: serve ``/metrics`` over HTTP in a daemon thread.
- ``rpc_label(method)``: the ``rpc`` label of a full gRPC method name.

Metrics (all prefixed ``rulewright_``):

- ``rulewright_requests_total{rpc, code}``: finished RPCs; ``rpc`` is ``Service/Method`` without
  the package (``GeneratorService/Sample``, ``Health/Check``), ``code`` a status code name.
- ``rulewright_request_duration_seconds{rpc}``: histogram, call start to the stream's end.
- ``rulewright_sample_batch_size``: histogram of forward-pass batch sizes.
- ``rulewright_stats_cache_lookups_total{kind, result}``: ``result`` is ``hit`` or ``miss``.
- ``rulewright_resident_versions``: versions held in memory by the bound domain (0 unbound).
- ``rulewright_gpu_memory_allocated_bytes`` / ``rulewright_gpu_memory_reserved_bytes``: only
  when the domain's device is CUDA; absent otherwise, since 0 would read as "a GPU, empty".
"""

from __future__ import annotations

import time

import grpc
import prometheus_client
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# Rewrites and statistics stream for minutes, sampling takes milliseconds: one range for both.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


def rpc_label(method: str) -> str:
    """``/pkg.Service/Method`` as ``Service/Method``."""
    service, _, name = method.lstrip("/").rpartition("/")
    return f"{service.rsplit('.', 1)[-1]}/{name}"


_BY_VALUE = {c.value[0]: c.name for c in grpc.StatusCode}


def _code_name(context, failed: bool, closed: bool) -> str:
    """The status code name a finished call ended with."""
    code = context.code()
    if code is not None:
        # set_code/abort store a grpc.StatusCode; tolerate a bare integer from other paths
        return code.name if isinstance(code, grpc.StatusCode) else _BY_VALUE.get(code, "UNKNOWN")
    if failed:
        return "UNKNOWN"            # what grpc answers for an exception raised without a code
    if closed or not context.is_active():
        # grpc sets no code when the client goes away; the deadline tells expiry from cancel
        remaining = context.time_remaining()
        return "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
    return "OK"


class _Interceptor(grpc.ServerInterceptor):
    """Wraps each handler so that its end (return, abort, cancel) records count and latency."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            # unknown methods: grpc answers UNIMPLEMENTED itself, and client-chosen names
            # would make the rpc label unbounded
            return handler
        rpc = rpc_label(handler_call_details.method)
        record = self.metrics._record
        def wrap(behavior, streaming: bool):
            if streaming:
                def timed_stream(request_or_iterator, context):
                    started = time.perf_counter()    # here, not at the first next(): the call has begun
                    return _timed_stream(behavior(request_or_iterator, context), context, rpc, started, record)
                return timed_stream

            def timed(request_or_iterator, context):
                started = time.perf_counter()
                failed = False
                try:
                    return behavior(request_or_iterator, context)
                except BaseException:
                    failed = True
                    raise
                finally:
                    record(rpc, _code_name(context, failed, False), started)
            return timed
        return rewrap(handler, wrap)


def rewrap(handler, wrap):
    """A copy of a gRPC method handler whose behaviour is ``wrap(behaviour, response_streaming)``
    (what every interceptor here does, whatever the handler's four streaming shapes)."""
    if handler.response_streaming:
        attr = "stream_stream" if handler.request_streaming else "unary_stream"
        make = grpc.stream_stream_rpc_method_handler if handler.request_streaming else grpc.unary_stream_rpc_method_handler
    else:
        attr = "stream_unary" if handler.request_streaming else "unary_unary"
        make = grpc.stream_unary_rpc_method_handler if handler.request_streaming else grpc.unary_unary_rpc_method_handler
    return make(wrap(getattr(handler, attr), handler.response_streaming),
                request_deserializer=handler.request_deserializer, response_serializer=handler.response_serializer)


def _timed_stream(responses, context, rpc: str, started: float, record):
    """``responses``, passed through; records the call when the stream ends however it ends."""
    failed = closed = False
    try:
        yield from responses
    except GeneratorExit:
        closed = True               # grpc dropped the stream: the client cancelled or timed out
        raise
    except BaseException:
        failed = True
        raise
    finally:
        record(rpc, _code_name(context, failed, closed), started)


class _DomainCollector(Collector):
    """Gauges read from the bound domain at each scrape, so they are never stale."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics

    def collect(self):
        domain = self.metrics.domain
        resident = GaugeMetricFamily("rulewright_resident_versions", "Model versions resident in memory.")
        resident.add_metric([], len(domain.resident_versions()) if domain is not None else 0)
        yield resident
        device = getattr(domain, "device", None)
        if device is None or getattr(device, "type", None) != "cuda":
            return
        import torch                # lazily: the metrics module itself needs no torch
        for name, read, doc in (("allocated", torch.cuda.memory_allocated, "Bytes held by tensors on the GPU."),
                                ("reserved", torch.cuda.memory_reserved, "Bytes reserved by the CUDA caching "
                                                                         "allocator.")):
            family = GaugeMetricFamily(f"rulewright_gpu_memory_{name}_bytes", doc)
            family.add_metric([], float(read(device)))
            yield family


class Metrics:
    """The server's metrics, in a registry of their own (many servers may live in one process)."""

    def __init__(self, registry: prometheus_client.CollectorRegistry | None = None):
        self.registry = registry if registry is not None else prometheus_client.CollectorRegistry()
        self.domain = None
        self.requests = prometheus_client.Counter(
            "rulewright_requests", "Finished RPCs by method and status code.", ("rpc", "code"),
            registry=self.registry)
        self.duration = prometheus_client.Histogram(
            "rulewright_request_duration_seconds", "RPC latency, to the end of the response stream.", ("rpc",),
            buckets=DURATION_BUCKETS, registry=self.registry)
        self.batch_size = prometheus_client.Histogram(
            "rulewright_sample_batch_size", "Images per batched generator forward pass.",
            buckets=BATCH_BUCKETS, registry=self.registry)
        self.http_requests = prometheus_client.Counter(
            "rulewright_http_requests", "Finished requests to the editor's HTTP side by route and status.",
            ("route", "status"), registry=self.registry)
        self.http_duration = prometheus_client.Histogram(
            "rulewright_http_request_duration_seconds", "Editor HTTP latency, to the end of the response.",
            ("route",), buckets=DURATION_BUCKETS, registry=self.registry)
        self.stats_cache = prometheus_client.Counter(
            "rulewright_stats_cache_lookups", "Statistics-cache lookups by statistic kind and result.",
            ("kind", "result"), registry=self.registry)
        self.registry.register(_DomainCollector(self))

    def interceptor(self) -> grpc.ServerInterceptor:
        """A server interceptor counting and timing every RPC; put it first to see refused calls."""
        return _Interceptor(self)

    def bind(self, domain) -> None:
        """Read gauges from ``domain`` at scrape time, and let it report batches and cache lookups."""
        self.domain = domain
        domain.metrics = self

    def observe_batch(self, size: int) -> None:
        """Record one forward pass of ``size`` images."""
        self.batch_size.observe(size)

    def observe_http(self, route: str, status: int, seconds: float) -> None:
        """Record one finished request to the editor's HTTP side (``route``: its handler's name)."""
        self.http_requests.labels(route=route, status=str(status)).inc()
        self.http_duration.labels(route=route).observe(seconds)

    def observe_stats_cache(self, kind: str, hit: bool) -> None:
        """Record one statistics-cache lookup of ``kind``."""
        self.stats_cache.labels(kind=kind, result="hit" if hit else "miss").inc()

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return prometheus_client.generate_latest(self.registry)

    def serve_http(self, address: str) -> tuple[object, int]:
        """Serve ``/metrics`` on ``host:port`` (port 0: a free one); (server with ``shutdown()``, port)."""
        host, _, port = address.rpartition(":")
        server, thread = prometheus_client.start_http_server(int(port), addr=host.strip("[]") or "0.0.0.0",
                                                             registry=self.registry)
        return _HTTPEndpoint(server, thread), server.server_port

    def _record(self, rpc: str, code: str, started: float) -> None:
        self.requests.labels(rpc=rpc, code=code).inc()
        self.duration.labels(rpc=rpc).observe(time.perf_counter() - started)


class _HTTPEndpoint:
    """The running ``/metrics`` server; ``shutdown()`` stops it and frees its port."""

    def __init__(self, server, thread):
        self.server, self.thread = server, thread

    def shutdown(self) -> None:
        """Stop serving, close the socket and wait for the thread."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
