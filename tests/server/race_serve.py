"""``rulewright-engine serve`` with one interleaving of a statistics stream forced, for the shutdown tests.

``python -m tests.server.race_serve serve ...`` runs the real server command. With
``RULEWRIGHT_RACE_DIR`` set (a folder both sides can see), the server plays out what a heavily
loaded machine did once, in a fixed order instead of by chance:

1. A ComputeStatistics stream's worker thread reports two batches; the RPC thread sends the
   first and then gets no CPU (it waits until the client has cancelled the call) with the
   second queued.
2. The worker starts its third batch (its cancellation check has passed), writes the file
   ``in-torch`` and stays inside torch matrix products, native code that drops the GIL and
   takes it back after each product, as a forward pass does, until the RPC thread has seen the
   cancellation and ``RULEWRIGHT_RACE_TORCH_S`` (default 3) seconds more.
3. The test, having seen ``in-torch``, sends SIGTERM and cancels the stream: the RPC thread
   sends the queued message, finds the call cancelled and ends, while the worker is still
   inside torch.

Every wait is bounded (60 s), so a server that never sees ``cancelled`` still finishes.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

WAIT_S = 60.0


def _wait_until(done, then_s: float = 0.0, work=None) -> None:
    """Until ``done()`` (at most ``WAIT_S``), then ``then_s`` more seconds, calling ``work()`` meanwhile."""
    work = work or (lambda: time.sleep(0.01))
    deadline = time.monotonic() + WAIT_S
    while not done() and time.monotonic() < deadline:
        work()
    until = time.monotonic() + then_s
    while time.monotonic() < until:
        work()


def install(folder: Path, torch_s: float) -> None:
    """Wrap the statistics stream's RPC side, progress reports and DCGAN passes as described above."""
    import torch

    from rulewright.service.engine.generators.dcgan import DCGANGenerator
    from rulewright.service.engine.progress import Progress
    from rulewright.service.server.servicers import GeneratorServicer

    call_over = threading.Event()           # the RPC thread has seen the cancellation
    mine = threading.local()
    a = torch.rand(256, 256)

    original_report = Progress.report

    def report(self, stage, done=0, *args, **kwargs):
        if stage == "statistics" and done:
            mine.reports = getattr(mine, "reports", 0) + 1
        return original_report(self, stage, done, *args, **kwargs)

    original_forward = DCGANGenerator.forward

    def forward(self, *args, **kwargs):
        if getattr(mine, "reports", 0) >= 2 and not getattr(mine, "held", False):
            mine.held = True
            (folder / "in-torch").write_text(threading.current_thread().name)
            _wait_until(call_over.is_set, torch_s, work=lambda: torch.mm(a, a))
        return original_forward(self, *args, **kwargs)

    original_stream = GeneratorServicer.ComputeStatistics

    def compute_statistics(self, request, context):
        for n, message in enumerate(original_stream(self, request, context)):
            if n == 1:
                _wait_until(lambda: not context.is_active())
                call_over.set()
            yield message

    Progress.report = report
    DCGANGenerator.forward = forward
    GeneratorServicer.ComputeStatistics = compute_statistics


def main() -> int:
    """Install the forced interleaving from the environment, then run ``rulewright-engine`` with argv."""
    folder = os.environ.get("RULEWRIGHT_RACE_DIR")
    if folder:
        install(Path(folder), float(os.environ.get("RULEWRIGHT_RACE_TORCH_S", "3")))
    from rulewright.service.cli import main as engine_main

    return engine_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
