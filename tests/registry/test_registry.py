"""Models, versions, aliases and their rules, run against every backend (the registry contract)."""

from __future__ import annotations

import datetime as dt

import pytest

from rulewright.registry import ANY, Registry, errors
from rulewright.registry.errors import Reason
from rulewright.registry.manifests import MAX_PAGE_SIZE, dumps, format_time, utc_now

# The smallest valid safetensors file: an 8-byte header length and an empty JSON header.
WEIGHTS = (2).to_bytes(8, "little") + b"{}"


def faces(registry: Registry, name: str = "faces") -> Registry:
    registry.import_model(
        name, arch="dcgan", config={"z_dim": 100}, weights=WEIGHTS, author="alice", spec={"source": "test"}
    )
    return registry


def edit(registry: Registry, parent: int, tag: str = "", model: str = "faces", **kw):
    return registry.create_version(
        model, parent=parent, delta=f"delta {parent} {tag}".encode(), spec={"rule": tag or "glasses"}, **kw
    )


# ---- models ---------------------------------------------------------------------------------


def test_import_creates_model_and_version_1(registry):
    v1 = registry.import_model(
        "faces",
        arch="dcgan",
        config={"z_dim": 100},
        weights=WEIGHTS,
        author="alice",
        description="demo",
        metrics={"fid": 1.5},
    )
    assert (v1.number, v1.kind, v1.parent, v1.author) == (1, "import", None, "alice")
    assert v1.blobs["weights"].size == len(WEIGHTS)
    assert registry.store.get_blob(v1.blobs["weights"].sha256) == WEIGHTS
    model = registry.get_model("faces")
    assert (model.arch, model.config, model.description) == ("dcgan", {"z_dim": 100}, "demo")
    assert registry.get_version("faces", 1) == v1


def test_import_twice_is_already_exists(registry):
    faces(registry)
    with pytest.raises(errors.AlreadyExists) as info:
        faces(registry)
    assert info.value.reason is Reason.MODEL_EXISTS


def test_import_with_request_id_is_idempotent(registry):
    a = registry.import_model("faces", arch="dcgan", config={}, weights=WEIGHTS, request_id="req-1")
    b = registry.import_model("faces", arch="dcgan", config={}, weights=WEIGHTS, request_id="req-1")
    assert a == b
    with pytest.raises(errors.AlreadyExists):
        registry.import_model("faces", arch="dcgan", config={}, weights=WEIGHTS, request_id="req-2")


@pytest.mark.parametrize("name", ["Faces", "-faces", "faces-", "fa_ces", "a" * 64, "", "faces/1", 3])
def test_bad_model_names_are_invalid_argument(registry, name):
    with pytest.raises(errors.InvalidArgument) as info:
        registry.import_model(name, arch="dcgan", config={}, weights=WEIGHTS)
    assert info.value.reason is Reason.INVALID_NAME


def test_weights_must_be_safetensors(registry):
    with pytest.raises(errors.InvalidArgument):
        registry.import_model("faces", arch="dcgan", config={}, weights=b"\x80\x02pickle")


def test_get_missing_model(registry):
    with pytest.raises(errors.NotFound) as info:
        registry.get_model("nope")
    assert info.value.reason is Reason.MODEL_NOT_FOUND


def test_list_models_pages(registry):
    for name in ("c", "a", "b"):
        faces(registry, name)
    first = registry.list_models(page_size=2)
    assert [m.name for m in first.items] == ["a", "b"] and first.next_page_token
    second = registry.list_models(page_size=2, page_token=first.next_page_token)
    assert [m.name for m in second.items] == ["c"] and second.next_page_token == ""


def test_delete_model_needs_no_live_versions_or_force(registry):
    faces(registry)
    edit(registry, 1)
    with pytest.raises(errors.FailedPrecondition) as info:
        registry.delete_model("faces")
    assert info.value.reason is Reason.MODEL_HAS_VERSIONS and info.value.metadata["versions"] == "1,2"
    registry.delete_version("faces", 2)
    registry.delete_version("faces", 1)
    registry.delete_model("faces")
    assert registry.list_models().items == []
    faces(registry)  # the name is free again, numbering restarts
    assert registry.resolve("faces").number == 1


