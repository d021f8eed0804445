"""``rulewright`` commands over RegistryService: ``models``, ``versions``, ``version show``,
``aliases``, ``alias set|history``, ``rollback``, ``export``.

Each takes the one reference syntax (``faces``, ``faces@alias``, ``faces/3``); the earlier
positional forms still work (``alias set faces production 3``, ``rollback faces --alias
staging``, ``export faces 3``).
"""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable

from rulewright.client.cli_args import REF_HELP, Ref, UsageError, reference, version_arg, version_number, when
from rulewright.client.client import Client
from rulewright.client.types import Version

DEFAULT_ALIAS = "production"      # the alias rollback and history mean when none is named


def cmd_models(client: Client, args: argparse.Namespace) -> int:
    """One line per model: arch, newest version, aliases, description."""
    for m in client.models():
        aliases = ", ".join(f"{a}={al.version}" for a, al in sorted(m.aliases.items())) or "-"
        print(f"{m.id}\t{m.arch}\tlatest {m.latest_version}\taliases {aliases}\t{m.description}")
    return 0


def describe(v: Version) -> str:
    """What a version is, in a few words: its description, else what made it."""
    spec = v.spec or {}
    if spec.get("description"):
        return str(spec["description"])
    if v.kind == "import":
        source = spec.get("source") or spec.get("converted_from") or ""
        return f"imported from {source}" if isinstance(source, str) and source else "import"
    return f"{spec.get('op', 'rewrite')} layer {spec['layer']}" if spec.get("layer") else str(spec.get("name", ""))


def _strength(v: Version) -> str:
    """`` (strength S)`` for an edit that records one, else nothing."""
    strength = (v.spec or {}).get("strength")
    return f" (strength {strength:g})" if isinstance(strength, (int, float)) and v.kind == "edit" else ""


def cmd_versions(client: Client, args: argparse.Namespace) -> int:
    """One line per version, oldest first, with its aliases and description."""
    aliases = client.aliases(args.model.model)
    for v in client.versions(args.model.model):
        names = ",".join(a for a, al in sorted(aliases.items()) if al.version == v.number) or "-"
        print(f"{v.number}\t{v.kind}\tparent {v.parent_version or '-'}\t{v.author}\t{when(v.create_time)}"
              f"\taliases {names}\t{describe(v)}{_strength(v)}")
    return 0


def _curve(curve: Any) -> list[str]:
    """A strength curve (Version.metrics ``strength_curve``) as table lines."""
    if not isinstance(curve, dict):
        return []
    lines = [f"strength curve: chosen {curve.get('chosen', '-')}" + (f" ({curve['rule']})" if curve.get("rule") else ""),
             "  strength\tdetected\tside_effect\tbox_edge"]
    for p in curve.get("points") or []:
        lines.append("  " + "\t".join(f"{p.get(k, 0):.4g}" for k in ("strength", "detected", "side_effect",
                                                                        "box_edge")))
    return lines


def cmd_version_show(client: Client, args: argparse.Namespace) -> int:
    """A version in full: lineage, aliases, description, strength, metrics (the strength curve as a
    table) and the complete spec, found targets included."""
    v = client.version(args.ref.model, version_number(client, args.ref))
    names = sorted(a for a, al in client.aliases(v.model).items() if al.version == v.number)
    spec = dict(v.spec or {})
    print(f"{v.name}\t{v.kind}\tparent {v.parent_version or '-'}\t{v.author}\t{when(v.create_time)}")
    print(f"lineage: {' -> '.join(map(str, v.lineage)) or v.number}")
    print(f"aliases: {', '.join(names) or '-'}")
    print(f"description: {describe(v)}")
    print(f"strength: {spec['strength']:g}" if isinstance(spec.get("strength"), (int, float)) else "strength: -")
    metrics = dict(v.metrics or {})
    curve = _curve(metrics.pop("strength_curve", None))
    print("metrics:" + ("" if metrics else " -"))
    for key, value in sorted(metrics.items()):
        print(f"  {key}: {value:.6g}" if isinstance(value, float) else f"  {key}: {json.dumps(value)}")
    for line in curve:
        print(line)
    if v.rescaled_from:
        print(f"rescaled from: {v.model}/{v.rescaled_from} (its edit at this strength, no fit)")
    if v.adapter:
        print(f"adapter: from {v.adapter['source_version']} (base {v.adapter['base_fingerprint'][:16]}...)")
    if "found" in spec:
        print(f"found: {len(spec['found'])} target{'s' if len(spec['found']) != 1 else ''} (in the spec below)")
    print("spec:")
    print(spec_text(spec))
    return 0


