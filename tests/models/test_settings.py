from pathlib import Path

import pytest

from models import ModelSettings, tandem_home


def test_home_comes_from_the_environment(home: Path) -> None:
    assert tandem_home() == home


def test_home_defaults_to_the_user_cache(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TANDEM_HOME", raising=False)
    assert ModelSettings().home == Path("~/.cache/tandem").expanduser()


def test_home_expands_the_user_directory(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TANDEM_HOME", "~/elsewhere")
    assert tandem_home() == Path.home() / "elsewhere"