def test_delete_model_with_force_removes_everything(registry):
    faces(registry)
    edit(registry, 1)
    registry.set_alias("faces", "prod", 2, expected_version=None)
    registry.delete_model("faces", force=True)
    assert registry.store.list_keys("models/") == []
    with pytest.raises(errors.NotFound):
        registry.get_version("faces", 1)


# ---- versions -------------------------------------------------------------------------------


def test_versions_are_numbered_in_order_with_lineage(registry):
    faces(registry)
    v2 = edit(registry, 1, "a", author="bob", metrics={"efficacy": 0.2})
    v3 = edit(registry, 2, "b")
    v4 = edit(registry, 1, "c")
    assert [v2.number, v3.number, v4.number] == [2, 3, 4]
    assert (v2.parent, v2.kind, v2.author, v2.metrics, v2.spec) == (1, "edit", "bob", {"efficacy": 0.2}, {"rule": "a"})
    assert [v.number for v in registry.get_lineage("faces", 3)] == [1, 2, 3]
    assert [v.number for v in registry.get_lineage("faces", 4)] == [1, 4]
    assert registry.get_version("faces", 3) == v3
    assert registry.store.get_blob(v3.blobs["delta"].sha256) == b"delta 2 b"


def test_version_times_and_names(registry):
    before = utc_now()
    faces(registry)
    v2 = edit(registry, 1)
    assert before <= v2.created_at <= utc_now()
    assert v2.name == "models/faces/versions/2"


def test_edit_of_missing_parent_or_model(registry):
    with pytest.raises(errors.NotFound) as info:
        edit(registry, 1)
    assert info.value.reason is Reason.MODEL_NOT_FOUND
    faces(registry)
    with pytest.raises(errors.NotFound) as info:
        edit(registry, 7)
    assert info.value.reason is Reason.VERSION_NOT_FOUND
    assert registry.list_versions("faces").items[-1].number == 1  # nothing half-created


def test_get_version_argument_checks(registry):
    faces(registry)
    for bad in (0, -1, "2", True):
        with pytest.raises(errors.InvalidArgument) as info:
            registry.get_version("faces", bad)
        assert info.value.reason is Reason.INVALID_VERSION


def test_request_id_returns_the_earlier_version(registry):
    faces(registry)
    a = edit(registry, 1, "x", request_id="edit-42")
    b = edit(registry, 1, "x", request_id="edit-42")
    assert a == b and registry.find_version_by_request_id("faces", "edit-42") == a
    assert [v.number for v in registry.list_versions("faces").items] == [1, 2]
    assert registry.find_version_by_request_id("faces", "never") is None
    with pytest.raises(errors.FailedPrecondition) as info:
        registry.create_version("faces", parent=2, delta=b"d", spec={}, request_id="edit-42")
    assert info.value.reason is Reason.REQUEST_ID_REUSED


def test_twin_requests_racing_leave_one_version(registry):
    # Two replicas got the same retried request: both created a version before either recorded the
    # request id. The loser withdraws its version and returns the winner's.
    faces(registry)
    first = edit(registry, 1, "x", request_id="twin")
    registry.store.delete(registry._request_key("faces", "twin"))  # as if not yet recorded
    registry.store.create(registry._request_key("faces", "twin"), dumps({"request_id": "twin", "version": 2}))
    second = registry.create_version("faces", parent=1, delta=b"other bytes", spec={}, request_id="twin-2")
    assert second.number == 3
    registry.store.delete(registry._request_key("faces", "twin-2"))
    registry.store.create(registry._request_key("faces", "twin-2"), dumps({"request_id": "twin-2", "version": 2}))
    assert registry._record_request("faces", "twin-2", second) == first
    assert [v.number for v in registry.list_versions("faces").items] == [1, 2]


