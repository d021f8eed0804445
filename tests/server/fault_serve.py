"""``rulewright-engine serve`` with one fault point, for the SIGKILL tests of dataset jobs.

``python -m tests.server.fault_serve serve ...`` runs the real server command; when
``RULEWRIGHT_FAULT_HOLD`` (a regular expression) matches the key of a store ``create``, that
write stops halfway and the process waits to be killed:

- on a filesystem store the first half of the document is already spilled to ``tmp/`` (what a
  writer killed during its write leaves behind), and nothing is linked into place;
- on S3 the PutObject has not been sent (one PutObject is all or nothing on the server side).

Before it waits it writes the key to the file ``RULEWRIGHT_FAULT_HELD`` names, so the test kills
it at a known point instead of after a guessed delay. The wait is bounded
(``RULEWRIGHT_FAULT_HOLD_S``, default 120 s), then the process exits on its own with status 3.
"""

from __future__ import annotations

import os
import re
import sys
import time
from pathlib import Path


def install(pattern: str, marker: str, hold_s: float) -> None:
    """Wrap ``create`` of both store classes so that a write to a key matching ``pattern`` hangs."""
    from rulewright.registry.filestore import FileStore
    from rulewright.registry.s3store import S3Store

    rx = re.compile(pattern)
    for cls in (FileStore, S3Store):
        original = cls.create

        def create(self, key, data, _original=original):
            if not rx.search(key):
                return _original(self, key, data)
            if isinstance(self, FileStore):
                self._spill(bytes(data[: len(data) // 2]))     # a half-written upload, never linked
            Path(marker).write_text(key)
            for _ in range(int(hold_s * 10)):                   # bounded: exits by itself if nobody kills it
                time.sleep(0.1)
            os._exit(3)
        cls.create = create


def main() -> int:
    """Install the fault point from the environment, then run ``rulewright-engine`` with argv."""
    pattern = os.environ.get("RULEWRIGHT_FAULT_HOLD")
    if pattern:
        install(pattern, os.environ["RULEWRIGHT_FAULT_HELD"], float(os.environ.get("RULEWRIGHT_FAULT_HOLD_S", "120")))
    from rulewright.service.cli import main as engine_main

    return engine_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
