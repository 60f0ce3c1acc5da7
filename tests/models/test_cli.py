from pathlib import Path

import pytest
from typer.testing import CliRunner

from tandem.commands.models import app
from tests.models.support import Prepared

runner = CliRunner()


def test_list_shows_the_default_pair(home: Path) -> None:
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 0, result.output
    assert "smollm2-135m *" in result.stdout
    assert "present" in result.stdout
    assert "not prepared" in result.stdout


def test_unknown_pair_is_one_clear_line(home: Path) -> None:
    result = runner.invoke(app, ["prepare", "gpt-9"])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines() == [
        "error: unknown model pair 'gpt-9'; known pairs: smollm2-135m"
    ]
    assert "Traceback" not in result.output


def test_invalid_catalog_is_one_clear_line(home: Path) -> None:
    (home / "models.yaml").write_text("pairs:\n  - name: x\n", encoding="utf-8")
    result = runner.invoke(app, ["list"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "pairs.0.edge: Field required" in lines[0]


def test_check_against_a_compatible_tokenizer(home: Path, tokenizer_dir: Path) -> None:
    result = runner.invoke(app, ["check", "smollm2-135m", "--target", str(tokenizer_dir)])
    assert result.exit_code == 0, result.output
    assert "smollm2-135m: compatible: 49152 token ids" in result.stdout


def test_check_against_an_incompatible_tokenizer(home: Path, swapped_tokenizer_dir: Path) -> None:
    result = runner.invoke(app, ["check", "--target", str(swapped_tokenizer_dir)])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "do not share a tokenizer" in lines[0]


@pytest.mark.slow
def test_prepare_list_and_check(prepared: Prepared, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_HOME", str(prepared.home))
    prepared_run = runner.invoke(app, ["prepare"])
    assert prepared_run.exit_code == 0, prepared_run.output
    assert prepared_run.stdout.strip().splitlines()[-1] == str(prepared.path)
    listed = runner.invoke(app, ["list"])
    assert "prepared" in listed.stdout
    assert "not prepared" not in listed.stdout
    checked = runner.invoke(app, ["check"])
    assert checked.exit_code == 0, checked.output
    assert "compatible" in checked.stdout
