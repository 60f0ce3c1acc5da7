"""The ``tandem`` CLI: every command has help, versions print, user errors are one line."""

from __future__ import annotations

import subprocess
import sys

import pytest
from typer.testing import CliRunner

from tandem.cli import app

COMMANDS = [
    [],
    ["up"],
    ["status"],
    ["version"],
    ["edge"],
    ["edge", "serve"],
    ["cloud"],
    ["cloud", "serve"],
    ["models"],
    ["models", "list"],
    ["models", "prepare"],
    ["models", "check"],
    ["bench"],
    ["bench", "run"],
    ["router"],
    ["router", "train"],
    ["policy"],
    *[["policy", c] for c in ("show", "get", "set", "edit", "validate", "diff", "history")],
    *[["policy", c] for c in ("rollback", "explain")],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "tandem")
def test_every_command_has_help(command: list[str]) -> None:
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output
    assert len(result.output.splitlines()) > 3


def test_version_prints_the_installed_version() -> None:
    from mesh.version import __version__

    result = CliRunner().invoke(app, ["version"])
    assert result.exit_code == 0
    assert result.output.strip() == __version__


def test_invalid_setting_is_one_clear_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "edge", "serve", "--n-ctx", "3"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: invalid setting n_ctx")
    assert "Traceback" not in proc.stderr


def test_status_without_a_mesh_fails_clearly() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "status", "--nats-url", "nats://127.0.0.1:1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1
    assert "error:" in proc.stderr
    assert "Traceback" not in proc.stderr