def test_list_versions_pagination(registry):
    faces(registry)
    for i in range(6):
        edit(registry, 1, str(i))
    registry.delete_version("faces", 3)
    page = registry.list_versions("faces", page_size=2)
    seen = [v.number for v in page.items]
    while page.next_page_token:
        page = registry.list_versions("faces", page_size=2, page_token=page.next_page_token)
        seen += [v.number for v in page.items]
    assert seen == [1, 2, 4, 5, 6, 7]
    assert [v.number for v in registry.list_versions("faces", page_size=0).items] == seen      # 0 = default
    assert [v.number for v in registry.list_versions("faces", page_size=10**9).items] == seen  # coerced


def test_page_size_and_token_validation(registry):
    faces(registry)
    with pytest.raises(errors.InvalidArgument) as info:
        registry.list_versions("faces", page_size=-1)
    assert info.value.reason is Reason.INVALID_PAGE_SIZE
    with pytest.raises(errors.InvalidArgument) as info:
        registry.list_versions("faces", page_token="not-a-token")
    assert info.value.reason is Reason.INVALID_PAGE_TOKEN
    faces(registry, "other")
    edit(registry, 1, model="other")
    other_token = registry.list_versions("other", page_size=1).next_page_token
    with pytest.raises(errors.InvalidArgument):  # a token of another listing
        registry.list_versions("faces", page_token=other_token)
    assert MAX_PAGE_SIZE >= 100


def test_delete_version_blocked_by_child_then_by_alias(registry):
    faces(registry)
    edit(registry, 1)
    edit(registry, 2)
    with pytest.raises(errors.FailedPrecondition) as info:
        registry.delete_version("faces", 2)
    assert info.value.reason is Reason.VERSION_HAS_CHILDREN and info.value.metadata["children"] == "3"
    assert "3" in info.value.message
    registry.set_alias("faces", "production", 3, expected_version=None)
    registry.set_alias("faces", "staging", 3, expected_version=None)
    with pytest.raises(errors.FailedPrecondition) as info:
        registry.delete_version("faces", 3)
    assert info.value.reason is Reason.VERSION_HAS_ALIASES
    assert info.value.metadata["aliases"] == "production,staging"
    registry.set_alias("faces", "production", 1, expected_version=3)
    registry.set_alias("faces", "staging", 1, expected_version=3)
    registry.delete_version("faces", 3)
    registry.delete_version("faces", 2)  # its only child is gone now
    assert [v.number for v in registry.list_versions("faces").items] == [1]
    assert registry.store.list_keys("models/faces/versions/", limit=100)  # numbers stay taken …
    assert edit(registry, 1).number == 4                                  # … and are never reused


def test_deleted_version_is_not_found_and_deleting_twice_too(registry):
    faces(registry)
    edit(registry, 1)
    registry.delete_version("faces", 2)
    with pytest.raises(errors.NotFound) as info:
        registry.get_version("faces", 2)
    assert "deleted" in info.value.message
    with pytest.raises(errors.NotFound):
        registry.delete_version("faces", 2)


def test_version_created_under_a_deletion_in_progress_is_withdrawn(registry):
    # The deleter has written its marker and is scanning; a child created now must undo itself.
    faces(registry)
    edit(registry, 1)
    marker = "models/faces/versions/0000000002.deleting.abc123.json"
    registry.store.create(marker, dumps({"author": "d", "time": format_time(utc_now())}))
    with pytest.raises(errors.Aborted) as info:
        edit(registry, 2)
    assert info.value.reason is Reason.CONCURRENT_DELETE
    assert [v.number for v in registry.list_versions("faces").items] == [1, 2]
    with pytest.raises(errors.Aborted):  # an alias move onto it reverts itself too
        registry.set_alias("faces", "prod", 2, expected_version=None)
    assert registry.get_alias("faces", "prod").version is None
    assert [e.to_version for e in registry.alias_history("faces", "prod").items] == [2, None]


