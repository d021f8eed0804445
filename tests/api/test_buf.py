"""buf lint (STANDARD + COMMENTS, with the exceptions documented in buf.yaml) and buf format pass."""

from __future__ import annotations

import subprocess

import pytest

from .conftest import REPO, missing

BUF = REPO / ".tools" / "node_modules" / ".bin" / "buf"


@pytest.fixture(scope="module")
def buf() -> str:
    if not BUF.exists():
        missing("buf (npm install --prefix .tools @bufbuild/buf)")
    return str(BUF)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)


def test_buf_lint_passes(buf):
    result = run(buf, "lint")
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_format_is_clean(buf):
    result = run(buf, "format", "--diff", "--exit-code")
    assert result.returncode == 0, result.stdout + result.stderr


def test_buf_lint_catches_an_undocumented_field(buf, tmp_path):
    """The COMMENTS rules are on: a field without a comment fails the lint."""
    module = tmp_path / "protos" / "rulewright" / "v1"
    module.mkdir(parents=True)
    (module / "x.proto").write_text(
        'syntax = "proto3";\n\npackage rulewright.v1;\n\n// Documented.\nmessage X {\n  int32 undocumented = 1;\n}\n'
    )
    (tmp_path / "buf.yaml").write_text((REPO / "buf.yaml").read_text())
    result = subprocess.run([buf, "lint"], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode != 0
    assert "undocumented" in result.stdout + result.stderr
