"""A Ray task that kills its own worker process mid-shard on its first attempt (``test_ray_jobs``).

Imported by Ray workers (the test puts the repository on their ``PYTHONPATH``). The marker files
in ``$RULEWRIGHT_FAULT_DIR`` are created with O_EXCL, so exactly one attempt per shard dies, and
whether the kill happened is recorded outside the dead process.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

from rulewright.registry.filestore import FileStore
from rulewright.service.jobs import ray_executor as ray_jobs

KILL_DURING_TAR = 2        # dies while the tar is written (half of it spilled to tmp/ on a filesystem)
KILL_BEFORE_RECORD = 4     # dies after the tar is published, before its commit record


def _first_attempt(index: int) -> bool:
    try:
        os.close(os.open(Path(os.environ["RULEWRIGHT_FAULT_DIR"]) / f"killed-{index}", os.O_CREAT | os.O_EXCL))
        return True
    except FileExistsError:
        return False


def _dying_publish(store, spec, index, data, **kw):
    if index == KILL_DURING_TAR and _first_attempt(index):
        if isinstance(store, FileStore):
            store._spill(bytes(data[: len(data) // 2]))
        os.kill(os.getpid(), signal.SIGKILL)
    if index == KILL_BEFORE_RECORD and _first_attempt(index):
        store.create(f"jobs/datasets/{spec.id}/shard-{index:06d}.tar", data)
        os.kill(os.getpid(), signal.SIGKILL)
    return _publish(store, spec, index, data, **kw)     # kw: out, the job's output store if it names one


_publish = ray_jobs.publish_shard


def killing_shard_task(registry_uri: str, spec_json: bytes, index: int, options: dict) -> dict:
    """``ray_jobs.shard_task`` whose worker SIGKILLs itself mid-publish on a chosen shard's first attempt."""
    ray_jobs.publish_shard = _dying_publish
    return ray_jobs.shard_task(registry_uri, spec_json, index, options)


def recording_shard_task(registry_uri: str, spec_json: bytes, index: int, options: dict) -> dict:
    """``ray_jobs.shard_task`` that leaves ``ran-{kind}-{index}`` holding the pid of the process that ran it."""
    record = ray_jobs.shard_task(registry_uri, spec_json, index, options)
    marker = Path(os.environ["RULEWRIGHT_FAULT_DIR"]) / f"ran-{options.get('kind', 'dataset')}-{index}"
    marker.write_text(str(os.getpid()))
    return record
