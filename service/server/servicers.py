"""Thin servicers over the domain layer: unpack the request, call ``Domain``, build the response.

- ``GeneratorServicer``: ListLayers, Sample, Dissect, SearchContext, Rewrite and
  ComputeStatistics (server streaming; a worker thread runs the job, progress comes back
  through a queue; the client's cancellation or deadline stops it).
- ``RegistryServicer``: ListModels, GetModel, ImportModel (client streaming, at most
  ``max_import_bytes``), DeleteModel, ListVersions, GetVersion, DeleteVersion, ExportVersion,
  SetAlias, RollbackAlias, ListAliasHistory.

Errors go through
``errors.rpc``; conversions live in ``convert`` (this module imports no torch, S3 or Redis).
"""

from __future__ import annotations

import queue
import threading

from rulewright.v1 import generator_service_pb2 as gen, generator_service_pb2_grpc as gen_grpc
from rulewright.v1 import registry_service_pb2 as reg, registry_service_pb2_grpc as reg_grpc

from . import convert
from .auth import current_principal
from .errors import rpc
from .limits import check_dissect, check_sample, check_search, check_statistics

_DONE = object()
NAME_FIELDS = {"model": "name", "version": "name", "alias": "name"}   # registry fields → `name`
MAX_IMPORT_BYTES = 2 << 30                                             # ImportModel's default limit


def _streamed(workers: set, context, work):
    """Messages from ``work(emit, should_stop)`` run on a worker thread, as they come; its error last."""
    events: queue.Queue = queue.Queue()
    stop = threading.Event()
    context.add_callback(stop.set)

    def run():
        try:
            work(events.put, lambda: stop.is_set() or not context.is_active())
        except BaseException as exc:  # noqa: BLE001 -- handed to the RPC thread, which maps it
            events.put(exc)
        finally:
            events.put(_DONE)
            workers.discard(threading.current_thread())

    worker = threading.Thread(target=run, daemon=True)
    workers.add(worker)
    worker.start()
    while (item := events.get()) is not _DONE:
        if isinstance(item, BaseException):
            raise item
        yield item


