"""What the registry promises its neighbours: no torch for clients, one closed error table."""

from __future__ import annotations

import subprocess
import sys

import pytest

from rulewright.registry import errors
from rulewright.registry.errors import REASON_CODES, Code, Reason

from .conftest import REPO


def test_client_code_paths_never_import_torch(tmp_path):
    # Manifests, aliases, listings, stores and the cache interface run in clients without torch
    # or the service.
    script = f"""
import sys
from rulewright.registry import Registry, open_stats_cache
from rulewright.registry import gc, manifests, s3store, stats_cache
import rulewright.registry.__main__
r = Registry.open({str(tmp_path / "s")!r})
r.import_model("faces", arch="dcgan", config={{}}, weights=(2).to_bytes(8, "little") + b"{{}}")
r.create_version("faces", parent=1, delta=b"d", spec={{}})
r.set_alias("faces", "production", 2, expected_version=None)
r.list_versions("faces"); r.alias_history("faces", "production"); r.resolve("faces@production")
gc.scan(r.store)
open_stats_cache("memory://")
# The one error base every layer derives from is all the registry takes from the service (it
# imports nothing itself: an import-linter contract of make test).
shared = {{"rulewright.service", "rulewright.service.errors"}}
bad = [m for m in sys.modules if m == "torch" or m.startswith(("torch.", "rulewright.service")) and m not in shared]
assert not bad, bad
print("clean")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "clean", result.stderr


def test_every_reason_has_exactly_one_code():
    assert set(REASON_CODES) == set(Reason)
    assert set(REASON_CODES.values()) <= set(Code)
    for reason in Reason:
        assert reason.value == reason.name and reason.value.isupper()


def test_codes_are_grpc_status_names():
    # The API layer maps with grpc.StatusCode[code.value]; every code (the registry's and the
    # rest of the service's, one enum) must be the name of a gRPC status.
    import grpc

    assert {c.value for c in Code} <= {status.name for status in grpc.StatusCode}


def test_errors_carry_reason_domain_and_string_metadata():
    exc = errors.error(Reason.ALIAS_CONFLICT, "moved", current_version=3, etag=None)
    assert isinstance(exc, errors.Aborted) and exc.code is Code.ABORTED
    assert exc.reason is Reason.ALIAS_CONFLICT and exc.domain == errors.REGISTRY_DOMAIN
    assert exc.metadata == {"current_version": "3", "etag": ""}


def test_a_reason_raised_under_the_wrong_class_is_a_bug_caught_at_once():
    with pytest.raises(TypeError):
        errors.NotFound(Reason.ALIAS_CONFLICT, "wrong class")


def test_a_bad_argument_is_the_one_invalid_argument_with_the_registry_reason_and_domain(tmp_path):
    # One InvalidArgument for every layer: what catches the engine's catches the registry's too,
    # while the wire still names the registry's reason, domain and field.
    from rulewright.registry import Registry
    from rulewright.service.engine import errors as engine_errors
    from rulewright.service.errors import REGISTRY_DOMAIN, InvalidArgument

    assert errors.InvalidArgument is InvalidArgument is engine_errors.InvalidArgument
    with pytest.raises(InvalidArgument) as info:
        Registry.open(str(tmp_path / "s")).get_model("Not_A_Label")
    exc = info.value
    assert isinstance(exc, ValueError) and exc.code is Code.INVALID_ARGUMENT
    assert exc.reason is Reason.INVALID_NAME and exc.domain == REGISTRY_DOMAIN == "registry.rulewright.dev"
    assert exc.field == "model" and exc.metadata["field"] == "model" and "Not_A_Label" in exc.description
    via_factory = errors.error(Reason.INVALID_PAGE_SIZE, "must not be negative", field="page_size")
    assert type(via_factory) is InvalidArgument and via_factory.reason is Reason.INVALID_PAGE_SIZE
    with pytest.raises(TypeError):                       # an invalid-argument reason only
        errors.invalid(Reason.ALIAS_CONFLICT, "alias", "wrong code")


def test_call_deadline_is_part_of_the_store_contract():
    from rulewright.registry.blobstore import call_deadline, deadline_left

    assert deadline_left() is None
    with call_deadline(30.0):
        outer = deadline_left()
        assert outer is not None and 0 < outer <= 30.0
        with call_deadline(None):
            assert deadline_left() is None
        with call_deadline(-1.0):                            # a passed deadline counts as none left
            assert deadline_left() <= 0
        assert deadline_left() is not None
    assert deadline_left() is None
