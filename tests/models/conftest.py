"""Fixtures of the models tests: real weights, real llama.cpp, real transformers."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from models import (
    BUILTIN_PAIRS,
    Catalog,
    ModelPair,
    load_template,
    locate_bundled_gguf,
    prepare_cloud_weights,
)
from tests.models.support import Prepared


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh, empty TANDEM_HOME."""
    monkeypatch.setenv("TANDEM_HOME", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="session")
def default_pair() -> ModelPair:
    """The built-in default pair."""
    return Catalog(list(BUILTIN_PAIRS)).default()


@pytest.fixture(scope="session")
def gguf() -> Path:
    """The bundled SmolLM2 GGUF."""
    return locate_bundled_gguf()


@pytest.fixture(scope="session")
def template() -> str:
    """The tool-aware ChatML template text."""
    return load_template("chatml_tools")


@pytest.fixture(scope="session")
def llama_vocab(gguf: Path) -> Iterator[Any]:
    """llama.cpp with the bundled GGUF's vocabulary only."""
    from llama_cpp import Llama

    llama = Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    yield llama
    llama.close()  # not at interpreter exit, where llama-cpp-python's __del__ fails


@pytest.fixture(scope="session")
def hf_tokenizer(gguf: Path) -> Any:
    """The transformers tokenizer read from the bundled GGUF."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)


@pytest.fixture(scope="session")
def tokenizer_dir(
    hf_tokenizer: Any, template: str, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """An HF directory holding only the target tokenizer (no weights): enough for vocab checks."""
    path = tmp_path_factory.mktemp("tokenizer")
    hf_tokenizer.chat_template = template
    hf_tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="session")
def prepared(default_pair: ModelPair, tmp_path_factory: pytest.TempPathFactory) -> Prepared:
    """The default pair's cloud weights, converted once into a session TANDEM_HOME."""
    home = tmp_path_factory.mktemp("tandem-home")
    started = time.perf_counter()
    path = prepare_cloud_weights(default_pair, home=home)
    return Prepared(home=home, path=path, seconds=time.perf_counter() - started)


@pytest.fixture(scope="session")
def swapped_tokenizer_dir(
    tokenizer_dir: Path, hf_tokenizer: Any, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """A target tokenizer whose ids for "user" and "system" are swapped: incompatible."""
    path = tmp_path_factory.mktemp("swapped-tokenizer")
    for file in tokenizer_dir.iterdir():
        shutil.copy2(file, path / file.name)
    spec = json.loads((path / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = spec["model"]["vocab"]
    vocab["user"], vocab["system"] = vocab["system"], vocab["user"]
    (path / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
    return path
