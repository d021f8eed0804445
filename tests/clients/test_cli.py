"""The ``rulewright`` command against a live server: every subcommand, error printing, exit codes.

Most runs call ``cli.main`` in this process (fast, output via capsys); a few run the installed
``.venv/bin/rulewright`` to check the entry point, the environment defaults and ``serve``.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rulewright.client import Client, cli
from tests.builders import TINY_SPEC

EXE = Path(sys.executable).with_name("rulewright")
COPY, PASTE = "1:8,8,16,16", "2:8,8,16,16"
TINY_FLAGS = ["--copy", COPY, "--paste", PASTE, "--layer", "main.6", "--rank", "2", "--goal", "value", "--steps", "40"]


@pytest.fixture
def rw(live, capsys):
    """Run ``rulewright --address <live> ARGS``: (exit status, stdout, stderr)."""
    address, _ = live

    def run(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            code = cli.main(["--address", address, *args])
        except SystemExit as exc:        # argparse's usage errors
            code = exc.code
        out, err = capsys.readouterr()
        return code, out, err
    return run


@pytest.fixture
def client(live):
    with Client(live[0]) as c:
        yield c


def test_sample_to_files_and_grid(rw, client, tmp_path):
    code, out, _ = rw("sample", "tiny@production", "--seeds", "0-2,5", "--out", str(tmp_path / "album"))
    assert code == 0 and "models/tiny/versions/1" in out
    files = sorted(p.name for p in (tmp_path / "album").iterdir())
    assert files == ["seed-0.png", "seed-1.png", "seed-2.png", "seed-5.png"]
    expected = client.sample("tiny/1", [5])[0].png
    assert (tmp_path / "album" / "seed-5.png").read_bytes() == expected   # the server's PNG, untouched

    code, out, _ = rw("sample", "tiny", "--seeds", "0-4", "--grid", str(tmp_path / "grid.png"), "--columns", "3",
                      "--scale", "2")
    assert code == 0
    assert Image.open(tmp_path / "grid.png").size == (3 * 32 * 2, 2 * 32 * 2)   # 5 images: 2 rows of 3


def test_sample_usage_errors_exit_2(rw):
    code, _, err = rw("sample", "tiny", "--seeds", "5-2", "--out", "x")
    assert code == 2 and "empty range" in err


def test_dissect_heatmap(rw, tmp_path):
    code, out, _ = rw("dissect", "tiny", "--layer", "main.6", "--region", "1:0,0,16,16", "--region", "2:8,8,24,24",
                      "--top", "2", "--threshold-samples", "64", "--out", str(tmp_path / "heat.png"), "--scale", "3")
    assert code == 0 and "layer main.6" in out
    units = [line.split()[0] for line in out.splitlines()[1:3]]
    assert all(u.isdigit() for u in units)
    heat = Image.open(tmp_path / "heat.png")
    assert heat.size == (2 * 32 * 3, 2 * 32 * 3)             # columns: the two seeds; rows: the two units
    assert len(np.unique(np.asarray(heat).reshape(-1, 3), axis=0)) > 16  # a picture, not a blank tile


def test_rewrite_from_flags_with_progress_and_promote(rw, client):
    before = client.sample("tiny@production", [2])[0].png
    code, out, err = rw("rewrite", "tiny", *TINY_FLAGS, "--promote", "production", "--reason", "cli test")
    assert code == 0, err
    assert "created models/tiny/versions/2 (parent models/tiny/versions/1)" in out
    assert "production: 1 -> 2" in out
    assert "optimize" in err and "40/40" in err              # the progress bar ran to the end on stderr
    assert client.alias("tiny", "production").version == 2
    assert client.sample("tiny@production", [2])[0].png != before
    assert client.alias_history("tiny", "production")[-1].reason == "cli test"
    spec = client.version("tiny", 2).spec
    assert (spec["copy"], spec["paste"], spec["steps"]) == ({"seed": 1, "box": [8, 8, 16, 16]},
                                                            [{"seed": 2, "box": [8, 8, 16, 16]}], 40)


def test_rewrite_from_spec_with_override_and_dry_run(rw, client, tmp_path):
    spec = tmp_path / "tiny.json"
    spec.write_text(json.dumps({**TINY_SPEC, "context": [{"seed": 3, "box": [0, 0, 16, 16]}]}))
    code, out, err = rw("rewrite", "tiny", "--spec", str(spec), "--steps", "30", "--dry-run", "--quiet")
    assert code == 0, err
    assert out.startswith("dry run") and "nothing committed" in out and err == ""
    assert [v.number for v in client.versions("tiny")] == [1]
    code, out, _ = rw("rewrite", "tiny", "--spec", str(spec), "--steps", "30", "--quiet")
    assert code == 0 and "created models/tiny/versions/2" in out
    made = client.version("tiny", 2).spec
    assert made["steps"] == 30 and made["rank"] == 2 and made["context"] == [{"seed": 3, "box": [0, 0, 16, 16]}]


def test_rewrite_error_prints_message_and_field_violations(rw, client):
    code, out, err = rw("rewrite", "tiny", "--copy", COPY, "--paste", "2:8,8,99,99", "--layer", "main.6", "--quiet")
    assert code == 1 and out == ""
    lines = err.splitlines()
    assert lines[0].startswith("rulewright: error: ") and "99" in lines[0]
    assert lines[1].startswith("  spec.paste[0].box: ") and "0 <= x0 < x1 <= 32" in lines[1]
    assert [v.number for v in client.versions("tiny")] == [1]


def test_rewrite_usage_errors_exit_2_with_the_subcommands_usage(rw, tmp_path):
    code, _, err = rw("rewrite", "tiny", "--layer", "main.6")
    assert code == 2 and "--copy and at least one --paste" in err
    assert err.startswith("usage: rulewright rewrite ") and "rulewright rewrite: error: " in err
    code, _, err = rw("rewrite", "tiny", "--copy", "1:8,8,16", "--paste", PASTE)
    assert code == 2 and "SEED:x0,y0,x1,y1" in err and err.startswith("usage: rulewright rewrite ")


def test_a_spec_field_refused_before_sending_is_printed_like_the_servers_refusal(rw, client, tmp_path):
    """The spec's content is no usage error: named by its path, exit 1, as the server would refuse it."""
    bad = tmp_path / "bad.json"
    for change, line in (({"colour": "red"}, "  spec.colour: unknown field"),
                         ({"strength": "high"}, "  spec.strength: must be a number, got 'high'"),
                         ({"paste": [{"seed": 2, "bbox": [8, 8, 16, 16]}]}, "  spec.paste[0].bbox: unknown field")):
        bad.write_text(json.dumps({**TINY_SPEC, **change}))
        code, out, err = rw("rewrite", "tiny", "--spec", str(bad))
        assert (code, out) == (1, "") and err.splitlines() == [f"rulewright: error: {line.strip()}", line]
    assert [v.number for v in client.versions("tiny")] == [1]


