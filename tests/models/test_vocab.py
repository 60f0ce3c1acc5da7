from pathlib import Path
from typing import Any

import pytest

from models import (
    IncompatibleVocabError,
    WeightsNotFoundError,
    check_vocab_compatible,
    require_compatible,
)
from tests.models.support import Prepared


def test_bundled_draft_and_its_tokenizer_are_compatible(gguf: Path, tokenizer_dir: Path) -> None:
    report = check_vocab_compatible(gguf, tokenizer_dir)
    assert report.compatible
    assert report.n_vocab_draft == report.n_vocab_target == report.tokens_compared == 49152
    assert report.samples_compared >= 3
    assert report.mismatches == []


def test_padded_target_vocab_is_still_compatible(
    gguf: Path, hf_tokenizer: Any, tmp_path: Path
) -> None:
    import copy

    padded = copy.deepcopy(hf_tokenizer)
    padded.add_tokens(["<|pad_0|>", "<|pad_1|>"], special_tokens=True)
    padded.save_pretrained(str(tmp_path))
    report = check_vocab_compatible(gguf, tmp_path)
    assert report.compatible
    assert (report.n_vocab_draft, report.n_vocab_target) == (49152, 49154)


def test_swapped_tokens_are_reported(
    gguf: Path, swapped_tokenizer_dir: Path, hf_tokenizer: Any
) -> None:
    user, system = hf_tokenizer.convert_tokens_to_ids(["user", "system"])
    report = check_vocab_compatible(gguf, swapped_tokenizer_dir)
    assert not report.compatible
    token_ids = {m.where for m in report.mismatches if m.kind == "token"}
    assert token_ids == {f"id {user}", f"id {system}"}
    assert any(m.kind == "encoding" for m in report.mismatches)


def test_require_compatible_explains_the_difference(
    gguf: Path, swapped_tokenizer_dir: Path, hf_tokenizer: Any
) -> None:
    user = hf_tokenizer.convert_tokens_to_ids("user")
    with pytest.raises(IncompatibleVocabError) as caught:
        require_compatible(gguf, swapped_tokenizer_dir)
    message = str(caught.value)
    assert f"id {min(user, hf_tokenizer.convert_tokens_to_ids('system'))}:" in message
    assert "draft and target must share a tokenizer" in message
    assert "\n" not in message


def test_missing_target_dir(gguf: Path, tmp_path: Path) -> None:
    with pytest.raises(WeightsNotFoundError) as caught:
        check_vocab_compatible(gguf, tmp_path / "absent")
    assert "absent" in str(caught.value)


@pytest.mark.slow
def test_prepared_default_pair_is_compatible(prepared: Prepared, gguf: Path) -> None:
    report = require_compatible(gguf, prepared.path)
    assert report.compatible
    assert report.n_vocab_target == 49152
