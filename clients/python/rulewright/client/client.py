"""``Client``: typed calls to rulewright's GeneratorService, RegistryService, and dataset and statistics jobs.

Every call has a deadline: ``timeout`` seconds in all (``long_timeout`` for the streaming work
of Rewrite, ComputeStatistics, ImportModel and ExportVersion), retries included. A call that
fails with UNAVAILABLE (the server is down, restarting, or not yet up) is retried up to
``retries`` times with exponential backoff and jitter, as long as its deadline allows; every
call retried is idempotent (a Rewrite carries a ``request_id``, so a retry returns the version
the first attempt created instead of creating another). Any other failure raises
``RulewrightError`` at once, with the server's reason and field violations.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Mapping, Sequence, TypeVar

import grpc
import numpy as np

from rulewright.v1 import edit_pb2, generator_service_pb2 as gen, generator_service_pb2_grpc as gen_grpc
from google.longrunning import operations_pb2, operations_pb2_grpc
from google.protobuf import duration_pb2

from rulewright.v1 import images_pb2, jobs_service_pb2 as jobs_pb, jobs_service_pb2_grpc as jobs_grpc
from rulewright.v1 import registry_service_pb2 as reg, registry_service_pb2_grpc as reg_grpc

from rulewright.client.adapters import AdapterCalls
from rulewright.client.errors import RulewrightError, from_rpc_error
from rulewright.client.rescale import Rescaling
from rulewright.client.spec import edit_spec_pb, region_pb
from rulewright.client.transfer import receive_file
from rulewright.client.types import (Alias, AliasMove, ContextSearch, DatasetJob, StatisticsJob, Dissection, Export, Import, Layers, Model, Preview,
                    Progress, RewriteResult, SampledImage, SampledImages, StatisticsResult, Version)

__all__ = ["Client", "RetryEvent", "RegionLike"]

T = TypeVar("T")
RegionLike = Mapping[str, Any] | images_pb2.Region   # {"seed": 3, "box": [x0, y0, x1, y1]} or a Region
MAX_MESSAGE_BYTES = 256 << 20
CHUNK = 1 << 20


@dataclass(frozen=True)
class RetryEvent:
    """A call about to be retried: which ``method``, the ``attempt`` that failed (from 1), its
    ``error`` (UNAVAILABLE) and the ``delay`` in seconds before the next attempt."""

    method: str
    attempt: int
    error: RulewrightError
    delay: float


def _region(r: RegionLike, field: str) -> images_pb2.Region:
    return r if isinstance(r, images_pb2.Region) else region_pb(r, field)


def _model_name(model: str) -> str:
    """``faces``, ``faces@production``, ``faces/3`` or ``models/faces`` → ``faces``."""
    if model.startswith("models/"):
        model = model.split("/")[1]
    return model.split("@", 1)[0].split("/", 1)[0]


class Client(AdapterCalls, Rescaling):
    """A connection to a rulewright server.

    Args:
        address: ``host:port`` of the server.
        token: bearer token sent with every call (``authorization: Bearer <token>``); None when
            the server runs without auth.
        timeout: seconds any short call may take in all, retries included.
        long_timeout: the same for Rewrite, ComputeStatistics, ImportModel and ExportVersion.
        retries: how many times a call that failed with UNAVAILABLE is tried again.
        backoff: the first retry's delay in seconds; each further retry doubles it (up to
            ``max_backoff``), with the upper half drawn at random (jitter).
        max_backoff: the longest delay between two attempts.
        credentials: ``grpc.ssl_channel_credentials(...)`` for TLS or mTLS; None: plaintext.
        on_retry: called with a ``RetryEvent`` before each retry (logging, tests).

    Usable as a context manager; ``close()`` closes the channel.
    """

    def __init__(self, address: str, token: str | None = None, *, timeout: float = 60.0,
                 long_timeout: float = 3600.0, retries: int = 4, backoff: float = 0.25, max_backoff: float = 8.0,
                 credentials: grpc.ChannelCredentials | None = None,
                 on_retry: Callable[[RetryEvent], None] | None = None):
        self.address = address
        self.timeout = float(timeout)
        self.long_timeout = float(long_timeout)
        self.retries = int(retries)
        self.backoff = float(backoff)
        self.max_backoff = float(max_backoff)
        self.on_retry = on_retry
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        options = [("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   # reconnect soon after a restart, so that retries find the server back up
                   ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 2000)]
        self.channel = (grpc.secure_channel(address, credentials, options) if credentials is not None
                        else grpc.insecure_channel(address, options))
        self._gen = gen_grpc.GeneratorServiceStub(self.channel)
        self._reg = reg_grpc.RegistryServiceStub(self.channel)
        self._jobs = jobs_grpc.JobServiceStub(self.channel)
        self._ops = operations_pb2_grpc.OperationsStub(self.channel)

    # ---- plumbing ------------------------------------------------------------------------

    def close(self) -> None:
        """Close the channel; calls in flight are cancelled."""
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _delay(self, attempt: int) -> float:
        cap = min(self.max_backoff, self.backoff * 2 ** (attempt - 1))
        return cap / 2 + random.uniform(0, cap / 2)

    def _retrying(self, method: str, fn: Callable[[float], T], timeout: float | None) -> T:
        """``fn(seconds left)`` until it succeeds, fails with a code other than UNAVAILABLE, runs
        out of retries or the deadline passes; gRPC errors become RulewrightError."""
        deadline = time.monotonic() + (self.timeout if timeout is None else timeout)
        attempt = 0
        while True:
            attempt += 1
            try:
                return fn(max(deadline - time.monotonic(), 0.001))
            except grpc.RpcError as err:
                self._back_off(method, attempt, from_rpc_error(err), deadline)

    def _back_off(self, method: str, attempt: int, error: RulewrightError, deadline: float) -> None:
        """Sleep before the next attempt, or raise ``error`` if it is not UNAVAILABLE or the retry
        budget or the deadline would be exceeded."""
        delay = self._delay(attempt)
        if (error.code is not grpc.StatusCode.UNAVAILABLE or attempt > self.retries
                or time.monotonic() + delay >= deadline):
            raise error
        if self.on_retry is not None:
            self.on_retry(RetryEvent(method, attempt, error, delay))
        time.sleep(delay)

    def _unary(self, method: str, stub_method, request, timeout: float | None = None):
        return self._retrying(method, lambda left: stub_method(request, timeout=left, metadata=self._metadata),
                              timeout)

    def _pages(self, method: str, stub_method, request, items: str, timeout: float | None) -> list:
        out: list = []
        while True:
            page = self._unary(method, stub_method, request, timeout)
            out.extend(getattr(page, items))
            if not page.next_page_token:
                return out
            request.page_token = page.next_page_token

    def _stream(self, method: str, stub_method, request, timeout: float | None) -> Iterator:
        """Messages of a server stream; retried from the start on UNAVAILABLE (callers make that
        safe), cancelled if the caller stops reading."""
        deadline = time.monotonic() + (self.long_timeout if timeout is None else timeout)
        attempt = 0
        while True:
            attempt += 1
            call = stub_method(request, timeout=max(deadline - time.monotonic(), 0.001), metadata=self._metadata)
            try:
                yield from call
                return
            except grpc.RpcError as err:
                error = from_rpc_error(err)
            finally:
                call.cancel()   # a no-op once the stream ended; stops the server's work otherwise
            self._back_off(method, attempt, error, deadline)

    # ---- GeneratorService ------------------------------------------------------------------

    def layers(self, model: str, *, timeout: float | None = None) -> Layers:
        """The rewritable layers of ``model`` (a reference: ``faces``, ``faces@production``,
        ``faces/3``), its default layer, image resolution and latent size."""
        return Layers.from_pb(self._unary("ListLayers", self._gen.ListLayers, gen.ListLayersRequest(model=model),
                                          timeout))

    def sample(self, model: str, seeds: Iterable[int] = (), *, latents: np.ndarray | None = None,
               truncation: float | None = None, format: str = "png", strength: float | None = None,
               timeout: float | None = None) -> list[SampledImage]:
        """Render ``seeds`` (or raw ``latents``, an array (n, z_dim)) with ``model``.

        ``format`` is ``"png"`` (the server's PNG bytes) or ``"raw"`` (8-bit RGB, cheapest);
        either way each ``SampledImage`` offers ``.image`` (PIL), ``.array`` (numpy) and
        ``.png``. The images come in request order, each with the resolved version and the
        ``strength`` of its own edit (``strength``: another than the version's own; no fit).
        """
        if format not in ("png", "raw"):
            raise ValueError(f"format must be 'png' or 'raw', got {format!r}")
        request = gen.SampleRequest(model=model, seeds=list(seeds), image_format=(
            images_pb2.IMAGE_FORMAT_PNG if format == "png" else images_pb2.IMAGE_FORMAT_RAW_RGB8))
        if latents is not None:
            z = np.asarray(latents, dtype=np.float32)
            request.latents.CopyFrom(gen.Latents(count=z.shape[0], dim=z.shape[1], values=z.ravel().tolist()))
        if truncation is not None:
            request.truncation = truncation
        if strength is not None:
            request.strength = strength
        resp = self._unary("Sample", self._gen.Sample, request, timeout)
        used = resp.strength if resp.HasField("strength") else None
        return SampledImages(SampledImage.from_pb(im, resp.version, used) for im in resp.images)

    def dissect(self, model: str, regions: Sequence[RegionLike], *, layer: str = "", top: int = 10,
                rank_by: str = "iou", include_maps: bool = False, quantile: float | None = None,
                threshold_samples: int = 0, truncation: float | None = None,
                timeout: float | None = None) -> Dissection:
        """Rank the units of ``layer`` (default: the model's default layer) by how well their
        thresholded maps match ``regions`` (``{"seed", "box": [x0, y0, x1, y1]}`` dicts).

        ``rank_by`` is ``"iou"`` or ``"contrast"``; ``top`` units come back (0: all), with their
        activation maps on each region's seed if ``include_maps``. ``threshold_samples``: how
        many samples the per-unit thresholds are computed over (0: the server's default).
        """
        ranks = {"iou": gen.DissectRequest.RANK_BY_IOU, "contrast": gen.DissectRequest.RANK_BY_CONTRAST}
        if rank_by not in ranks:
            raise ValueError(f"rank_by must be one of {sorted(ranks)}, got {rank_by!r}")
        request = gen.DissectRequest(model=model, layer=layer, top=top, rank_by=ranks[rank_by],
                                     include_maps=include_maps,
                                     regions=[_region(r, f"regions[{i}]") for i, r in enumerate(regions)])
        if threshold_samples:
            request.thresholds.samples = threshold_samples
        if quantile is not None:
            request.quantile = quantile
        if truncation is not None:
            request.truncation = truncation
        return Dissection.from_pb(self._unary("Dissect", self._gen.Dissect, request, timeout))

    def search_context(self, model: str, context: Sequence[RegionLike], *, seeds: Iterable[int] = (),
                       seed_range: tuple[int, int] | None = None, layer: str = "", rank: int = 0, top: int = 16,
                       stats_samples: int = 0, include_maps: bool = False,
                       timeout: float | None = None) -> ContextSearch:
        """Rank candidate samples (``seeds``, or ``seed_range`` = (start, count)) by their
        response to the direction the ``context`` regions define: which images an edit with
        that context will touch. ``stats_samples``: samples of the key statistics (0: default)."""
        request = gen.SearchContextRequest(model=model, layer=layer, rank=rank, top=top, include_maps=include_maps,
                                           seeds=list(seeds),
                                           context=[_region(r, f"context[{i}]") for i, r in enumerate(context)])
        if seed_range is not None:
            request.seed_range.CopyFrom(gen.SeedRange(start=seed_range[0], count=seed_range[1]))
        if stats_samples:
            request.stats.samples = stats_samples
        return ContextSearch.from_pb(self._unary("SearchContext", self._gen.SearchContext, request, timeout))

    def statistics(self, model: str, *, layer: str = "", statistic: str = "key_moment", samples: int = 0,
                   seed_start: int = 0, truncation: float | None = None,
                   timeout: float | None = None) -> Iterator[Progress | StatisticsResult]:
        """Compute (or find in the server's cache) a layer statistic (``"key_moment"``, what
        every edit needs, or ``"value_quantiles"``, the dissection thresholds): yields
        ``Progress`` events, then the ``StatisticsResult``."""
        kinds = {"key_moment": gen.STATISTIC_KEY_MOMENT, "value_quantiles": gen.STATISTIC_VALUE_QUANTILES}
        if statistic not in kinds:
            raise ValueError(f"statistic must be one of {sorted(kinds)}, got {statistic!r}")
        request = gen.ComputeStatisticsRequest(model=model, layer=layer, statistic=kinds[statistic])
        request.stats.samples, request.stats.seed_start = samples, seed_start
        if truncation is not None:
            request.truncation = truncation
        for msg in self._stream("ComputeStatistics", self._gen.ComputeStatistics, request, timeout):
            if msg.WhichOneof("event") == "progress":
                yield Progress.from_pb(msg.progress)
            else:
                yield StatisticsResult.from_pb(msg.result)

    def rewrite(self, model: str, spec: Mapping[str, Any] | edit_pb2.EditSpec, *, request_id: str | None = None,
                dry_run: bool = False, preview_seeds: Iterable[int] = (), preview_format: str = "png",
                timeout: float | None = None) -> Iterator[Progress | Preview | RewriteResult]:
        """Run an edit on ``model`` (a reference; the version it resolves to is the parent).

        ``spec`` is an edit spec dict (the JSON of ``examples/edits/*.json``) or an EditSpec.
        Yields ``Progress`` events, a ``Preview`` of ``preview_seeds`` if any, and last the
        ``RewriteResult`` with the new version (none for ``dry_run``). Every call carries a
        ``request_id`` (one is generated if not given), so a retry after UNAVAILABLE returns the
        version the first attempt created. Stopping the iteration early cancels the edit, and
        a cancelled edit creates nothing. A fit that never did better than no edit raises
        FAILED_PRECONDITION (``EDIT_DID_NOT_IMPROVE``) and creates nothing.
        """
        if preview_format not in ("png", "raw"):
            raise ValueError(f"preview_format must be 'png' or 'raw', got {preview_format!r}")
        request = gen.RewriteRequest(model=model, spec=edit_spec_pb(spec), dry_run=dry_run,
                                     request_id=request_id or f"rwc-{uuid.uuid4().hex}",
                                     preview_seeds=list(preview_seeds), preview_format=(
                                         images_pb2.IMAGE_FORMAT_PNG if preview_format == "png"
                                         else images_pb2.IMAGE_FORMAT_RAW_RGB8))
        for msg in self._stream("Rewrite", self._gen.Rewrite, request, timeout):
            kind = msg.WhichOneof("event")
            if kind == "progress":
                yield Progress.from_pb(msg.progress)
            elif kind == "preview":
                yield Preview([SampledImage.from_pb(im, "") for im in msg.preview.images])
            elif kind == "result":
                yield RewriteResult.from_pb(msg.result)

    # ---- RegistryService ------------------------------------------------------------------

    def models(self, *, timeout: float | None = None) -> list[Model]:
        """Every registered model, in name order (all pages)."""
        return [Model.from_pb(m) for m in self._pages("ListModels", self._reg.ListModels, reg.ListModelsRequest(),
                                                      "models", timeout)]

    def model(self, model: str, *, timeout: float | None = None) -> Model:
        """One model (by name, e.g. ``faces``), with its aliases."""
        return Model.from_pb(self._unary("GetModel", self._reg.GetModel,
                                         reg.GetModelRequest(name=f"models/{_model_name(model)}"), timeout))

    def versions(self, model: str, *, timeout: float | None = None) -> list[Version]:
        """The live versions of ``model``, oldest first (all pages)."""
        return [Version.from_pb(v) for v in self._pages(
            "ListVersions", self._reg.ListVersions, reg.ListVersionsRequest(parent=f"models/{_model_name(model)}"),
            "versions", timeout)]

    def version(self, model: str, number: int, *, timeout: float | None = None) -> Version:
        """Version ``number`` of ``model``."""
        return Version.from_pb(self._unary("GetVersion", self._reg.GetVersion, reg.GetVersionRequest(
            name=f"models/{_model_name(model)}/versions/{int(number)}"), timeout))

    def delete_version(self, model: str, number: int, *, reason: str = "", timeout: float | None = None) -> None:
        """Delete version ``number`` (a tombstone stays; refused while an alias or a child needs it)."""
        self._unary("DeleteVersion", self._reg.DeleteVersion, reg.DeleteVersionRequest(
            name=f"models/{_model_name(model)}/versions/{int(number)}", reason=reason), timeout)

    def delete_model(self, model: str, *, force: bool = False, timeout: float | None = None) -> None:
        """Delete ``model``; with versions only if ``force``."""
        self._unary("DeleteModel", self._reg.DeleteModel,
                    reg.DeleteModelRequest(name=f"models/{_model_name(model)}", force=force), timeout)

    def aliases(self, model: str, *, timeout: float | None = None) -> dict[str, Alias]:
        """The aliases of ``model`` that are set, by alias name."""
        return self.model(model, timeout=timeout).aliases

    def alias(self, model: str, alias: str, *, timeout: float | None = None) -> Alias:
        """One alias of ``model``; NOT_FOUND (reason ``ALIAS_NOT_FOUND``) if it is not set."""
        found = self.aliases(model, timeout=timeout).get(alias)
        if found is None:
            raise RulewrightError(grpc.StatusCode.NOT_FOUND, f"alias {alias!r} of {_model_name(model)!r} is not set",
                                  "ALIAS_NOT_FOUND")
        return found

    def set_alias(self, model: str, alias: str, version: int, *, expected_version: int | None = None,
                  etag: str | None = None, reason: str = "", timeout: float | None = None) -> Alias:
        """Point ``alias`` of ``model`` at ``version`` (0 unsets it) by compare-and-set.

        The move happens only if the alias is where the caller expects: ``etag`` (from
        ``Alias.etag``) or ``expected_version`` (0 for a new alias). Giving neither moves it
        from the state read just before (still refused if it moves in between). A lost race
        raises ABORTED (``ALIAS_CONFLICT``) with the current version and etag in ``metadata``.
        """
        request = reg.SetAliasRequest(name=f"models/{_model_name(model)}/aliases/{alias}", version=int(version),
                                      reason=reason)
        if etag is not None:
            request.etag = etag
        elif expected_version is not None:
            request.expected_version = int(expected_version)
        else:
            current = self.aliases(model, timeout=timeout).get(alias)
            if current is not None:
                request.etag = current.etag
            else:
                request.expected_version = 0
        return Alias.from_pb(self._unary("SetAlias", self._reg.SetAlias, request, timeout))

    def alias_history(self, model: str, alias: str = "production", *, timeout: float | None = None) -> list[AliasMove]:
        """Every move of ``alias``, oldest first (all pages)."""
        return [AliasMove.from_pb(m) for m in self._pages(
            "ListAliasHistory", self._reg.ListAliasHistory,
            reg.ListAliasHistoryRequest(parent=f"models/{_model_name(model)}/aliases/{alias}"), "moves", timeout)]

    def rollback(self, model: str, alias: str = "production", *, reason: str = "", etag: str | None = None,
                 timeout: float | None = None) -> Alias:
        """Move ``alias`` back to where its latest move came from (server-side RollbackAlias).

        Compare-and-set on ``etag`` (from ``Alias.etag``), else on the state read just before, so
        a concurrent move makes this fail with ABORTED (``ALIAS_CONFLICT``) instead of being undone
        blindly. Rolling back twice moves it forward again, like ``cd -``. FAILED_PRECONDITION
        (``NO_EARLIER_VERSION``) when there is nothing to go back to; NOT_FOUND
        (``ALIAS_NOT_FOUND``) for an alias that was never set.
        """
        if etag is None:
            # Pinning the state makes a retry after UNAVAILABLE safe: had the first attempt
            # landed, the retry is ABORTED rather than rolling back a second time (forward again).
            current = self.aliases(model, timeout=timeout).get(alias)
            etag = current.etag if current is not None else None
        request = reg.RollbackAliasRequest(name=f"models/{_model_name(model)}/aliases/{alias}", etag=etag or "",
                                           reason=reason)
        return Alias.from_pb(self._unary("RollbackAlias", self._reg.RollbackAlias, request, timeout))

    def export(self, model: str, version: int, path: str | os.PathLike, *, timeout: float | None = None) -> Export:
        """Download version ``version``'s materialized weights (one safetensors file) to
        ``path``. The bytes are checked against the size and sha256 the server announced
        (DATA_LOSS otherwise) and only then renamed into place."""
        path = Path(path)
        request = reg.ExportVersionRequest(name=f"models/{_model_name(model)}/versions/{int(version)}")
        part = path.with_name(path.name + ".part")

        def download(left: float) -> Export:
            call = self._reg.ExportVersion(request, timeout=left, metadata=self._metadata)
            meta, size = receive_file(call, part, path, f"export of {request.name}")
            return Export(str(path), Version.from_pb(meta.version), size, meta.sha256)

        try:
            return self._retrying("ExportVersion", download, self.long_timeout if timeout is None else timeout)
        finally:
            part.unlink(missing_ok=True)

    def import_model(self, model_id: str, weights: str | os.PathLike | bytes | BinaryIO, *, arch: str,
                     config: Mapping[str, Any], description: str = "", source: Mapping[str, Any] | None = None,
                     request_id: str | None = None, timeout: float | None = None) -> Import:
        """Register model ``model_id`` with version 1 from safetensors ``weights`` (a path, the
        bytes or a binary file), of architecture ``arch`` (``dcgan``, ``progan``, ``stylegan2``)
        with its ``config``. An NVIDIA StyleGAN2-ADA network pickle (``.pkl``) may be sent as is
        with ``arch="stylegan2"`` and ``config={}``: the server reads it as data and converts it.
        The size and sha256 travel along and are checked by the server; a ``request_id``
        (generated if not given) makes the retry after UNAVAILABLE safe."""
        if isinstance(weights, (bytes, bytearray)):
            data = bytes(weights)
        elif hasattr(weights, "read"):
            data = weights.read()
        else:
            data = Path(weights).read_bytes()
        meta = reg.ImportModelMetadata(model_id=model_id, arch=arch, config_json=json.dumps(dict(config)),
                                       description=description, spec_json=json.dumps(dict(source or {})),
                                       request_id=request_id or f"rwc-{uuid.uuid4().hex}", size_bytes=len(data),
                                       sha256=hashlib.sha256(data).hexdigest())

        def messages() -> Iterator[reg.ImportModelRequest]:
            yield reg.ImportModelRequest(metadata=meta)
            view = io.BytesIO(data)
            while chunk := view.read(CHUNK):
                yield reg.ImportModelRequest(chunk=chunk)

        return Import.from_pb(self._retrying(
            "ImportModel", lambda left: self._reg.ImportModel(messages(), timeout=left, metadata=self._metadata),
            self.long_timeout if timeout is None else timeout))

    # ---- dataset jobs (google.longrunning.Operations) -------------------------------------

    def create_dataset_job(self, model: str, seeds: range, *, shard_size: int = 1000,
                           truncation: float | None = None, request_id: str | None = None,
                           output_uri: str = "", timeout: float | None = None) -> DatasetJob:
        """Start rendering ``seeds`` (a step-1 range) of ``model`` into WebDataset shards; returns at once.

        The job is a long-running operation: follow it with ``dataset_job``, ``wait_dataset_job``
        or ``watch_dataset_job``. A ``request_id`` (one is made up if None) makes retries return
        the job the first attempt created. ``output_uri`` (``s3://bucket/prefix`` or ``file:///path``,
        under a prefix the server's operator allowed) puts the shards and manifest there instead of
        the registry's store.
        """
        if not isinstance(seeds, range) or seeds.step != 1 or len(seeds) < 1:
            raise ValueError("seeds must be a non-empty range with step 1, e.g. range(0, 10000)")
        request = jobs_pb.CreateDatasetJobRequest(model=model, seeds=gen.SeedRange(start=seeds.start, count=len(seeds)),
                                                  shard_size=shard_size, request_id=request_id or str(uuid.uuid4()),
                                                  output_uri=output_uri)
        if truncation is not None:
            request.truncation = truncation
        return DatasetJob.from_operation(self._unary("CreateDatasetJob", self._jobs.CreateDatasetJob, request, timeout))

    def dataset_job(self, name: str, *, timeout: float | None = None) -> DatasetJob:
        """A dataset job as it stands (``operations/{id}`` or the bare id)."""
        op = self._unary("GetOperation", self._ops.GetOperation,
                         operations_pb2.GetOperationRequest(name=_operation(name)), timeout)
        return DatasetJob.from_operation(op)

    def dataset_jobs(self, *, timeout: float | None = None) -> list[DatasetJob]:
        """Every dataset job the server's store holds, oldest first."""
        ops = self._pages("ListOperations", self._ops.ListOperations,
                          operations_pb2.ListOperationsRequest(name="operations"), "operations", timeout)
        return [DatasetJob.from_operation(op) for op in ops if op.metadata.Is(jobs_pb.DatasetJobMetadata.DESCRIPTOR)]

    def cancel_dataset_job(self, name: str, *, timeout: float | None = None) -> DatasetJob:
        """Ask a dataset job to stop between shards; the job as it stands after the request."""
        self._unary("CancelOperation", self._ops.CancelOperation,
                    operations_pb2.CancelOperationRequest(name=_operation(name)), timeout)
        return self.dataset_job(name, timeout=timeout)

    def delete_dataset_job(self, name: str, *, timeout: float | None = None) -> None:
        """Remove a finished dataset job with its shards and manifest."""
        self._unary("DeleteOperation", self._ops.DeleteOperation,
                    operations_pb2.DeleteOperationRequest(name=_operation(name)), timeout)

    def watch_dataset_job(self, name: str, *, poll_s: float = 2.0, timeout: float | None = None) -> Iterator[DatasetJob]:
        """The job after each WaitOperation of up to ``poll_s`` seconds, until it is done (or ``timeout``,
        default ``long_timeout``, passes); the last one yielded is done unless the time ran out."""
        return self._watch(name, DatasetJob.from_operation, poll_s, timeout)

    def _watch(self, name: str, parse, poll_s: float, timeout: float | None) -> Iterator:
        deadline = time.monotonic() + (self.long_timeout if timeout is None else timeout)
        while True:
            left = deadline - time.monotonic()
            wait = max(0.0, min(poll_s, left))
            request = operations_pb2.WaitOperationRequest(name=_operation(name),
                                                          timeout=duration_pb2.Duration(seconds=int(wait),
                                                                                        nanos=int(wait % 1 * 1e9)))
            job = parse(self._unary("WaitOperation", self._ops.WaitOperation, request, wait + self.timeout))
            yield job
            if job.done or time.monotonic() >= deadline:
                return

    def wait_dataset_job(self, name: str, *, timeout: float | None = None) -> DatasetJob:
        """The dataset job once it is done (or as it stands when ``timeout`` passes)."""
        return _last(self.watch_dataset_job(name, timeout=timeout))

    # ---- statistics jobs (google.longrunning.Operations) ----------------------------------

    def create_statistics_job(self, model: str, samples: int, *, layer: str = "", seed_start: int = 0,
                              truncation: float | None = None, shard_size: int = 10_000,
                              request_id: str | None = None, timeout: float | None = None) -> StatisticsJob:
        """Start computing ``layer``'s key moment over ``samples`` seeds from ``seed_start``; returns at once.

        Once it succeeds, a Rewrite (or SearchContext) whose ``stats`` name the same samples and
        seed_start finds the moment cached, even beyond the server's per-request max_stats_samples.
        Follow it with ``statistics_job``, ``wait_statistics_job`` or ``watch_statistics_job``.
        """
        request = jobs_pb.CreateStatisticsJobRequest(model=model, layer=layer,
                                                     stats=edit_pb2.StatisticsSpec(samples=samples,
                                                                                   seed_start=seed_start),
                                                     shard_size=shard_size, request_id=request_id or str(uuid.uuid4()))
        if truncation is not None:
            request.truncation = truncation
        return StatisticsJob.from_operation(self._unary("CreateStatisticsJob", self._jobs.CreateStatisticsJob,
                                                        request, timeout))

    def statistics_job(self, name: str, *, timeout: float | None = None) -> StatisticsJob:
        """A statistics job as it stands (``operations/{id}`` or the bare id)."""
        return StatisticsJob.from_operation(self._unary("GetOperation", self._ops.GetOperation,
                                                        operations_pb2.GetOperationRequest(name=_operation(name)),
                                                        timeout))

    def statistics_jobs(self, *, timeout: float | None = None) -> list[StatisticsJob]:
        """Every statistics job the server's store holds, oldest first."""
        ops = self._pages("ListOperations", self._ops.ListOperations,
                          operations_pb2.ListOperationsRequest(name="operations"), "operations", timeout)
        return [StatisticsJob.from_operation(op) for op in ops
                if op.metadata.Is(jobs_pb.StatisticsJobMetadata.DESCRIPTOR)]

    def cancel_statistics_job(self, name: str, *, timeout: float | None = None) -> StatisticsJob:
        """Ask a statistics job to stop between shards; the job as it stands after the request."""
        self._unary("CancelOperation", self._ops.CancelOperation,
                    operations_pb2.CancelOperationRequest(name=_operation(name)), timeout)
        return self.statistics_job(name, timeout=timeout)

    def watch_statistics_job(self, name: str, *, poll_s: float = 2.0,
                             timeout: float | None = None) -> Iterator[StatisticsJob]:
        """The job after each WaitOperation of up to ``poll_s`` seconds, until it is done (or ``timeout`` passes)."""
        return self._watch(name, StatisticsJob.from_operation, poll_s, timeout)

    def wait_statistics_job(self, name: str, *, timeout: float | None = None) -> StatisticsJob:
        """The statistics job once it is done (or as it stands when ``timeout`` passes)."""
        return _last(self.watch_statistics_job(name, timeout=timeout))


def _last(jobs: Iterator[Any]) -> Any:
    """The last state a watch yields (it yields at least one)."""
    job = None
    for job in jobs:
        pass
    assert job is not None
    return job


def _operation(name: str) -> str:
    """``operations/{id}`` for an operation name or a bare job id."""
    return name if name.startswith("operations/") else f"operations/{name}"
