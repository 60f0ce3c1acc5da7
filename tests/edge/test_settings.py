"""Edge settings: unset options take the defaults of the library that owns them."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from edge.settings import EdgeSettings
from edge.state import engine_config
from models.catalog import BUILTIN_PAIRS, DEFAULT_PAIR, Catalog
from models.latency import EngineKind


@pytest.fixture(autouse=True)
def _no_edge_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in ("TANDEM_EDGE_N_CTX", "TANDEM_EDGE_MODEL", "TANDEM_EDGE_ENGINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TANDEM_HOME", str(tmp_path))


def test_unset_n_ctx_takes_the_catalog_pairs_context_window() -> None:
    settings = EdgeSettings.model_validate({})
    assert settings.model == DEFAULT_PAIR and settings.n_ctx is None
    config, _ = engine_config(settings)
    assert config.n_ctx == Catalog.load().get(DEFAULT_PAIR).edge.n_ctx
    assert engine_config(EdgeSettings.model_validate({"n_ctx": 512}))[0].n_ctx == 512


def test_a_user_pairs_n_ctx_reaches_the_engine(tmp_path: Path) -> None:
    gguf = BUILTIN_PAIRS[0].edge.gguf
    (tmp_path / "models.yaml").write_text(
        f"pairs:\n  - name: wide\n    edge: {{gguf: '{gguf}', n_ctx: 4096}}\n", encoding="utf-8"
    )
    config, _ = engine_config(EdgeSettings.model_validate({"model": "wide"}))
    assert config.n_ctx == 4096


def test_one_engine_vocabulary() -> None:
    assert EdgeSettings.model_validate({}).engine is EngineKind.REAL
    assert EdgeSettings.model_validate({"engine": "sim"}).engine is EngineKind.SIM
    with pytest.raises(ValidationError) as info:
        EdgeSettings.model_validate({"engine": "llama"})
    assert info.value.errors()[0]["loc"] == ("engine",)


def test_a_gguf_that_is_missing_or_not_a_model_is_refused_in_one_line(tmp_path: Path) -> None:
    """Found trying issue 17's start-up faults: llama.cpp's traceback was the message."""
    with pytest.raises(ValidationError, match="no GGUF file at"):
        EdgeSettings.model_validate({"gguf": tmp_path / "absent.gguf"})
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"\x8a7\xb8\xdd" + bytes(4096))
    with pytest.raises(ValidationError, match="is not a GGUF model file"):
        EdgeSettings.model_validate({"gguf": garbage})
    from models.bundled import locate_bundled_gguf

    real = locate_bundled_gguf()
    assert EdgeSettings.model_validate({"gguf": real}).gguf == real


def test_the_cli_says_so_without_a_traceback(tmp_path: Path) -> None:
    import subprocess
    import sys

    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(bytes(4096))
    done = subprocess.run(
        [sys.executable, "-m", "tandem.cli", "edge", "serve", "--gguf", str(garbage)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode != 0
    assert "invalid setting gguf:" in done.stderr and "is not a GGUF model file" in done.stderr
    assert "Traceback" not in done.stderr and "Value error" not in done.stderr
