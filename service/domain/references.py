"""Model references as every transport writes them, and what a bare model name means.

- ``faces/3``: version 3; ``faces@staging``: the version the alias points to; ``faces``: the
  version the server's default alias points to (``DEFAULT_ALIAS``, ``production`` unless the
  ``default_alias`` setting names another), never simply the newest: an unreviewed experiment must
  not be what a bare name draws or edits.
- ``with_alias(ref, alias)``: a bare model name as ``name@alias``; any other reference unchanged.
- ``resolve(registry, ref, alias)``: the one version a reference names; a bare name whose model
  lacks the alias is NOT_FOUND (``ALIAS_NOT_FOUND``, as ``faces@production`` itself would be) with
  a message saying how to name a version or set the alias.
- ``point_default_alias(registry, model, alias, number)``: a fresh import usable by its bare name.
"""

from __future__ import annotations

import re

from rulewright.registry import errors
from rulewright.registry.errors import Reason
from rulewright.registry.manifests import Version
from rulewright.registry.registry import Registry

DEFAULT_ALIAS = "production"
_BARE = re.compile(r"^[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?$")    # a model name alone (the registry's rule)


def with_alias(ref: str, alias: str) -> str:
    """``name@alias`` for a bare model name; a numbered, aliased or malformed reference as it is."""
    return f"{ref}@{alias}" if isinstance(ref, str) and _BARE.match(ref) else ref


def resolve(registry: Registry, ref: str, alias: str = DEFAULT_ALIAS) -> Version:
    """The version ``ref`` names, a bare name meaning ``name@alias`` (registry errors pass through)."""
    aliased = with_alias(ref, alias)
    try:
        return registry.resolve(aliased)
    except errors.NotFound as exc:
        if aliased == ref or exc.reason is not Reason.ALIAS_NOT_FOUND:
            raise
        raise errors.NotFound(
            Reason.ALIAS_NOT_FOUND,
            f"model {ref!r} has no {alias!r} alias, which the bare name {ref!r} means: name a version "
            f"({ref}/N, e.g. {ref}/1) or an alias ({ref}@NAME), or point the alias at a version "
            f"(rulewright alias set {ref} {alias} {ref}/N)", model=ref, alias=alias) from None


def point_default_alias(registry: Registry, model: str, alias: str, number: int, author: str,
                        reason: str) -> None:
    """Point ``alias`` at version ``number`` unless it is already set (by an earlier try or anyone)."""
    try:
        registry.get_alias(model, alias)
        return
    except errors.NotFound:
        pass
    try:
        registry.set_alias(model, alias, number, expected_version=None, author=author, reason=reason)
    except errors.Aborted:            # set meanwhile: whoever set it chose
        pass