class GeneratorServicer(gen_grpc.GeneratorServiceServicer):
    """GeneratorService over a ``Domain``."""

    def __init__(self, domain):
        self.domain = domain
        self.workers: set[threading.Thread] = set()   # running Rewrite jobs (tests and shutdown join them)

    @rpc()
    def ListLayers(self, request, context):
        version, infos, default = self.domain.list_layers(request.model)
        model = self.domain.generator(version).model
        return gen.ListLayersResponse(version=convert.version_name(version), layers=map(convert.layer_pb, infos),
                                      default_layer=default, image_resolution=model.resolution, z_dim=model.z_dim)

    @rpc(fields={"z": "latents"})
    def Sample(self, request, context):
        check_sample(self.domain.limits, request)
        seeds = convert.seeds(request.seeds)
        fmt = convert.image_format(request.image_format)
        z = convert.latents_tensor(request.latents) if request.HasField("latents") else None
        layer, interventions = convert.interventions(request.interventions)
        truncation = convert.sample_truncation(self.domain, request)
        version, images = self.domain.sample(request.model, seeds=seeds, z=z, truncation=truncation, layer=layer,
                                             interventions=interventions, should_stop=lambda: not context.is_active(),
                                             field="seeds" if z is None else "latents.count")
        return gen.SampleResponse(version=convert.version_name(version),
                                  images=convert.images_pb(images, fmt, seeds))

    @rpc()
    def Dissect(self, request, context):
        check_dissect(self.domain.limits, request)
        return convert.dissect_pb(self.domain.dissect(request.model, **convert.dissect_args(request),
                                                      should_stop=lambda: not context.is_active()))

    @rpc()
    def SearchContext(self, request, context):
        check_search(self.domain.limits, request)
        args = convert.search_args(request)
        version, matches, threshold = self.domain.search(request.model, **args,
                                                         should_stop=lambda: not context.is_active())
        layer = args["layer"] or self.domain.generator(version).model.default_layer()
        return convert.search_pb(version, layer, matches, threshold, request.include_maps)

    @rpc()
    def ComputeStatistics(self, request, context):
        check_statistics(self.domain.limits, request)
        args = convert.statistics_args(request)

        def work(emit, should_stop):
            progress = lambda e: emit(gen.ComputeStatisticsResponse(progress=convert.progress_pb(e)))  # noqa: E731
            result = self.domain.compute_statistic(request.model, progress=progress, should_stop=should_stop, **args)
            emit(gen.ComputeStatisticsResponse(result=convert.statistics_result_pb(result)))
        yield from _streamed(self.workers, context, work)

    @rpc(prefix="spec.")
    def Rewrite(self, request, context):
        convert.check_rewrite_request(request, self.domain.limits)
        events: queue.Queue = queue.Queue()
        spec = convert.edit_spec(request.spec)
        stop = threading.Event()
        context.add_callback(stop.set)
        worker = threading.Thread(target=self._rewrite, args=(request, spec, events, stop, context,
                                                              current_principal()), daemon=True)
        self.workers.add(worker)
        worker.start()
        while (item := events.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item

    def _rewrite(self, request, spec, events, stop, context, author):
        def progress(event):
            if (msg := convert.progress_pb(event)) is not None:
                events.put(gen.RewriteResponse(progress=msg))
        try:
            result = self.domain.rewrite(
                request.model, spec, author=author, request_id=request.request_id or None, dry_run=request.dry_run,
                preview_seeds=list(request.preview_seeds), progress=progress,
                should_stop=lambda: stop.is_set() or not context.is_active())
            if result.previews is not None:
                events.put(gen.RewriteResponse(preview=gen.RewritePreview(images=convert.images_pb(
                    result.previews, request.preview_format, list(request.preview_seeds)))))
            events.put(gen.RewriteResponse(result=convert.rewrite_result_pb(self.domain.registry, result)))
        except BaseException as exc:  # noqa: BLE001 -- handed to the RPC thread, which maps it
            events.put(exc)
        finally:
            events.put(_DONE)
            self.workers.discard(threading.current_thread())


class RegistryServicer(reg_grpc.RegistryServiceServicer):
    """RegistryService over the domain's ``Registry``."""

    def __init__(self, domain, max_import_bytes: int = MAX_IMPORT_BYTES):
        self.domain = domain
        self.registry = domain.registry
        self.max_import_bytes = max_import_bytes    # ImportModel uploads above it: RESOURCE_EXHAUSTED

    @rpc(fields=convert.IMPORT_FIELDS)
    def ImportModel(self, request_iterator, context):
        meta, data = convert.import_upload(request_iterator, self.max_import_bytes)
        version = self.domain.import_model(data=data, author=current_principal(), **convert.import_args(meta))
        return convert.import_pb(self.registry, version)

    @rpc()
    def ListModels(self, request, context):
        page = self.registry.list_models(request.page_size, request.page_token)
        return reg.ListModelsResponse(models=[convert.model_pb(self.registry, m) for m in page.items],
                                      next_page_token=page.next_page_token)

    @rpc(fields=NAME_FIELDS)
    def GetModel(self, request, context):
        return convert.model_pb(self.registry, self.registry.get_model(convert.parse_model(request.name)))

    @rpc(fields=NAME_FIELDS)
    def DeleteModel(self, request, context):
        self.registry.delete_model(convert.parse_model(request.name), force=request.force, author=current_principal())
        return convert.empty()

    @rpc(fields={"model": "parent"})
    def ListVersions(self, request, context):
        page = self.registry.list_versions(convert.parse_model(request.parent, "parent"), request.page_size,
                                           request.page_token)
        return reg.ListVersionsResponse(versions=convert.version_pbs(self.registry, page.items),
                                        next_page_token=page.next_page_token)

    @rpc(fields=NAME_FIELDS)
    def GetVersion(self, request, context):
        return convert.version_pb(self.registry, self.registry.get_version(*convert.parse_version(request.name)))

    @rpc(fields=NAME_FIELDS)
    def DeleteVersion(self, request, context):
        self.registry.delete_version(*convert.parse_version(request.name), reason=request.reason,
                                     author=current_principal())
        return convert.empty()

    @rpc(fields=NAME_FIELDS)
    def ExportVersion(self, request, context):
        yield from convert.export_stream(self.registry, request.name)

    @rpc(fields=NAME_FIELDS)
    def SetAlias(self, request, context):
        model, alias = convert.parse_alias(request.name)
        return convert.alias_pb(convert.move_alias(self.registry, model, alias, request, current_principal()))

    @rpc(fields=NAME_FIELDS)
    def RollbackAlias(self, request, context):
        model, alias = convert.parse_alias(request.name)
        return convert.alias_pb(convert.rollback_alias(self.registry, model, alias, request, current_principal()))

    @rpc(fields={"model": "parent", "alias": "parent"})
    def ListAliasHistory(self, request, context):
        model, alias = convert.parse_alias(request.parent, "parent")
        page = self.registry.alias_history(model, alias, request.page_size, request.page_token)
        return reg.ListAliasHistoryResponse(moves=map(convert.alias_move_pb, page.items),
                                            next_page_token=page.next_page_token)
