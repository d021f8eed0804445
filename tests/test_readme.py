"""The README as a user meets it: its quick start runs as shown, and every command it names exists.

- ``test_quick_start_runs_as_shown``: the ``quick-start:serve`` and ``quick-start:client`` blocks,
  line by line, with the real ``rulewright`` command, in a fresh folder (so a fresh ``./data``),
  on free ports given through the environment the README documents (``RULEWRIGHT_ADDRESS``,
  ``RULEWRIGHT_WEB_ADDRESS``). The ``quick-start:install`` block is not run: creating a venv and
  installing torch takes minutes and the package indexes; the test uses the venv it runs in,
  which ``make`` built the same way, and checks that block's paths and targets exist instead.
- ``test_serve_prints_where_it_listens``: that line without the demo model, and with the editor off.
- ``test_every_readme_command_exists``: each ``make`` target, ``rulewright`` and
  ``rulewright-engine`` command line (parsed by the real parsers), ``python -m`` module and local
  path the README shows, and the CLI names its client list gives; ``test_manual_commands_exist``
  the same for every shell line of docs/.
- ``test_links_resolve``: every relative link of the README and of docs/ names a file and a heading.
"""

from __future__ import annotations

import importlib.util
import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image

from tests.support import free_port

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
BIN = Path(sys.executable).parent                 # the venv whose `rulewright` the README's lines run
SHOWN_GRPC, SHOWN_WEB = "127.0.0.1:50051", "127.0.0.1:8080"
GRPC_CORE_LINE = re.compile(r"^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ")


def blocks(text: str) -> list[tuple[str, str, list[str]]]:
    """Every fenced block: (the quick-start marker above it or "", its language, its lines)."""
    out, marker, lines, lang, inside = [], "", [], "", False
    for line in text.splitlines():
        if inside:
            if line.startswith("```"):
                out.append((marker, lang, lines))
                marker, lines, inside = "", [], False
            else:
                lines.append(line)
        elif line.startswith("```"):
            lang, inside = line[3:].strip(), True
        elif m := re.fullmatch(r"<!-- (quick-start:\w+) -->", line.strip()):
            marker = m.group(1)
        elif line.strip():
            marker = "" if not line.startswith("<!--") else marker
    return out


def quick_start(name: str) -> list[str]:
    """The command lines of the README block marked ``quick-start:name``."""
    found = [lines for marker, _, lines in blocks(README.read_text()) if marker == f"quick-start:{name}"]
    assert len(found) == 1, f"README has {len(found)} blocks marked quick-start:{name}"
    return [line for line in found[0] if line.strip()]


def command(line: str) -> str:
    """A shell line without its trailing comment."""
    return re.sub(r"\s+#.*$", "", line).strip()


def shown_ready_line() -> str:
    """The line the README says ``rulewright serve`` prints: the plain block after the serve block."""
    bs = blocks(README.read_text())
    at = next(i for i, (marker, _, _) in enumerate(bs) if marker == "quick-start:serve")
    _, lang, lines = bs[at + 1]
    assert lang == "" and len(lines) == 1, "the serve block must be followed by the line it prints"
    return lines[0]


def read_lines(stream, into: queue.Queue) -> None:
    """Each line of ``stream`` into ``into``, then None at its end."""
    for line in stream:
        into.put(line)
    into.put(None)


def drained(lines: queue.Queue, timeout_s: float = 30) -> list[str]:
    """The lines ``read_lines`` queued, up to the end of the stream (the process has exited)."""
    out = []
    while (line := lines.get(timeout=timeout_s)) is not None:
        out.append(line)
    return out


