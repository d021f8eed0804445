"""Thin servicers over the domain layer: unpack the request, call ``Domain``, build the response.

- ``GeneratorServicer``: ListLayers, Sample, Dissect, SearchContext, Rewrite and
  ComputeStatistics (server streaming; a worker thread runs the job, progress comes back
  through its event log; the client's cancellation or deadline stops it).
- ``RegistryServicer``: ListModels, GetModel, ImportModel (client streaming, at most
  ``max_import_bytes``), DeleteModel, ListVersions, GetVersion, DeleteVersion, ExportVersion,
  SetAlias, RollbackAlias, ListAliasHistory, RescaleVersion; ExportAdapter and ImportAdapter (``adapters``).

Errors go through
``errors.rpc``; conversions live in ``convert`` (this module imports no torch, S3 or Redis).
"""

from __future__ import annotations

import secrets

from rulewright.service.domain.requests import Progress, RescaleRequest, VersionRef
from rulewright.service.jobs.memory import Job
from rulewright.service.jobs.protocol import FAILED, Runner
from rulewright.v1 import generator_service_pb2 as gen, generator_service_pb2_grpc as gen_grpc
from rulewright.v1 import registry_service_pb2 as reg, registry_service_pb2_grpc as reg_grpc

from rulewright.service.server import convert
from rulewright.service.server.adapters import AdapterRpcs
from rulewright.service.server.auth import current_principal
from rulewright.service.server.errors import renamed, rpc
from rulewright.service.server.convert import check_dissect, check_search

NAME_FIELDS = {"model": "name", "version": "name", "alias": "name"}   # registry fields → `name`
MAX_IMPORT_BYTES = 2 << 30                                             # ImportModel's default limit


def _stopping(context) -> Progress:
    """Progress for unary work: no events, stopped once the client cancels or its deadline passes."""
    return Progress(None, lambda: not context.is_active())


def _streamed(workers: Runner, context, work):
    """Messages from ``work(emit, progress)`` run as a job on ``workers``, as they come; its error last.

    ``progress`` stops once the client cancels, its deadline passes or the server shuts down. However
    the call ends (the client gone, the server stopping), it returns only once the worker has.
    """
    job = Job(f"stream-{secrets.token_hex(6)}")
    context.add_callback(job.stop.set)

    def run(emit, should_stop):
        work(emit, Progress(None, lambda: should_stop() or not context.is_active()))

    if workers.start(job.id, lambda stop: job.run(run, lambda exc: (FAILED, exc)), stop=job.stop) is None:
        job.stop.set()              # the server is stopping: the work stops at its first check, here
        job.run(run, lambda exc: (FAILED, exc))
    try:
        seen = 0
        while True:
            events, over = job.wait(seen, None)
            for seen, name, item in events:
                if name == "error":
                    raise item
                if name == "progress":
                    yield item
            if over:
                return
    finally:
        job.stop.set()
        workers.join(job.id)


class GeneratorServicer(gen_grpc.GeneratorServiceServicer):
    """GeneratorService over a ``Domain``: each method maps its message to a typed request and back."""

    def __init__(self, domain):
        self.domain = domain
        self.workers = Runner("stream")                # running streamed jobs (tests and shutdown join them)

    @rpc()
    def ListLayers(self, request, context):
        return convert.layers_pb(self.domain.list_layers(request.model))

    @rpc(fields={"z": "latents"})
    def Sample(self, request, context):
        fmt = convert.image_format(request.image_format)
        result = self.domain.sample(convert.sample_request(request, self.domain.limits), _stopping(context))
        return gen.SampleResponse(version=convert.version_name(result.version), strength=result.strength,
                                  images=convert.images_pb(result.images, fmt, list(request.seeds)))

    @rpc()
    def Dissect(self, request, context):
        check_dissect(self.domain.limits, request)
        return convert.dissect_pb(self.domain.dissect(convert.dissect_request(request), _stopping(context)))

    @rpc()
    def SearchContext(self, request, context):
        check_search(self.domain.limits, request)
        call = convert.search_request(request)
        with renamed({"seeds": "seed_range.count"} if request.HasField("seed_range") else {}):
            result = self.domain.search(call, _stopping(context))
        return convert.search_pb(result, request.include_maps)

    @rpc()
    def ComputeStatistics(self, request, context):
        call = convert.statistics_request(request)

        def work(emit, progress):
            def event(e):
                if (msg := convert.progress_pb(e)) is not None:
                    emit(gen.ComputeStatisticsResponse(progress=msg))
            result = self.domain.compute_statistic(call, Progress(event, progress.should_stop))
            emit(gen.ComputeStatisticsResponse(result=convert.statistics_result_pb(result)))
        yield from _streamed(self.workers, context, work)

    @rpc()
    def Rewrite(self, request, context):
        call = convert.rewrite_request(request, current_principal(), self.domain.limits)

        def work(emit, progress):
            def event(e):
                if (msg := convert.progress_pb(e)) is not None:
                    emit(gen.RewriteResponse(progress=msg))
            result = self.domain.rewrite(call, Progress(event, progress.should_stop))
            if result.previews is not None:
                emit(gen.RewriteResponse(preview=gen.RewritePreview(images=convert.images_pb(
                    result.previews, request.preview_format, list(request.preview_seeds)))))
            chain = self.domain.lineages([result.version])[0] if result.version is not None else None
            emit(gen.RewriteResponse(result=convert.rewrite_result_pb(result, chain)))
        yield from _streamed(self.workers, context, work)