def spec_text(spec: dict) -> str:
    """The spec as JSON that reads as a spec: one line per setting and per region (a final edit
    lists over a hundred found targets), so it can be saved and passed to ``rewrite --spec``."""
    def field(key: str, value, last: bool) -> list[str]:
        end = "" if last else ","
        if isinstance(value, list) and value and all(isinstance(x, dict) for x in value):
            rows = [f"    {json.dumps(x)}{',' if i < len(value) - 1 else ''}" for i, x in enumerate(value)]
            return [f"  {json.dumps(key)}: [", *rows, f"  ]{end}"]
        return [f"  {json.dumps(key)}: {json.dumps(value)}{end}"]

    items = list(spec.items())
    return "\n".join(["{", *(line for i, (k, v) in enumerate(items) for line in field(k, v, i == len(items) - 1)), "}"])


def cmd_aliases(client: Client, args: argparse.Namespace) -> int:
    """One line per alias that is set."""
    for name, a in sorted(client.aliases(args.model.model).items()):
        print(f"{name}\t{a.version}\tetag {a.etag}\t{when(a.update_time)}")
    return 0


def _alias_of(ref: Ref, given: str | None, fallback: str | None = DEFAULT_ALIAS) -> str:
    """The alias a command names: in the reference (``faces@staging``) or as its own argument."""
    if ref.number is not None:
        raise UsageError(f"{ref} names a version; name an alias: {ref.model}@ALIAS")
    if ref.alias and given and given != ref.alias:
        raise UsageError(f"{ref} and {given!r} name two aliases; give one")
    alias = ref.alias or given or fallback
    if alias is None:
        raise UsageError(f"name the alias: {ref.model}@ALIAS")
    return alias


def _target(client: Client, model: str, version: Ref | int) -> int:
    """The version number an alias is to point at: a number, ``model/N`` or ``model@alias``."""
    if isinstance(version, int):
        return version
    if version.model != model:
        raise UsageError(f"{version} is a version of {version.model!r}, not of {model!r}")
    if version.number is None and version.alias is None:
        raise UsageError(f"name the version: {model}/N, {model}@ALIAS or N")
    return version_number(client, version)


def cmd_alias_set(client: Client, args: argparse.Namespace) -> int:
    """Point an alias at a version by compare-and-set on the state just read (or ``--expect-version``)."""
    *alias, version = args.rest
    if len(alias) > 1:
        raise UsageError("too many arguments: alias set MODEL@ALIAS VERSION, or MODEL ALIAS VERSION")
    name = _alias_of(args.ref, alias[0] if alias else None, fallback=None)
    try:
        target = _target(client, args.ref.model, version_arg(version))
    except argparse.ArgumentTypeError as exc:
        raise UsageError(f"VERSION: {exc}") from None
    before = client.aliases(args.ref.model).get(name)
    kw = ({"expected_version": args.expect_version} if args.expect_version is not None
          else {"etag": before.etag} if before else {"expected_version": 0})
    moved = client.set_alias(args.ref.model, name, target, reason=args.reason, **kw)
    print(f"{name}: {before.version if before else '-'} -> {moved.version}")
    return 0


def cmd_alias_history(client: Client, args: argparse.Namespace) -> int:
    """Every move of an alias, oldest first."""
    for m in client.alias_history(args.ref.model, _alias_of(args.ref, args.alias)):
        print(f"{m.seq}\t{m.from_version or '-'} -> {m.to_version or '-'}\t{m.author}\t{when(m.move_time)}"
              f"\t{m.reason}")
    return 0


