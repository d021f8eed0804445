"""What the registry stores as documents, and the rules for names, times and pages.

- ``Model``: name, architecture, config, description, author, creation time.
- ``Version``: one immutable version (number, parent, kind, spec, blobs, metrics, author, time,
  request id; a rescaled edit's strength and source); ``Version.name`` is the resource name
  ``models/{model}/versions/{n}``.
- ``AliasEntry``: one move of an alias (seq, from, to, author, time, reason); ``AliasState`` is an
  alias's current value with its ``etag``.
- ``Page``: one page of a listing and the opaque token of the next.
- ``check_model_name`` / ``check_alias_name`` (lowercase DNS labels), ``check_version``,
  ``check_request_id``, ``check_page_size``; ``encode_page_token`` / ``decode_page_token``.
- ``utc_now()``, ``format_time(t)``, ``parse_time(text)``; ``dumps(obj)`` / ``loads(data, what)``.

No torch here: clients import this module.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import hashlib
import json
import re
from typing import Any, Generic, TypeVar

from rulewright.registry import errors
from rulewright.registry.blobstore import BlobRef
from rulewright.registry.errors import Reason

FORMAT = 1
KINDS = ("import", "edit")

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
# Documents are small by design; large payloads belong in blobs. The cap keeps a listing of a
# page of manifests bounded in memory.
MAX_DOCUMENT_BYTES = 4 << 20

_LABEL_RE = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")

T = TypeVar("T")


# ---- names ----------------------------------------------------------------------------------


def _check_label(value: Any, field: str) -> str:
    if not isinstance(value, str) or not _LABEL_RE.match(value):
        raise errors.invalid(Reason.INVALID_NAME, field, "must be a lowercase DNS label (a-z, 0-9, '-', "
                             f"1-63 characters, no leading or trailing '-'), got {value!r}")
    return value


def check_model_name(name: Any) -> str:
    """A model name: a lowercase DNS label, else INVALID_ARGUMENT (INVALID_NAME)."""
    return _check_label(name, "model")


def check_alias_name(name: Any) -> str:
    """An alias name: a lowercase DNS label that is not all digits (so ``faces/3`` and ``faces@3`` never clash)."""
    _check_label(name, "alias")
    if name.isdigit():
        raise errors.invalid(Reason.INVALID_NAME, "alias", f"must not be a number, got {name!r}")
    return name


def check_version(number: Any, field: str = "version") -> int:
    """A version number: an int ≥ 1, else INVALID_ARGUMENT (INVALID_VERSION)."""
    if isinstance(number, bool) or not isinstance(number, int) or number < 1:
        raise errors.invalid(Reason.INVALID_VERSION, field, f"must be an integer ≥ 1, got {number!r}")
    return number


def check_request_id(request_id: Any) -> str | None:
    """None, or a request id of 1–128 printable ASCII characters."""
    if request_id is None:
        return None
    if (
        not isinstance(request_id, str)
        or not 1 <= len(request_id) <= 128
        or not request_id.isprintable()
        or not request_id.isascii()
    ):
        raise errors.invalid(Reason.INVALID_ARGUMENT, "request_id", "must be 1-128 printable ASCII characters")
    return request_id


def check_page_size(page_size: Any) -> int:
    """0 → the default, above the maximum → the maximum (AIP-158), negative → INVALID_ARGUMENT."""
    if isinstance(page_size, bool) or not isinstance(page_size, int):
        raise errors.invalid(Reason.INVALID_PAGE_SIZE, "page_size", f"must be an integer, got {page_size!r}")
    if page_size < 0:
        raise errors.invalid(Reason.INVALID_PAGE_SIZE, "page_size", f"must not be negative, got {page_size}")
    return min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


# ---- page tokens ----------------------------------------------------------------------------


_TOKEN_VERSION = b"\x01"


def _token_stream(scope: str, n: int) -> bytes:
    out, block = b"", 0
    while len(out) < n:
        out += hashlib.sha256(f"{scope}\0{block}".encode()).digest()
        block += 1
    return out[:n]


def encode_page_token(scope: str, after: str) -> str:
    """An opaque token meaning "continue ``scope`` after ``after``" ("" stays "": no more pages).

    The position is masked with a keystream of the listing's scope and followed by a check of
    both, so tokens carry no readable structure for clients to depend on, a token from another
    listing is refused, and a hand-edited or truncated one is INVALID_ARGUMENT instead of a
    silently wrong page. (Not a secret: positions are not confidential.)
    """
    if not after:
        return ""
    raw = after.encode()
    masked = bytes(a ^ b for a, b in zip(raw, _token_stream(scope, len(raw))))
    check = hashlib.sha256(scope.encode() + b"\0" + raw).digest()[:8]
    return base64.urlsafe_b64encode(_TOKEN_VERSION + check + masked).decode().rstrip("=")


def decode_page_token(token: str, scope: str) -> str:
    """The position a token from ``encode_page_token(scope, ...)`` names; "" for the first page."""
    if not token:
        return ""
    after = None
    try:
        blob = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        if blob[:1] == _TOKEN_VERSION and len(blob) > 9:
            masked = blob[9:]
            raw = bytes(a ^ b for a, b in zip(masked, _token_stream(scope, len(masked))))
            if hashlib.sha256(scope.encode() + b"\0" + raw).digest()[:8] == blob[1:9]:
                after = raw.decode()
    except (ValueError, TypeError, UnicodeDecodeError):
        after = None
    if not after:
        raise errors.invalid(Reason.INVALID_PAGE_TOKEN, "page_token", "not a token this listing returned")
    return after


@dataclasses.dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a listing; ``next_page_token`` is "" on the last page."""

    items: list[T]
    next_page_token: str = ""


