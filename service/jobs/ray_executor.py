"""Job shards as Ray tasks: ``RayExecutor``, the distributed engine for bulk jobs (dataset and statistics).

Why Ray: it is the conventional way to run PyTorch batch inference over a cluster of GPU
machines, and on Kubernetes the KubeRay operator runs a Ray cluster as one ``RayCluster``
resource (a head pod and autoscaled GPU worker pods), so the server only needs an address
(``deploy/k8s/components/ray``). Ray also retries a task whose worker process or node died
(``max_retries``), which is exactly the failure a long bulk job meets.

- ``RayExecutor(registry_uri, ...)``: an ``Executor`` that runs each shard as one Ray task, at
  most ``max_in_flight`` at a time; stopping (a cancel, the server closing) submits no more and
  cancels those in flight (whatever a cancelled task wrote is whole: ``publish_shard``).
- ``shard_task(registry_uri, spec_json, index, options)``: what a task runs, in a Ray worker
  process: open the registry from its URI (S3 endpoint and keys from the worker's own
  ``RULEWRIGHT_S3_*``, so no secret travels in a task's arguments), materialize the version's
  weights, build its generator (kept for the worker's next shards), make the shard with its
  spec's ``render_shard`` (a dataset shard's tar of Sample's bytes, a statistics shard's moment;
  ``options["kind"]`` names the spec type) and commit it with ``shards.publish_shard``; a job with an
  output location (``spec.output_uri``, in the spec the task receives) publishes the shard there,
  opened the same way (the worker's own ``RULEWRIGHT_S3_*``), and its record in the registry.
- ``RayUnavailable``: the ``ray`` extra is not installed, or the cluster cannot be reached.

A retried task recomputes the same bytes (sampling is deterministic) and ``publish_shard`` meets
its earlier self, so a worker killed at any point leaves the job whole. Workers must reach the
store the server uses: S3 (any node), or a filesystem path every node mounts.

Install with ``pip install 'rulewright[ray]'``; ``ray`` is imported only when an executor is made.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading
from typing import Any, Callable, Iterator

from rulewright.registry.registry import Registry
from rulewright.registry.s3store import S3Config

from rulewright.service.engine.device import configure_determinism, select_device
from rulewright.service.engine.loading import ARCHITECTURES
from rulewright.service.engine.progress import Progress
from rulewright.service.errors import Code, Error
from rulewright.service.jobs.dataset import JobSpec
from rulewright.service.jobs.outputs import OutputStores
from rulewright.service.jobs.shards import Executor, SeedShards, publish_shard
from rulewright.service.jobs.statistics import StatsJobSpec
from rulewright.service.jobs.stored import CANCEL_POLL_S
from rulewright.service.domain.weights import materialize

log = logging.getLogger(__name__)

STOP_WAIT_S = 30.0            # how long a stopping executor waits for its cancelled tasks to settle
_WORKER_VERSIONS = 2          # generators a Ray worker keeps for its next shards
SPEC_TYPES = {spec.kind: spec for spec in (JobSpec, StatsJobSpec)}    # what a task's ``options["kind"]`` names


class RayUnavailable(Error):
    """Ray is not installed, or its cluster cannot be reached (→ FAILED_PRECONDITION)."""

    code = Code.FAILED_PRECONDITION
    reason = "RAY_UNAVAILABLE"


def _ray():
    try:
        import ray
    except ImportError:
        raise RayUnavailable("the ray executor needs Ray: pip install 'rulewright[ray]'") from None
    return ray


# ---- in the worker -----------------------------------------------------------------------------

_registries: dict[tuple, Registry] = {}
_outputs: dict[tuple, OutputStores] = {}
_generators: "collections.OrderedDict[tuple, Any]" = collections.OrderedDict()
_worker_lock = threading.Lock()


def _registry(uri: str, s3: dict) -> Registry:
    key = (uri, tuple(sorted(s3.items())))
    with _worker_lock:
        if key not in _registries:
            options = {"s3": dataclasses.replace(S3Config.from_env(), **s3)} if uri.startswith("s3://") else {}
            _registries[key] = Registry.open(uri, **options)
        return _registries[key]


def _output(uri: str, prefix: str, s3: dict):
    """The store of a job's output location in this worker (confined below ``prefix``), opened once per (S3 settings)."""
    key = tuple(sorted(s3.items()))
    with _worker_lock:
        if key not in _outputs:
            _outputs[key] = OutputStores(dataclasses.replace(S3Config.from_env(), **s3))
        outputs = _outputs[key]
    return outputs.open(uri, prefix)


def _generator(registry: Registry, spec: SeedShards, device: str):
    """The version's generator on ``device``, built once per worker and kept for its next shards."""
    key = (registry.store.uri, spec.model, spec.number, device)
    with _worker_lock:
        if key in _generators:
            _generators.move_to_end(key)
            return _generators[key]
    configure_determinism()
    where = select_device(device)
    state = {k: v.to(where) for k, v in materialize(registry, spec.model, spec.number).items()}
    model = ARCHITECTURES[registry.get_model(spec.model).arch].from_state_dict(state, share=True)
    with _worker_lock:
        _generators[key] = model
        while len(_generators) > _WORKER_VERSIONS:
            _generators.popitem(last=False)
    return model


