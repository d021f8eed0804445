"""rulewright's registry: versioned weights on object storage, aliases with history, a statistics cache.

- ``Registry`` (``registry``): models, immutable numbered versions, aliases with compare-and-set
  and an append-only history; ``Registry.open(uri)``. Each resource has its module (``models``,
  ``versions``, ``aliases``) over the shared ``documents`` (keys, tombstones, deletion markers).
- ``open_store(uri)`` (``stores``): ``BlobStore`` backends by scheme, ``FileStore``
  (``file://``, the default) and ``S3Store`` (``s3://``, configured by ``S3Config``); the store
  contract (``blobstore``) includes ``call_deadline``, the caller's deadline for store calls.
- ``errors``: ``RegistryError`` with a closed set of ``Code`` and stable ``Reason`` values.
- ``manifests``: ``Model``, ``Version``, ``AliasEntry``, ``AliasState``, ``Page``.
- ``stats_cache``: ``StatsKey``, ``LocalStatsCache``, ``RedisStatsCache``, ``open_stats_cache``.
- ``gc``: ``scan`` and ``collect``; ``python -m rulewright.registry check|gc --store URI``.

Nothing here imports torch: versions are materialized into weights on the service side
(``rulewright.service.domain.weights``).
"""

from rulewright.registry.blobstore import BlobInfo, BlobRef, BlobStore, default_store_uri
from rulewright.registry.stores import open_store
from rulewright.registry.errors import Code, Reason, RegistryError
from rulewright.registry.manifests import AliasEntry, AliasState, Model, Page, Version
from rulewright.registry.registry import ANY, Registry
from rulewright.registry.stats_cache import LocalStatsCache, RedisStatsCache, StatsCache, StatsKey, open_stats_cache

__all__ = [
    "ANY",
    "AliasEntry",
    "AliasState",
    "BlobInfo",
    "BlobRef",
    "BlobStore",
    "Code",
    "LocalStatsCache",
    "Model",
    "Page",
    "Reason",
    "RedisStatsCache",
    "Registry",
    "RegistryError",
    "StatsCache",
    "StatsKey",
    "Version",
    "default_store_uri",
    "open_stats_cache",
    "open_store",
]
