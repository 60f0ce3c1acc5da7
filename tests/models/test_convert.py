import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from models import (
    CONVERTER_VERSION,
    CloudModel,
    ConversionRecord,
    EdgeModel,
    ModelPair,
    WeightsNotFoundError,
    cloud_weights_dir,
    edge_gguf_path,
    is_prepared,
    prepare_cloud_weights,
    render_chat,
)
from tests.models.support import CONVERSATIONS, Prepared

GENERATED_TOKENS = 32


def test_edge_gguf_path_reports_a_missing_file(tmp_path: Path) -> None:
    pair = ModelPair(name="ghost", edge=EdgeModel(gguf=str(tmp_path / "ghost.gguf")))
    with pytest.raises(WeightsNotFoundError) as caught:
        edge_gguf_path(pair)
    assert "ghost.gguf" in str(caught.value)


def test_user_hf_dir_is_used_as_is(tmp_path: Path, gguf: Path) -> None:
    hf_dir = tmp_path / "hf"
    pair = ModelPair(
        name="mine", edge=EdgeModel(gguf=str(gguf)), cloud=CloudModel(source=str(hf_dir))
    )
    with pytest.raises(WeightsNotFoundError) as caught:
        prepare_cloud_weights(pair, home=tmp_path)
    assert "config.json" in str(caught.value)
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}", encoding="utf-8")
    assert prepare_cloud_weights(pair, home=tmp_path) == hf_dir
    assert is_prepared(pair)


def test_fresh_home_is_not_prepared(home: Path, default_pair: ModelPair) -> None:
    assert cloud_weights_dir(default_pair) == home / "models" / "smollm2-135m" / "hf"
    assert not is_prepared(default_pair)


@pytest.mark.slow
def test_prepared_dir_is_a_clean_hf_model(prepared: Prepared, gguf: Path, template: str) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((prepared.path / "config.json").read_text(encoding="utf-8"))
    assert "quantization_config" not in config
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert (prepared.path / "model.safetensors").is_file()
    assert not list(prepared.path.parent.glob(".hf-*"))  # no temp dirs left behind
    record = ConversionRecord.model_validate_json((prepared.path / "checksum.json").read_text())
    assert (record.converter_version, record.source, record.dtype) == (
        CONVERTER_VERSION,
        str(gguf),
        "float32",
    )
    assert len(record.source_sha256) == 64
    assert AutoTokenizer.from_pretrained(str(prepared.path)).chat_template == template
    model = AutoModelForCausalLM.from_pretrained(str(prepared.path))
    assert model.num_parameters() > 100_000_000


@pytest.mark.slow
def test_second_prepare_is_cached(
    prepared: Prepared, default_pair: ModelPair, record_property: Any
) -> None:
    checksum = prepared.path / "checksum.json"
    before = (prepared.path.stat().st_mtime_ns, checksum.stat().st_mtime_ns)
    started = time.perf_counter()
    path = prepare_cloud_weights(default_pair, home=prepared.home)
    record_property("conversion_s", round(prepared.seconds, 2))
    record_property("cached_call_s", round(time.perf_counter() - started, 4))
    assert path == prepared.path
    assert (prepared.path.stat().st_mtime_ns, checksum.stat().st_mtime_ns) == before
    assert is_prepared(default_pair, home=prepared.home)


@pytest.mark.slow
def test_cached_prepare_does_not_import_torch(prepared: Prepared) -> None:
    code = (
        "import sys\n"
        "from pathlib import Path\n"
        "from models import Catalog, prepare_cloud_weights\n"
        "pair = Catalog.load(Path(sys.argv[1])).default()\n"
        "print(prepare_cloud_weights(pair, home=Path(sys.argv[1])))\n"
        "print(sorted(m for m in ('torch', 'transformers', 'llama_cpp') if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(prepared.home)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).parents[2],
    )
    assert done.stdout.splitlines() == [str(prepared.path), "[]"]


@pytest.mark.slow
def test_greedy_predictions_agree_with_llama_cpp(
    prepared: Prepared, gguf: Path, template: str, record_property: Any
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    sequences = _draft_greedy_sequences(gguf, template)
    target = AutoModelForCausalLM.from_pretrained(str(prepared.path), dtype=torch.float32).eval()
    agree = total = 0
    for n_prompt, sequence in sequences:
        with torch.no_grad():
            logits = target(torch.tensor([sequence])).logits[0]
        # logits[i] predicts token i + 1: compare on the draft-generated part.
        predicted = logits.argmax(-1).numpy()[n_prompt - 1 : -1]
        agree += int((predicted == np.array(sequence[n_prompt:])).sum())
        total += len(sequence) - n_prompt
    record_property("greedy_agreement", f"{agree}/{total}")
    assert total >= len(CONVERSATIONS)
    # FINDINGS measured 98% for this pair; near-ties flip between Q4_1 and fp32.
    assert agree / total >= 0.9


def _draft_greedy_sequences(gguf: Path, template: str) -> list[tuple[int, list[int]]]:
    """Greedy-decode each sample conversation with llama.cpp: (prompt length, ids)."""
    from llama_cpp import Llama

    # All llama.cpp work happens before torch runs: its idle threads spin and
    # slowed the interleaved torch forward passes several times over.
    llama = Llama(
        model_path=str(gguf),
        n_ctx=512,
        logits_all=True,
        n_threads=1,
        n_threads_batch=1,
        verbose=False,
    )
    with contextlib.closing(llama):
        return [_draft_greedy(llama, _prompt_ids(llama, template, case)) for case in CONVERSATIONS]


def _prompt_ids(llama: Any, template: str, case: tuple) -> list[int]:
    _, messages, tools, _ = case
    text = render_chat(template, messages, tools=tools)
    return llama.tokenize(text.encode("utf-8"), add_bos=False, special=True)


def _draft_greedy(llama: Any, prompt: list[int]) -> tuple[int, list[int]]:
    llama.reset()
    llama.eval(prompt)
    sequence = list(prompt)
    for _ in range(GENERATED_TOKENS):
        token = int(np.argmax(llama.scores[llama.n_tokens - 1]))
        sequence.append(token)
        if token == llama.token_eos():
            break
        llama.eval([token])
    return len(prompt), sequence