def test_stale_deletion_marker_blocks_nobody(registry):
    faces(registry)
    edit(registry, 1)
    long_ago = utc_now() - dt.timedelta(hours=1)
    registry.store.create(
        "models/faces/versions/0000000002.deleting.dead.json", dumps({"author": "d", "time": format_time(long_ago)})
    )
    assert edit(registry, 2).number == 3


def test_resolve_references(registry):
    faces(registry)
    edit(registry, 1)
    edit(registry, 2)
    registry.set_alias("faces", "production", 2, expected_version=None)
    assert registry.resolve("faces/3").number == 3
    assert registry.resolve("faces@production").number == 2
    assert registry.resolve("faces").number == 3
    for bad in ("Faces", "faces/x", "faces@", "faces/1/2", ""):
        with pytest.raises(errors.InvalidArgument) as info:
            registry.resolve(bad)
        assert info.value.reason is Reason.INVALID_REFERENCE
    with pytest.raises(errors.NotFound) as info:
        registry.resolve("faces@staging")
    assert info.value.reason is Reason.ALIAS_NOT_FOUND


def test_json_fields_are_validated(registry):
    faces(registry)
    with pytest.raises(errors.InvalidArgument):
        registry.create_version("faces", parent=1, delta=b"d", spec={"x": object()})
    with pytest.raises(errors.InvalidArgument):
        registry.create_version("faces", parent=1, delta=b"d", spec={"x": float("nan")})


# ---- aliases --------------------------------------------------------------------------------


def test_alias_compare_and_set_by_version_and_etag(registry):
    faces(registry)
    edit(registry, 1)
    edit(registry, 1, "b")
    s1 = registry.set_alias("faces", "production", 2, expected_version=None, author="alice", reason="first launch")
    assert (s1.version, s1.entry.from_version, s1.entry.author, s1.entry.reason) == (2, None, "alice", "first launch")
    with pytest.raises(errors.Aborted) as info:
        registry.set_alias("faces", "production", 3, expected_version=1)
    assert info.value.reason is Reason.ALIAS_CONFLICT
    assert info.value.metadata["current_version"] == "2" and "points to version 2" in info.value.message
    s2 = registry.set_alias("faces", "production", 3, etag=s1.etag)
    assert s2.etag != s1.etag
    s3 = registry.set_alias("faces", "production", 2, expected_version=3)  # back: A→B→A
    assert s3.version == s1.version == 2
    with pytest.raises(errors.Aborted):  # the etag catches A→B→A where the version cannot
        registry.set_alias("faces", "production", 1, etag=s1.etag)
    with pytest.raises(errors.Aborted):  # "new alias" expected, but it exists
        registry.set_alias("faces", "production", 1, expected_version=None)


def test_alias_needs_an_expectation_and_a_live_target(registry):
    faces(registry)
    with pytest.raises(errors.InvalidArgument):
        registry.set_alias("faces", "production", 1)
    with pytest.raises(errors.NotFound):
        registry.set_alias("faces", "production", 9, expected_version=None)
    with pytest.raises(errors.InvalidArgument):
        registry.set_alias("faces", "123", 1, expected_version=None)  # would read as a version


