"""``moto_server`` serving one request at a time: ``python -m tests.registry.serial_moto_server -H HOST -p PORT``.

Why: moto's S3 checks ``If-None-Match: *`` and then stores the object in two steps with no lock
between them, and ``moto_server`` serves requests on threads, so two concurrent conditional PUTs
of one key can both succeed (measured here: 1 of 300 rounds of 6 processes racing for one key
had two winners). AWS S3 and MinIO decide a conditional write atomically, which the registry
relies on. Serving requests one at a time gives moto those semantics without changing how it
handles any request; clients still race for real (they are separate processes). Everything
else is moto's own ``moto_server`` entry point and flags.
"""

from __future__ import annotations

import sys

import moto.server


def _serial_run_simple(*args, **kwargs):
    kwargs["threaded"] = False  # one request at a time (HTTP/1.0: no idle keep-alives)
    return moto.server.werkzeug_run_simple(*args, **kwargs)


if __name__ == "__main__":
    moto.server.werkzeug_run_simple = moto.server.run_simple
    moto.server.run_simple = _serial_run_simple
    moto.server.main(sys.argv[1:])