# ---- time and JSON --------------------------------------------------------------------------


def utc_now() -> dt.datetime:
    """The current time, timezone-aware UTC."""
    return dt.datetime.now(dt.timezone.utc)


def format_time(t: dt.datetime) -> str:
    """RFC 3339 UTC with microseconds (``2026-11-27T10:00:00.000000Z``): sorts as text."""
    return t.astimezone(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_time(text: str) -> dt.datetime:
    """Inverse of ``format_time`` (any RFC 3339 offset is accepted)."""
    t = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    return t if t.tzinfo else t.replace(tzinfo=dt.timezone.utc)


def dumps(obj: Any) -> bytes:
    """Canonical JSON bytes (sorted keys, no spaces): the same document always has the same bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def loads(data: bytes, what: str) -> dict:
    """A stored JSON object; DATA_LOSS (MANIFEST_CORRUPT) if it does not parse."""
    try:
        obj = json.loads(data)
    except ValueError as exc:
        raise errors.DataLoss(Reason.MANIFEST_CORRUPT, f"{what} is not valid JSON: {exc}", object=what) from None
    if not isinstance(obj, dict):
        raise errors.DataLoss(Reason.MANIFEST_CORRUPT, f"{what} is not a JSON object", object=what)
    return obj


def check_json_object(value: Any, field: str) -> dict:
    """``value`` if it is a dict that JSON can store exactly (str keys, finite numbers), else INVALID_ARGUMENT."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise errors.invalid(Reason.INVALID_ARGUMENT, field, "must be a JSON object")
    try:
        data = dumps(value)
    except (TypeError, ValueError) as exc:
        raise errors.invalid(Reason.INVALID_ARGUMENT, field, f"not JSON-serializable: {exc}") from None
    if len(data) > MAX_DOCUMENT_BYTES // 2:
        raise errors.invalid(Reason.INVALID_ARGUMENT, field, f"{len(data)} bytes of JSON; store large data as a blob")
    return json.loads(data)


def _corrupt(what: str, exc: Exception) -> errors.DataLoss:
    return errors.DataLoss(Reason.MANIFEST_CORRUPT, f"{what} is malformed: {type(exc).__name__}: {exc}", object=what)


def _document(**fields: Any) -> dict:
    """A stored document: the format tag, then ``fields``, times in their text form."""
    return {"format": FORMAT, **{k: format_time(v) if isinstance(v, dt.datetime) else v for k, v in fields.items()}}


def _parser(default_what: str):
    """Decorator for ``from_dict(cls, d)``: anything missing or mistyped becomes DATA_LOSS naming ``what``."""
    def wrap(parse):
        def from_dict(cls, d: dict, what: str = default_what):
            try:
                return parse(cls, d)
            except (KeyError, TypeError, ValueError) as exc:       # InvalidArgument is a ValueError
                raise _corrupt(what, exc) from None
        from_dict.__doc__ = parse.__doc__
        return classmethod(from_dict)
    return wrap


# ---- documents ------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Model:
    """A registered model: its architecture and config (shared by all its versions)."""

    name: str
    arch: str
    config: dict
    description: str
    author: str
    created_at: dt.datetime
    request_id: str | None = None
    # The import's base weights, named before version 1 exists: an import killed between the two
    # can be finished, and gc keeps the blob meanwhile (absent in models stored before this field).
    weights: BlobRef | None = None

    @property
    def resource_name(self) -> str:
        """``models/{name}``."""
        return f"models/{self.name}"

    def to_dict(self) -> dict:
        """JSON-ready form (what is stored)."""
        weights = {"weights": self.weights.to_dict()} if self.weights is not None else {}
        return _document(name=self.name, arch=self.arch, config=self.config, description=self.description,
                         author=self.author, created_at=self.created_at, request_id=self.request_id, **weights)

    @_parser("model manifest")
    def from_dict(cls, d: dict) -> "Model":
        """Inverse of ``to_dict``; DATA_LOSS if fields are missing or mistyped."""
        return cls(name=str(d["name"]), arch=str(d["arch"]), config=dict(d["config"]),
                   description=str(d.get("description", "")), author=str(d["author"]),
                   created_at=parse_time(d["created_at"]), request_id=d.get("request_id"),
                   weights=BlobRef.from_dict(d["weights"]) if d.get("weights") else None)


@dataclasses.dataclass(frozen=True)
class Version:
    """One immutable version of a model: an import (base weights) or an edit (a low-rank delta)."""

    model: str
    number: int
    parent: int | None         # None for an import
    kind: str                  # "import" | "edit"
    spec: dict                 # how it was made, replayable (the edit request, or the import source)
    blobs: dict[str, BlobRef]  # role → blob: "weights" for an import, "delta" for an edit
    metrics: dict
    author: str  # the authenticated principal that created it
    created_at: dt.datetime
    request_id: str | None = None
    adapter: dict | None = None  # an edit imported from an adapter file: where it came from
    # A rescaled edit: its delta blob is another version's, applied at this strength instead of the
    # scale stored in the blob; ``rescaled_from`` names that version. None for a fitted edit.
    strength: float | None = None
    rescaled_from: int | None = None

    @property
    def name(self) -> str:
        """``models/{model}/versions/{number}``."""
        return f"models/{self.model}/versions/{self.number}"

    @property
    def stored_bytes(self) -> int:
        """Bytes of the blobs this version added (its weights or its delta; none if rescaled)."""
        return 0 if self.rescaled_from is not None else sum(b.size for b in self.blobs.values())

    @property
    def edit_strength(self) -> float | None:
        """The strength of this version's own edit (None for an import): the rescaled strength,
        else the spec's, else 1 (edits stored before strengths were recorded)."""
        if self.kind != "edit":
            return None
        if self.strength is not None:
            return self.strength
        value = self.spec.get("strength")
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 1.0

    def to_dict(self) -> dict:
        """JSON-ready form (what is stored); a fitted version's has no rescale fields."""
        rescaled = ({"strength": self.strength, "rescaled_from": self.rescaled_from}
                    if self.rescaled_from is not None else {})
        return _document(model=self.model, number=self.number, parent=self.parent, kind=self.kind, spec=self.spec,
                         blobs={k: b.to_dict() for k, b in sorted(self.blobs.items())}, metrics=self.metrics,
                         author=self.author, created_at=self.created_at, request_id=self.request_id, **rescaled,
                         **({"adapter": self.adapter} if self.adapter is not None else {}))

    @_parser("version manifest")
    def from_dict(cls, d: dict) -> "Version":
        """Inverse of ``to_dict``; DATA_LOSS if fields are missing or mistyped."""
        kind = str(d["kind"])
        if kind not in KINDS:
            raise ValueError(f"unknown kind {kind!r}")
        parent = d.get("parent")
        return cls(model=str(d["model"]), number=int(d["number"]), parent=None if parent is None else int(parent),
                   kind=kind, spec=dict(d["spec"]), blobs={k: BlobRef.from_dict(v) for k, v in d["blobs"].items()},
                   metrics=dict(d.get("metrics") or {}), author=str(d["author"]),
                   created_at=parse_time(d["created_at"]), request_id=d.get("request_id"),
                   adapter=dict(d["adapter"]) if d.get("adapter") is not None else None,
                   strength=None if d.get("strength") is None else float(d["strength"]),
                   rescaled_from=None if d.get("rescaled_from") is None else int(d["rescaled_from"]))


@dataclasses.dataclass(frozen=True)
class AliasEntry:
    """One move of an alias; entries are append-only and numbered by ``seq`` from 1."""

    model: str
    alias: str
    seq: int
    from_version: int | None  # None: the alias was unset
    to_version: int | None    # None: this entry unsets the alias
    author: str
    time: dt.datetime  # never earlier than the previous entry's (so "as of T" is well defined)
    reason: str

    @property
    def etag(self) -> str:
        """The etag of the alias state this entry created (changes on every move, even A→B→A)."""
        return f'"{self.seq}"'

    def to_dict(self) -> dict:
        """JSON-ready form (what is stored)."""
        return _document(model=self.model, alias=self.alias, seq=self.seq, author=self.author, time=self.time,
                         reason=self.reason, **{"from": self.from_version, "to": self.to_version})

    @_parser("alias entry")
    def from_dict(cls, d: dict) -> "AliasEntry":
        """Inverse of ``to_dict``; DATA_LOSS if fields are missing or mistyped."""
        return cls(model=str(d["model"]), alias=str(d["alias"]), seq=int(d["seq"]),
                   from_version=None if d.get("from") is None else int(d["from"]),
                   to_version=None if d.get("to") is None else int(d["to"]), author=str(d["author"]),
                   time=parse_time(d["time"]), reason=str(d.get("reason", "")))


@dataclasses.dataclass(frozen=True)
class AliasState:
    """An alias's current value: the version it points to (None when unset) and the etag to CAS with."""

    model: str
    alias: str
    version: int | None
    etag: str
    updated_at: dt.datetime
    entry: AliasEntry

    @classmethod
    def of(cls, entry: AliasEntry) -> "AliasState":
        """The state an entry leaves the alias in."""
        return cls(entry.model, entry.alias, entry.to_version, entry.etag, entry.time, entry)


def parse_etag(etag: str) -> int:
    """The alias seq an etag names; INVALID_ARGUMENT if it is not one of ours."""
    m = re.fullmatch(r'(?:W/)?"?(\d+)"?', etag.strip()) if isinstance(etag, str) else None
    if not m:
        raise errors.invalid(Reason.INVALID_ARGUMENT, "etag", f"not an alias etag: {etag!r}")
    return int(m.group(1))