def test_versions_aliases_alias_set_history_rollback(rw, client):
    assert rw("rewrite", "tiny", *TINY_FLAGS, "--quiet")[0] == 0
    code, out, _ = rw("versions", "tiny")
    rows = [line.split("\t") for line in out.splitlines()]
    assert code == 0 and [r[0] for r in rows] == ["1", "2"]
    assert rows[0][1] == "import" and rows[1][1:3] == ["edit", "parent 1"] and "aliases production" in rows[0]

    code, out, _ = rw("alias", "set", "tiny", "production", "2", "--reason", "ship it")
    assert code == 0 and out.strip() == "production: 1 -> 2"
    code, out, _ = rw("aliases", "tiny")
    assert code == 0 and out.startswith("production\t2\tetag ")
    code, out, err = rw("alias", "set", "tiny", "production", "1", "--expect-version", "1")
    assert code == 1 and "rulewright: error:" in err and client.alias("tiny", "production").version == 2

    code, out, _ = rw("rollback", "tiny")
    assert code == 0 and out.strip() == "production: 2 -> 1"
    code, out, _ = rw("alias", "history", "tiny")
    moves = [line.split("\t") for line in out.splitlines()]
    assert [m[1] for m in moves][-2:] == ["1 -> 2", "2 -> 1"]
    assert moves[-2][-1] == "ship it" and moves[-1][-1] == "rollback to version 1"

    code, out, err = rw("rollback", "tiny", "--alias", "staging")
    assert code == 1 and "staging" in err                     # never set: NOT_FOUND, printed