@pytest.mark.network
def test_quick_start_runs_as_shown(tmp_path, cache_dir, faces_path):
    grpc_at, web_at = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RULEWRIGHT_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}", RULEWRIGHT_ADDRESS=grpc_at,
               RULEWRIGHT_WEB_ADDRESS=web_at, RULEWRIGHT_CACHE_DIR=str(cache_dir))   # the model fetched once
    (tmp_path / "examples").symlink_to(REPO / "examples")   # the lines run from a checkout's root

    serve_lines = [command(line) for line in quick_start("serve")]
    assert serve_lines == ["rulewright serve"]
    server = subprocess.Popen(shlex.split(serve_lines[0]), cwd=tmp_path, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out: queue.Queue = queue.Queue()
    err: queue.Queue = queue.Queue()                                # drained, so the server never blocks on it
    threading.Thread(target=read_lines, args=(server.stdout, out), daemon=True).start()
    threading.Thread(target=read_lines, args=(server.stderr, err), daemon=True).start()
    try:
        ready = out.get(timeout=300)
        assert ready is not None, "rulewright serve exited before it was ready: " + "".join(drained(err))[-3000:]
        expected = shown_ready_line().replace(SHOWN_GRPC, grpc_at).replace(SHOWN_WEB, web_at)
        assert ready.rstrip("\n") == expected

        said = {}
        for line in quick_start("client"):
            run = subprocess.run(["bash", "-c", command(line)], cwd=tmp_path, env=env, capture_output=True,
                                 text=True, timeout=600)
            assert run.returncode == 0, f"{line}\n{run.stdout}\n{run.stderr}"
            said[command(line)] = run.stdout
        assert (tmp_path / "data" / "registry").is_dir()                 # the fresh folder's registry
        outputs = "\n".join(said.values())
        assert "created models/faces/versions/2 (parent models/faces/versions/1)" in outputs
        assert "production: 1 -> 2" in outputs and "production: 2 -> 1" in outputs
        assert "8 images from models/faces/versions/2" in outputs
        with Image.open(tmp_path / "before.png") as before, Image.open(tmp_path / "after.png") as after:
            assert before.size == after.size and before.tobytes() != after.tobytes()   # the edit shows
        with Image.open(tmp_path / "after.png") as after, Image.open(tmp_path / "weaker.png") as weaker:
            assert weaker.tobytes() != after.tobytes()                       # another strength, no new version
        assert "8 images from models/faces/versions/2: weaker.png" in outputs

        url = re.search(r"editor at (\S+/) ", ready).group(1)
        assert url == f"http://{web_at}/" and f"**{url.replace(web_at, SHOWN_WEB)}**" in README.read_text()
        built = (REPO / "service" / "server" / "webui" / "index.html").is_file()
        try:
            with urllib.request.urlopen(url, timeout=30) as page:
                status, body = page.status, page.read().decode()
        except urllib.error.HTTPError as err:
            status, body = err.code, err.read().decode()
        if built:
            assert status == 200 and "<html" in body.lower()
        else:                                                       # the page says how to build it
            assert status == 503 and "make web" in body
    finally:
        server.send_signal(signal.SIGINT)
        code = server.wait(timeout=60)
    assert code == 0
    assert out.get(timeout=10) is None                                  # the one human line, nothing more
    logs = drained(err)
    assert any('"event": "serving"' in line for line in logs)
    for line in logs:                                                   # the logs stay JSON lines
        if line.strip() and not GRPC_CORE_LINE.match(line):
            json.loads(line)


@pytest.mark.parametrize("web", ["on", "off"])
def test_serve_prints_where_it_listens(tmp_path, web):
    """The one human line on stdout, as the README shows it, also when the editor is off."""
    grpc_at, web_at = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RULEWRIGHT_")}
    server = subprocess.Popen([str(BIN / "rulewright"), "serve", "--bootstrap", "none", "--device", "cpu",
                               "--address", grpc_at, "--web-address", web_at if web == "on" else "off"],
                              cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    out: queue.Queue = queue.Queue()
    threading.Thread(target=read_lines, args=(server.stdout, out), daemon=True).start()
    try:
        ready = out.get(timeout=120)
    finally:
        server.send_signal(signal.SIGINT)
        assert server.wait(timeout=60) == 0
    shown = shown_ready_line().replace(SHOWN_GRPC, grpc_at)
    if web == "on":
        assert ready == shown.replace(SHOWN_WEB, web_at) + "\n"
    else:
        assert ready == re.sub(r"editor at \S+", "editor off (--web-address)", shown) + "\n"
    assert out.get(timeout=10) is None


# ---- every command the README names ----------------------------------------------------------

def make_targets() -> set[str]:
    return {m.group(1) for m in re.finditer(r"(?m)^([A-Za-z][\w-]*):(?!=)", (REPO / "Makefile").read_text())}


def subcommands(parser) -> dict:
    """A parser's subcommands: name → parser."""
    return next(a.choices for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")


def parses(parser, argv: list[str]) -> None:
    try:
        parser.parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{' '.join(argv)!r} does not parse: exit {exc.code}")


def check_line(line: str) -> None:
    """One shell line of the README: each command in it exists and parses."""
    from rulewright.client.cli import build_parser as client_parser
    from rulewright.service.cli import build_parser as engine_parser, build_server_parser

    for part in re.split(r"&&|;", command(line)):
        words = [w for w in shlex.split(part) if w != "..."]             # "...": settings left out
        while words and re.fullmatch(r"[A-Z][A-Z0-9_]*=\S*", words[0]):    # VAR=value prefixes
            words = words[1:]
        if not words:
            continue
        head, args = Path(words[0]).name or words[0], words[1:]
        if head == "make":
            assert set(args) <= make_targets(), f"{line}: no such make target"
        elif head == "rulewright" and args[:1] == ["serve"]:
            parses(build_server_parser(), args)
        elif head == "rulewright":
            parses(client_parser(), args)
        elif head == "rulewright-engine":
            parses(engine_parser(), args)
        elif head in ("python", "python3") and args[:1] == ["-m"]:
            assert args[1] == "venv" or importlib.util.find_spec(args[1]) is not None, f"{line}: no module {args[1]}"
        elif head == "pip":
            paths = [a for a in args if a.startswith(".")]
            assert all((REPO / p).exists() for p in paths), f"{line}: a path is missing"
        elif head == "node":
            assert (REPO / args[0]).is_file(), f"{line}: no {args[0]}"
        elif head == "curl":                                              # its URL is an endpoint of the HTTP side
            from urllib.parse import urlsplit

            from rulewright.service.server.web.app import ROUTES

            paths = [urlsplit(a).path for a in args if a.startswith("http")]
            assert paths and all(any(r.path_regex.match(p) for r in ROUTES) for p in paths), \
                f"{line}: no such HTTP endpoint"
        elif head not in (".", "grpcurl", "echo"):                       # grpcurl: another project's tool
            pytest.fail(f"{line}: the test does not know {head!r}; teach it")


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_readme_command_exists():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    first = blocks(text)[0][2]
    assert [command(line) for line in first] == ["make demo", "make test"]      # the two commands come first

    for _, lang, lines in blocks(text):
        if lang == "sh":
            for line in lines:
                if line.strip() and not line.lstrip().startswith("#"):
                    check_line(line)

    for span in re.findall(r"`([^`\n]+)`", text):                            # inline commands
        words = span.split()
        if len(words) < 2 or words[1].isupper():                              # `make`, `rulewright COMMAND`
            continue
        if words[0] in ("make", "rulewright", "rulewright-engine", "node") or words[:2] == ["python", "-m"]:
            check_line(span)

    from rulewright.client.cli import build_parser as client_parser

    commands = subcommands(client_parser())
    cli = re.search(r"^- \*\*CLI\*\* `rulewright`.*?(?=^- \*\*)", text, re.S | re.M).group(0)
    for span in re.findall(r"`([^`]+)`", cli):
        name, *actions = span.split()
        if name in ("rulewright", "rulewright-engine") or name.isupper():
            continue
        assert name in commands, f"the CLI has no {name!r}"
        for action in (actions[0].split("|") if actions else []):
            assert action in subcommands(commands[name]), f"rulewright {name} has no {action!r}"


CLIENT_READMES = [REPO / "clients" / "python" / "README.md", REPO / "clients" / "node" / "README.md"]


@pytest.mark.parametrize("page", [*sorted((REPO / "docs").glob("*.md")), *CLIENT_READMES],
                         ids=lambda p: str(p.relative_to(REPO)))
def test_manual_commands_exist(page):
    """Every shell line of the manual's pages and the clients' READMEs (continuations joined) names
    commands that exist and parse."""
    for _, lang, lines in blocks(page.read_text()):
        if lang == "sh":
            for line in re.sub(r"\\\n\s*", " ", "\n".join(lines)).splitlines():
                if line.strip() and not line.lstrip().startswith("#"):
                    check_line(line)


@pytest.mark.parametrize("page", [README, *sorted((REPO / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_links_resolve(page):
    """Every relative link of the README and the manual names a file, and its anchor a heading there."""
    for path, anchor in re.findall(r"\]\(([^)#\s:]*)(#[^)\s]*)?\)", page.read_text()):
        target = (page.parent / path) if path else page
        assert target.exists(), f"{page.name}: {path}"
        if anchor:
            headings = re.findall(r"(?m)^#+ (.+)$", target.read_text())
            assert anchor[1:] in {slug(h) for h in headings}, f"{page.name}: {path}{anchor}"
