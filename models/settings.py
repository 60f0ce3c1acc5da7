"""Settings of the models library: where Tandem keeps converted weights and user config."""

from __future__ import annotations

from pathlib import Path

from pydantic import field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEFAULT_HOME = Path("~/.cache/tandem")


class ModelSettings(BaseSettings):
    """Settings read from `TANDEM_*` environment variables."""

    model_config = SettingsConfigDict(env_prefix="TANDEM_", extra="ignore")

    home: Path = DEFAULT_HOME

    @field_validator("home")
    @classmethod
    def _expand(cls, value: Path) -> Path:
        return value.expanduser()


def tandem_home() -> Path:
    """Return Tandem's data directory (`$TANDEM_HOME`, default `~/.cache/tandem`)."""
    return ModelSettings().home