def test_models_layers_export(rw, tmp_path):
    code, out, _ = rw("models")
    assert code == 0 and {line.split("\t")[0] for line in out.splitlines()} >= {"faces", "tiny"}
    code, out, _ = rw("layers", "tiny")
    assert code == 0 and "default layer" in out and "  main.6\t" in out
    code, out, _ = rw("export", "tiny", "1", "--out", str(tmp_path / "t.safetensors"))
    data = (tmp_path / "t.safetensors").read_bytes()
    assert code == 0 and hashlib.sha256(data).hexdigest() in out
    code, _, err = rw("export", "tiny", "9", "--out", str(tmp_path / "none.safetensors"))
    assert code == 1 and err.startswith("rulewright: error: ") and not (tmp_path / "none.safetensors").exists()


def test_unreachable_server_is_an_error_not_a_traceback(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code = cli.main(["--address", f"127.0.0.1:{port}", "--retries", "1", "--timeout", "5", "models"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith("rulewright: error: ") and "Traceback" not in err


def test_installed_command_reads_the_environment(live):
    address, _ = live
    proc = subprocess.run([str(EXE), "versions", "tiny"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "RULEWRIGHT_ADDRESS": address})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("1\timport\t")


def test_serve_delegates_to_the_server():
    proc = subprocess.run([str(EXE), "serve", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--data-dir" in proc.stdout and "--max-batch" in proc.stdout


def test_serve_without_the_server_says_how_to_get_it(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "rulewright.service.cli", None)   # as if only the client were installed
    assert cli.main(["serve", "--address", "127.0.0.1:0"]) == 2
    assert capsys.readouterr().err == "rulewright serve needs the server: pip install rulewright\n"


def test_dataset_create_get_list_cancel(rw, client):
    code, out, err = rw("dataset", "create", "tiny@production", "--seeds", "0-19", "--shard-size", "10",
                        "--request-id", "cli-dataset")
    assert code == 0, err
    first = out.splitlines()[0]
    name = first.split("\t")[0]
    assert name.startswith("operations/") and "\tsucceeded\tmodels/tiny/versions/1\tshards 2/2\timages 20/20" in first
    assert "manifest " in out and out.count("sha256 ") == 2
    assert "dataset" in err                                        # the progress bar, on stderr

    job = client.dataset_job(name)
    assert job.state == "succeeded" and [s.samples for s in job.shards] == [10, 10]
    for shard in job.shards:                                      # the shard's sha256 as the manifest recorded it
        path = shard.uri.removeprefix("file://")
        assert hashlib.sha256(Path(path).read_bytes()).hexdigest() == shard.sha256

    code, out, _ = rw("dataset", "get", name.split("/")[1])
    assert code == 0 and out.startswith(name) and out.count(".tar\t") == 2
    code, out, _ = rw("dataset", "list")
    assert code == 0 and name in out
    code, out, _ = rw("dataset", "cancel", name)                  # a finished job stays finished
    assert code == 0 and "\tsucceeded\t" in out
    code, out, _ = rw("dataset", "create", "tiny", "--seeds", "0-19", "--shard-size", "10",
                      "--request-id", "cli-dataset", "--no-wait")  # the same request id: the same job
    assert code == 0 and out.startswith(name)


def test_dataset_create_refuses_bad_input(rw):
    code, _, err = rw("dataset", "create", "tiny", "--seeds", "9-3")
    assert code == 2 and "non-empty range" in err
    code, _, err = rw("dataset", "create", "tiny", "--seeds", "0-9", "--shard-size", "20000")
    assert code == 1 and "shard_size" in err


def test_dataset_create_out_writes_to_an_allowed_location_and_refuses_others(live, capsys, tmp_path):
    from rulewright.service.server.app import create_server

    allowed = (tmp_path / "datasets").as_uri()
    server, port = create_server(live[1], job_output_prefixes=(allowed,))     # the operator's allow-list
    try:
        def rw(*args: str) -> tuple[int, str, str]:
            capsys.readouterr()
            code = cli.main(["--address", f"127.0.0.1:{port}", *args])
            out, err = capsys.readouterr()
            return code, out, err

        code, out, err = rw("dataset", "create", "tiny", "--seeds", "0-19", "--shard-size", "10", "--quiet",
                            "--out", f"{allowed}/faces")
        assert code == 0, err
        assert f"manifest {allowed}/faces/docs/manifest.json" in out
        assert [line.split("\t")[0] for line in out.splitlines()[2:]] == \
            [f"{allowed}/faces/docs/shard-{i:06d}.tar" for i in range(2)]
        with Client(f"127.0.0.1:{port}") as c:
            job = c.dataset_job(out.split("\t")[0])
            assert job.output_uri == f"{allowed}/faces"
        code, _, err = rw("dataset", "create", "tiny", "--seeds", "0-9", "--out", "s3://elsewhere/x")
        assert code == 1 and "output_uri" in err and "not under an output prefix" in err
    finally:
        server.stop(0).wait()


def test_stats_create_get_list_and_the_client_call(rw, client):
    code, out, err = rw("stats", "create", "tiny@production", "--layer", "main.6", "--samples", "4096",
                        "--shard-size", "1000", "--request-id", "cli-stats")
    assert code == 0, err
    first = out.splitlines()[0]
    name = first.split("\t")[0]
    # 1,000 rounds up to 1,024 samples, the samples whose 8x8 keys fill one float32 block
    assert "\tsucceeded\tmodels/tiny/versions/1\tmain.6\tshards 4/4\tsamples 4096/4096" in first
    assert "cached {" in out and "statistic " in out
    assert "statistics" in err                                     # the progress bar, on stderr
    job = client.statistics_job(name)
    assert job.state == "succeeded" and job.shard_size == 1024 and '"samples":4096' in job.cache_key
    code, out, _ = rw("stats", "get", name.split("/")[1])
    assert code == 0 and out.startswith(name)
    code, out, _ = rw("stats", "list")
    assert code == 0 and name in out and [j.name for j in client.statistics_jobs()] == [name]
    assert not client.dataset_jobs()                               # the kinds stay apart in listings
    same = client.create_statistics_job("tiny", 4096, layer="main.6", shard_size=1000, request_id="cli-stats")
    assert same.name == name and client.wait_statistics_job(name).sha256 == job.sha256
    code, _, err = rw("stats", "create", "tiny", "--samples", "0")
    assert code == 1 and "stats.samples" in err


def test_a_huge_seed_range_is_refused_before_it_is_expanded():
    """A typo like 0-9999999999 is a usage error naming the flag, not a MemoryError."""
    proc = subprocess.run([str(EXE), "--address", "127.0.0.1:9", "sample", "faces", "--seeds", "0-9999999999",
                           "--out", "unused"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "--seeds" in proc.stderr and "10,000,000,000 seeds, at most 100,000" in proc.stderr


# ---- one reference syntax, version show, exit codes, sample splitting --------------------------


def stored_edit(domain) -> str:
    """A version 2 of tiny stored straight into the registry (random deltas, no fit): its reference."""
    from rulewright.service.engine.delta import to_bytes
    from tests.builders import random_deltas

    base = domain.generator(domain.resolve("tiny/1")).model
    v = domain.registry.create_version("tiny", parent=1, delta=to_bytes(random_deltas(base, seed=0)),
                                       spec={"description": "stored edit"})
    return f"tiny/{v.number}"


def test_one_reference_syntax_for_alias_set_rollback_history_and_export(rw, client, live, tmp_path):
    edited = stored_edit(live[1])
    assert rw("alias", "set", "tiny", "production", "tiny/2")[1].strip() == "production: 1 -> 2"
    assert rw("alias", "set", "tiny@staging", "tiny@production")[1].strip() == "staging: - -> 2"
    assert rw("alias", "set", "tiny@production", "1")[1].strip() == "production: 2 -> 1"
    assert rw("rollback", "tiny@production")[1].strip() == "production: 1 -> 2"
    code, out, _ = rw("alias", "history", "tiny@production")
    assert code == 0 and [line.split("\t")[1] for line in out.splitlines()][-3:] == ["1 -> 2", "2 -> 1", "1 -> 2"]
    shas = {}
    for ref in (["tiny@production"], ["tiny/2"], ["tiny", "2"], ["tiny"]):     # bare: production's version
        out_file = tmp_path / f"{'-'.join(ref).replace('@', '-').replace('/', '-')}.safetensors"
        code, out, err = rw("export", *ref, "--out", str(out_file))
        assert code == 0, err
        assert out.startswith(f"models/{edited.replace('/', '/versions/')}: ")
        shas[tuple(ref)] = hashlib.sha256(out_file.read_bytes()).hexdigest()
    assert len(set(shas.values())) == 1

    for args, says in ((("alias", "set", "tiny", "production", "faces/1"), "is a version of 'faces', not of 'tiny'"),
                       (("alias", "set", "tiny", "1"), "name the alias: tiny@ALIAS"),
                       (("rollback", "tiny/2"), "tiny/2 names a version"),
                       (("export", "tiny/2", "1", "--out", str(tmp_path / "x")), "already names a version"),
                       (("sample", "Tiny", "--seeds", "0"), "is not a model reference")):
        code, out, err = rw(*args)
        usage = f"usage: rulewright {' '.join(args[:2] if args[0] == 'alias' else args[:1])} "
        assert (code, out) == (2, "") and err.startswith(usage) and says in err, err
    assert client.alias("tiny", "production").version == 2            # no refused command moved anything


def test_a_bare_name_samples_production_not_the_newest_and_says_which(rw, live, tmp_path):
    assert stored_edit(live[1]) == "tiny/2"
    code, out, _ = rw("sample", "tiny", "--seeds", "0-1", "--out", str(tmp_path / "a"))
    assert code == 0 and out.startswith("2 images from models/tiny/versions/1 ")


def test_sample_splits_a_request_above_the_servers_image_cap(rw, client, live, tmp_path):
    import dataclasses

    import grpc

    from rulewright.client.errors import RulewrightError

    domain = live[1]
    domain.limits = dataclasses.replace(domain.limits, max_images=5)
    with pytest.raises(RulewrightError) as refused:                  # one call over the cap is refused...
        client.sample("tiny", list(range(12)))
    assert refused.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.metadata["setting"] == "max_images" and refused.value.metadata["limit"] == "5"
    # ...so the command asks in calls of the size the refusal names
    code, out, err = rw("sample", "tiny", "--seeds", "0-11", "--out", str(tmp_path / "album"))
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "album").iterdir()) == sorted(f"seed-{s}.png" for s in range(12))
    assert (tmp_path / "album" / "seed-11.png").read_bytes() == client.sample("tiny/1", [11])[0].png
    code, out, err = rw("sample", "tiny", "--seeds", "20-26", "--batch", "3", "--grid", str(tmp_path / "g.png"),
                        "--columns", "7", "--scale", "1")
    assert code == 0 and Image.open(tmp_path / "g.png").size == (7 * 32, 32)


def test_version_show_and_versions_describe_a_version(rw):
    code, out, err = rw("rewrite", "tiny", *TINY_FLAGS, "--description", "a test edit", "--quiet")
    assert code == 0, err
    code, out, _ = rw("versions", "tiny")
    assert code == 0 and out.splitlines()[1].endswith("\ta test edit (strength 1)")
    code, out, _ = rw("version", "show", "tiny/2")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("models/tiny/versions/2\tedit\tparent 1\t")
    assert lines[1:5] == ["lineage: 1 -> 2", "aliases: -", "description: a test edit", "strength: 1"]
    assert "  targets: 1" in lines and any(line.startswith("strength curve: chosen ") for line in lines)
    assert "found: 0 targets (in the spec below)" in lines
    spec = json.loads(out[out.index("spec:\n") + len("spec:\n"):])
    assert spec["found"] == [] and spec["description"] == "a test edit" and spec["steps"] == 40
    assert "\n  \"paste\": [\n    {\"seed\": " in out                # a region a line: the spec stays readable
    code, out, _ = rw("version", "show", "tiny")                   # the bare name: production's version 1
    assert code == 0 and out.startswith("models/tiny/versions/1\timport\t") and "aliases: production" in out


def test_the_installed_command_exits_1_on_a_refused_call_and_2_on_usage(live):
    address, _ = live
    env = {**os.environ, "RULEWRIGHT_ADDRESS": address}
    refused = subprocess.run([str(EXE), "sample", "nosuch", "--seeds", "0", "--out", "unused"], capture_output=True,
                             text=True, timeout=120, env=env)
    assert refused.returncode == 1 and refused.stderr.startswith("rulewright: error: ") and "nosuch" in refused.stderr
    usage = subprocess.run([str(EXE), "alias", "set", "tiny", "production", "tiny/x"], capture_output=True,
                           text=True, timeout=120, env=env)
    assert usage.returncode == 2 and usage.stderr.startswith("usage: rulewright alias set ")
    assert "rulewright alias set: error: VERSION: 'tiny/x' is not a model reference" in usage.stderr