class RegistryServicer(AdapterRpcs, reg_grpc.RegistryServiceServicer):
    """RegistryService over the ``Domain``'s registry work."""

    def __init__(self, domain, max_import_bytes: int = MAX_IMPORT_BYTES):
        self.domain = domain
        self.max_import_bytes = max_import_bytes    # ImportModel uploads above it: RESOURCE_EXHAUSTED

    def _version_pb(self, version):
        return convert.version_pb(version, self.domain.lineages([version])[0])

    @rpc(fields=convert.IMPORT_FIELDS)
    def ImportModel(self, request_iterator, context):
        meta, data = convert.import_upload(request_iterator, self.max_import_bytes)
        version = self.domain.import_model(data=data, author=current_principal(), **convert.import_args(meta))
        return convert.import_pb(self.domain.describe_model(version.model), version)

    @rpc()
    def ListModels(self, request, context):
        page = self.domain.list_models(request.page_size, request.page_token)
        return reg.ListModelsResponse(models=[convert.model_pb(summary) for summary in page.items],
                                      next_page_token=page.next_page_token)

    @rpc(fields=NAME_FIELDS)
    def GetModel(self, request, context):
        return convert.model_pb(self.domain.describe_model(convert.parse_model(request.name)))

    @rpc(fields=NAME_FIELDS)
    def DeleteModel(self, request, context):
        self.domain.delete_model(convert.parse_model(request.name), force=request.force, author=current_principal())
        return convert.empty()

    @rpc(fields={"model": "parent"})
    def ListVersions(self, request, context):
        page = self.domain.list_versions(convert.parse_model(request.parent, "parent"), request.page_size,
                                         request.page_token)
        return reg.ListVersionsResponse(versions=convert.version_pbs([s.version for s in page.items],
                                                                     [s.lineage for s in page.items]),
                                        next_page_token=page.next_page_token)

    @rpc(fields=NAME_FIELDS)
    def GetVersion(self, request, context):
        found = self.domain.get_version(*convert.parse_version(request.name))
        return convert.version_pb(found.version, found.lineage)

    @rpc(fields=NAME_FIELDS)
    def DeleteVersion(self, request, context):
        self.domain.delete_version(*convert.parse_version(request.name), reason=request.reason,
                                   author=current_principal())
        return convert.empty()

    @rpc(fields=NAME_FIELDS)
    def ExportVersion(self, request, context):
        version, data = self.domain.export(*convert.parse_version(request.name))
        yield from convert.export_stream(self._version_pb(version), data)

    @rpc(fields=NAME_FIELDS)
    def SetAlias(self, request, context):
        model, alias = convert.parse_alias(request.name)
        return convert.alias_pb(self.domain.set_alias(convert.alias_request(request, model, alias,
                                                                            current_principal())))

    @rpc(fields=NAME_FIELDS)
    def RollbackAlias(self, request, context):
        model, alias = convert.parse_alias(request.name)
        return convert.alias_pb(self.domain.rollback_alias(model, alias, etag=request.etag, reason=request.reason,
                                                           author=current_principal()))

    @rpc(fields=NAME_FIELDS)
    def RescaleVersion(self, request, context):
        ref = (VersionRef(*convert.parse_version(request.name)) if request.name.startswith("models/")
               else request.name)
        version = self.domain.rescale(RescaleRequest(ref, request.strength, request.description or None,
                                                     current_principal(), request.request_id or None))
        return self._version_pb(version)

    @rpc(fields={"model": "parent", "alias": "parent"})
    def ListAliasHistory(self, request, context):
        model, alias = convert.parse_alias(request.parent, "parent")
        page = self.domain.alias_history(model, alias, request.page_size, request.page_token)
        return reg.ListAliasHistoryResponse(moves=map(convert.alias_move_pb, page.items),
                                            next_page_token=page.next_page_token)