def cmd_rollback(client: Client, args: argparse.Namespace) -> int:
    """Move an alias back to where its latest move came from."""
    alias = _alias_of(args.ref, args.alias)
    before = client.alias(args.ref.model, alias)
    # The etag just read: what is printed as "before" is exactly the state rolled back.
    moved = client.rollback(args.ref.model, alias, reason=args.reason, etag=before.etag)
    print(f"{alias}: {before.version} -> {moved.version}")
    return 0


def cmd_export(client: Client, args: argparse.Namespace) -> int:
    """Download a version's weights as one safetensors file."""
    if args.version is not None and (args.ref.number is not None or args.ref.alias is not None):
        raise UsageError(f"{args.ref} already names a version; drop {args.version}")
    number = args.version if args.version is not None else version_number(client, args.ref)
    done = client.export(args.ref.model, number, args.out)
    print(f"{done.version.name}: {done.path} ({done.size_bytes} bytes, sha256 {done.sha256})")
    return 0


def _group(add: Callable[..., argparse.ArgumentParser], name: str, help: str):
    """A command whose actions are subcommands of their own (``alias set``): its subparsers."""
    return add(name, help).add_subparsers(dest=f"{name}_command", required=True, metavar="ACTION")


def register(sub, add: Callable[..., argparse.ArgumentParser]) -> None:
    """Add the registry commands."""
    p = add("models", "list the registered models")
    p.set_defaults(run=cmd_models)

    p = add("versions", "list a model's versions, oldest first, with their aliases and descriptions")
    p.add_argument("model", type=reference, help="model name, e.g. faces")
    p.set_defaults(run=cmd_versions)

    p = add("show", "a version in full: lineage, aliases, description, strength, metrics with its strength "
            "curve, and the complete spec with its found targets", _group(add, "version", "show one version"))
    p.add_argument("ref", type=reference, help=REF_HELP)
    p.set_defaults(run=cmd_version_show)

    p = add("aliases", "list a model's aliases")
    p.add_argument("model", type=reference, help="model name, e.g. faces")
    p.set_defaults(run=cmd_aliases)

    alias_sub = _group(add, "alias", "move an alias or show its history")
    p = add("set", "point an alias at a version (compare-and-set on its current state)", alias_sub)
    p.add_argument("ref", type=reference, metavar="MODEL[@ALIAS]", help="the alias, faces@production (or the "
                   "model, with ALIAS next)")
    p.add_argument("rest", nargs="+", metavar="VERSION", help="the version: N, faces/N or faces@OTHER "
                   "(0 unsets the alias); after the model's name, the alias first: faces production 3")
    p.usage = ("%(prog)s [-h] [--expect-version N] [--reason TEXT] [connection flags] MODEL@ALIAS VERSION\n"
               "       %(prog)s ... MODEL ALIAS VERSION")
    p.add_argument("--expect-version", type=int,
                   help="move only if the alias points here now (0: unset); default: the state just read")
    p.add_argument("--reason", default="", help="why, recorded in the alias history")
    p.set_defaults(run=cmd_alias_set)
    p = add("history", "list an alias's moves, oldest first", alias_sub)
    p.add_argument("ref", type=reference, metavar="MODEL[@ALIAS]", help="the alias, faces@production")
    p.add_argument("alias", nargs="?", help=f"alias name, if not in the reference (default: {DEFAULT_ALIAS})")
    p.set_defaults(run=cmd_alias_history)

    p = add("rollback", "move an alias back to where its latest move came from")
    p.add_argument("ref", type=reference, metavar="MODEL[@ALIAS]", help="the alias, faces@production")
    p.add_argument("--alias", help=f"alias to roll back, if not in the reference (default: {DEFAULT_ALIAS})")
    p.add_argument("--reason", default="", help="why, recorded in the alias history")
    p.set_defaults(run=cmd_rollback)

    p = add("export", "download a version's weights as one safetensors file (sha256 checked)")
    p.add_argument("ref", type=reference, help=REF_HELP)
    p.add_argument("version", type=int, nargs="?", help="version number, with a bare model name (faces 3 = faces/3)")
    p.add_argument("--out", required=True, help="file to write")
    p.set_defaults(run=cmd_export)