def test_alias_history_rollback_and_time_travel(registry):
    faces(registry)
    for tag in "abc":
        edit(registry, 1, tag)
    times = []
    state = registry.set_alias("faces", "production", 2, expected_version=None, author="alice", reason="launch")
    times.append(utc_now())
    state = registry.set_alias("faces", "production", 3, etag=state.etag, author="bob", reason="better glasses")
    times.append(utc_now())
    state = registry.set_alias("faces", "production", 4, expected_version=3, author="bob", reason="caps")
    times.append(utc_now())
    back = registry.rollback_alias("faces", "production", author="carol", reason="caps broke faces")
    assert back.version == 3 and back.entry.from_version == 4 and back.entry.reason == "caps broke faces"
    history = registry.alias_history("faces", "production").items
    assert [(e.from_version, e.to_version, e.author) for e in history] == [
        (None, 2, "alice"),
        (2, 3, "bob"),
        (3, 4, "bob"),
        (4, 3, "carol"),
    ]
    assert [e.seq for e in history] == [1, 2, 3, 4]
    assert all(a.time <= b.time for a, b in zip(history, history[1:]))
    assert registry.alias_at("faces", "production", history[0].time - dt.timedelta(seconds=1)) is None
    assert [registry.alias_at("faces", "production", t) for t in times] == [2, 3, 4]
    assert registry.alias_at("faces", "production", utc_now()) == 3
    first = registry.alias_history("faces", "production", page_size=3)
    rest = registry.alias_history("faces", "production", page_size=3, page_token=first.next_page_token)
    assert [e.seq for e in first.items + rest.items] == [1, 2, 3, 4] and rest.next_page_token == ""
    with pytest.raises(errors.Aborted):  # a rollback with a stale etag does nothing
        registry.rollback_alias("faces", "production", etag=state.etag)


def test_rollback_of_a_new_alias_has_nowhere_to_go(registry):
    faces(registry)
    registry.set_alias("faces", "production", 1, expected_version=None)
    with pytest.raises(errors.FailedPrecondition) as info:
        registry.rollback_alias("faces", "production")
    assert info.value.reason is Reason.NO_EARLIER_VERSION


def test_delete_alias_keeps_history(registry):
    faces(registry)
    state = registry.set_alias("faces", "staging", 1, expected_version=None)
    registry.delete_alias("faces", "staging", etag=state.etag, reason="retired")
    assert registry.list_aliases("faces") == []
    assert registry.get_alias("faces", "staging").version is None
    assert [e.to_version for e in registry.alias_history("faces", "staging").items] == [1, None]
    registry.delete_version("faces", 1)  # no alias points at it any more
    with pytest.raises(errors.NotFound):
        registry.alias_history("faces", "nothing")


def test_list_aliases(registry):
    faces(registry)
    edit(registry, 1)
    registry.set_alias("faces", "staging", 2, expected_version=None)
    registry.set_alias("faces", "production", 1, expected_version=None)
    assert [(a.alias, a.version) for a in registry.list_aliases("faces")] == [("production", 1), ("staging", 2)]


def test_alias_writers_in_two_registries_see_each_other(store):
    # Two replicas with their own caches (hints) over one store.
    a, b = Registry(store), Registry(store)
    faces(a)
    edit(a, 1)
    sa = a.set_alias("faces", "production", 1, expected_version=None)
    b.set_alias("faces", "production", 2, etag=sa.etag)
    with pytest.raises(errors.Aborted) as info:
        a.set_alias("faces", "production", 2, etag=sa.etag)
    assert info.value.metadata["current_version"] == "2"
    assert a.get_alias("faces", "production").version == 2
    assert edit(b, 1, "b").number == 3 and edit(a, 1, "c").number == 4


def test_any_is_not_accepted_as_a_free_pass(registry):
    faces(registry)
    with pytest.raises(errors.InvalidArgument):
        registry.set_alias("faces", "production", 1, expected_version=ANY)


def test_alias_history_times_never_go_backwards_with_a_fast_clock_behind_us(registry):
    faces(registry)
    future = utc_now() + dt.timedelta(seconds=30)
    entry = {
        "format": 1,
        "model": "faces",
        "alias": "prod",
        "seq": 1,
        "from": None,
        "to": 1,
        "author": "skewed",
        "time": format_time(future),
        "reason": "",
    }
    registry.store.create("models/faces/aliases/prod/0000000001.json", dumps(entry))
    state = registry.set_alias("faces", "prod", 1, expected_version=1)
    assert state.updated_at >= future
    assert registry.alias_at("faces", "prod", utc_now()) is None  # nothing had happened yet "now"