def shard_task(registry_uri: str, spec_json: bytes, index: int, options: dict) -> dict:
    """Render and commit shard ``index`` of a job in this (Ray worker) process; its commit record.

    ``options``: ``kind`` (the spec type, ``SPEC_TYPES``; dataset if absent), ``device`` (auto, cpu,
    cuda), ``batch_size`` (images per forward pass) and ``s3`` (non-secret ``S3Config`` fields:
    timeouts and attempts).
    """
    spec = SPEC_TYPES[options.get("kind", JobSpec.kind)].from_json(spec_json)
    registry = _registry(registry_uri, options.get("s3", {}))
    model = _generator(registry, spec, options.get("device", "auto"))
    data = spec.render_shard(model, index, options.get("batch_size", 16), Progress())
    uri = getattr(spec, "output_uri", "")
    out = _output(uri, spec.output_prefix, options.get("s3", {})) if uri else None
    return publish_shard(registry.store, spec, index, data, out=out)


# ---- in the server -----------------------------------------------------------------------------

class RayExecutor(Executor):
    """Shards as Ray tasks on a Ray cluster (KubeRay) or a Ray instance this process starts."""

    def __init__(
        self,
        registry_uri: str,                      # the store the workers open (s3://, or a path all nodes mount)
        address: str = "",                      # ray://head:10001, head:6379 or auto; empty: $RAY_ADDRESS or a local instance
        max_in_flight: int = 2,                 # shards submitted at once per job
        max_retries: int = 3,                   # re-runs of a task whose worker process or node died
        num_gpus: float = 0.0,                  # GPUs each task reserves (fractions share one GPU)
        device: str = "auto",                   # where a worker renders: auto, cpu, cuda
        batch_size: int = 16,                   # images per forward pass in a worker
        s3: dict | None = None,                 # non-secret S3Config fields for the workers (timeouts, attempts)
        shard_fn: Callable[..., dict] = shard_task,   # what a task runs (tests wrap it to inject faults)
        init_options: dict | None = None,       # more ray.init arguments when this executor connects
    ):
        ray = _ray()
        if max_in_flight < 1 or max_retries < 0 or num_gpus < 0:
            raise ValueError("max_in_flight must be at least 1, max_retries and num_gpus not negative")
        self.registry_uri = registry_uri
        self.max_in_flight = max_in_flight
        self.options = {"device": device, "batch_size": batch_size, "s3": dict(s3 or {})}
        self._owns_ray = False
        if not ray.is_initialized():
            try:
                ray.init(address=address or None, include_dashboard=False, log_to_driver=False,
                         logging_level=logging.WARNING, **(init_options or {}))
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise RayUnavailable(f"could not connect to Ray at {address or 'a local instance'}: {exc}",
                                     address=address) from None
            self._owns_ray = True
        self._remote = ray.remote(max_retries=max_retries, num_gpus=num_gpus, num_cpus=1)(shard_fn)
        log.info("ray executor", extra={"event": "ray_executor", "address": address or "local",
                                        "max_in_flight": max_in_flight, "max_retries": max_retries,
                                        "num_gpus": num_gpus, "device": device})

    def run_shards(self, spec: SeedShards, indices: list[int], progress: Progress) -> Iterator[dict]:
        """At most ``max_in_flight`` tasks of this job at once; none submitted once ``progress`` stops."""
        ray = _ray()
        todo = list(indices)
        running: dict[Any, int] = {}
        spec_json, options = spec.to_json(), {**self.options, "kind": spec.kind}
        try:
            while todo or running:
                while todo and len(running) < self.max_in_flight and not progress.stopped():
                    index = todo.pop(0)
                    running[self._remote.remote(self.registry_uri, spec_json, index, options)] = index
                if not running:
                    return
                # A bounded wait, so a cancel or a closing server is seen between completions.
                finished, _ = ray.wait(list(running), num_returns=1, timeout=CANCEL_POLL_S)
                for ref in finished:
                    index = running.pop(ref)
                    try:
                        yield ray.get(ref)
                    except ray.exceptions.RayTaskError as exc:
                        cause = getattr(exc, "cause", None)
                        if isinstance(cause, Error):
                            raise cause from None
                        raise
                    except ray.exceptions.RayError as exc:    # retries exhausted, cluster gone
                        raise RayUnavailable(f"shard {index} of job {spec.id} failed in Ray: {exc}",
                                             job=spec.id, shard=index) from None
        finally:
            for ref in running:        # an error or a stop: what was published is whole, the rest is redone
                ray.cancel(ref)
            if running:
                ray.wait(list(running), num_returns=len(running), timeout=STOP_WAIT_S)

    def close(self) -> None:
        """Disconnect from Ray (and stop the local instance this executor started)."""
        if self._owns_ray:
            _ray().shutdown()
            self._owns_ray = False
