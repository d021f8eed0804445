"""A live server for client tests: the real ``create_server`` on a free loopback port, over a
filesystem registry holding the faces model (``faces``, alias ``production``) and a tiny random
DCGAN (``tiny``, alias ``production``)."""

from __future__ import annotations

import pytest

from rulewright.service.server.app import create_server
from tests.builders import tiny_domain


@pytest.fixture
def live(tmp_path, faces_path):
    """(address, domain) of a running server; stopped after the test."""
    domain = tiny_domain(tmp_path)
    domain.bootstrap("faces", faces_path)
    server, port = create_server(domain)
    yield f"127.0.0.1:{port}", domain
    server.stop(0).wait()
    domain.close()
