"""rulewright-client: a typed Python client for rulewright, the service that rewrites GANs.

```python
from rulewright.client import Client, RewriteResult

with Client("127.0.0.1:50051", token=None) as rw:
    album = rw.sample("faces@production", range(16))        # [SampledImage] (.image, .array, .png)
    for event in rw.rewrite("faces", json.load(open("examples/edits/glasses.json"))):
        print(event)                                          # Progress ..., then RewriteResult
    rw.set_alias("faces", "production", event.version.number)
    rw.rollback("faces")                                      # back to where it was
```

Every call has a deadline and retries UNAVAILABLE with backoff; failures raise
``RulewrightError`` (code, message, reason, field_violations). The ``rulewright`` command is
``rulewright.client.cli``.
"""

from rulewright.client.adapters import AdapterExport
from rulewright.client.client import Client, RetryEvent
from rulewright.client.errors import RulewrightError
from rulewright.client.spec import edit_spec_pb, parse_region, parse_seeds, region_dict
from rulewright.client.types import (Alias, AliasMove, ContextMatch, ContextSearch, DatasetJob, Dissection, Export, Import, Layer, Layers,
                    Model, Preview, Progress, RewriteResult, SampledImage, SampledImages, StatisticsJob, StatisticsResult, UnitMap,
                    UnitScore, Version, version_number)

__all__ = [
    "AdapterExport", "Client", "RetryEvent", "RulewrightError", "edit_spec_pb", "parse_region", "parse_seeds", "region_dict",
    "Alias", "AliasMove", "ContextMatch", "ContextSearch", "DatasetJob", "Dissection", "Export", "Import", "Layer", "Layers",
    "Model", "Preview", "Progress", "RewriteResult", "SampledImage", "SampledImages", "StatisticsJob", "StatisticsResult", "UnitMap", "UnitScore",
    "Version", "version_number",
]
__version__ = "0.1.0"
