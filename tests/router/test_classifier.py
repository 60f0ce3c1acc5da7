"""The learned complexity classifier: shipped model, ONNX export, labels, evaluation, CLI.

Real components throughout: the shipped ONNX model in onnxruntime, llama.cpp's
tokenizer on the bundled GGUF, the converted fp32 cloud weights in transformers.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from models import BUILTIN_PAIRS, Catalog, ModelPair, edge_gguf_path, load_template, render_chat
from models import prepare_cloud_weights as prepare
from router.classifier import (
    REPORT_FILE,
    ClassifierError,
    ClassifierInputError,
    ComplexityClassifier,
    shipped_model_path,
)
from router.features import FEATURE_SPEC_VERSION, STRUCTURAL_FEATURES
from router.training.evaluation import (
    Example,
    classifier_curve,
    roc_auc,
    rules_frontier,
    savings_at,
    short_first_curve,
)
from router.training.prompts import bfcl_prompts, mtbench_prompts
from tandem.cli import app

SHIPPED_REPORT = shipped_model_path().parent / REPORT_FILE


@pytest.fixture(scope="module")
def pair() -> ModelPair:
    """The default model pair, the one the shipped classifier was trained for."""
    return Catalog(list(BUILTIN_PAIRS)).default()


@pytest.fixture(scope="module")
def vocab(pair: ModelPair) -> Iterator[Any]:
    """llama.cpp with the bundled GGUF's vocabulary only (the edge's tokenizer)."""
    from llama_cpp import Llama

    llama = Llama(model_path=str(edge_gguf_path(pair)), vocab_only=True, verbose=False)
    yield llama
    llama.close()


def tokens(
    vocab: Any, pair: ModelPair, messages: list[dict[str, Any]], tools: Any = None
) -> list[int]:
    """Prompt token ids as the edge builds them."""
    text = render_chat(load_template(pair.chat_template), messages, tools=tools)
    return list(vocab.tokenize(text.encode("utf-8"), add_bos=False, special=True))


@pytest.fixture(scope="module")
def real_prompts(vocab: Any, pair: ModelPair) -> list[tuple[list[int], bool, int]]:
    """(token ids, has_tools, n_messages) of real MT-Bench and BFCL prompts."""
    chats = [p for p in mtbench_prompts() if not p.needs_first_answer][:6]
    chats += bfcl_prompts()[:4]
    return [
        (tokens(vocab, pair, p.messages, p.tools), bool(p.tools), len(p.messages)) for p in chats
    ]


# -- the shipped model ---------------------------------------------------------------


def test_shipped_classifier_scores_deterministically(real_prompts: list[Any]) -> None:
    first, second = ComplexityClassifier.load(), ComplexityClassifier.load()
    scores = [first.score(ids, has_tools=t, n_messages=n) for ids, t, n in real_prompts]
    again = [first.score(ids, has_tools=t, n_messages=n) for ids, t, n in real_prompts]
    other_session = [second.score(ids, has_tools=t, n_messages=n) for ids, t, n in real_prompts]
    assert scores == again == other_session  # bit for bit, not approximately
    assert all(0.0 <= s <= 1.0 for s in scores)
    assert len(set(scores)) > len(scores) // 2, "the model ignores its input"


def test_shipped_classifier_reads_token_ids_as_a_list_or_an_array(real_prompts: list[Any]) -> None:
    classifier = ComplexityClassifier.load()
    ids, has_tools, n = real_prompts[0]
    as_list = classifier.score(ids, has_tools=has_tools, n_messages=n)
    as_array = classifier.score(np.array(ids, dtype=np.int32), has_tools=has_tools, n_messages=n)
    assert as_list == as_array
    # The structural inputs are used: the same tokens as a later turn score differently.
    assert classifier.score(ids, has_tools=has_tools, n_messages=n + 6) != as_list


def test_shipped_report_describes_the_shipped_model() -> None:
    report = json.loads(SHIPPED_REPORT.read_text(encoding="utf-8"))
    model = shipped_model_path()
    info = ComplexityClassifier.load().info
    assert report["model"]["sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert report["feature_spec_version"] == info.feature_spec_version == FEATURE_SPEC_VERSION
    assert report["structural_features"] == list(STRUCTURAL_FEATURES)
    assert (report["pair"], report["seed"]) == (info.pair, info.seed)
    held = report["held_out"]
    assert held["n"] == report["data"]["splits"]["test"] > 0
    # How good it is, is the report's to say (held-out ROC-AUC); here: that it is stated.
    assert 0.0 <= held["roc_auc"] <= 1.0
    assert 0.0 <= held["roc_auc_structural_only"] <= 1.0
    assert report["model"]["bytes"] < 8 * 2**20


def test_out_of_vocabulary_and_empty_prompts_are_refused(real_prompts: list[Any]) -> None:
    classifier = ComplexityClassifier.load()
    ids = real_prompts[0][0]
    with pytest.raises(ClassifierInputError, match="outside the classifier's vocabulary"):
        classifier.score([*ids, classifier.info.vocab_size], has_tools=False, n_messages=1)
    with pytest.raises(ClassifierInputError, match="outside"):
        classifier.score([-1, *ids], has_tools=False, n_messages=1)
    with pytest.raises(ClassifierInputError, match="no tokens"):
        classifier.score([], has_tools=False, n_messages=1)
    # A refused request leaves the classifier usable.
    assert 0.0 <= classifier.score(ids, has_tools=False, n_messages=1) <= 1.0


def test_a_model_of_another_feature_version_refuses_to_load(tmp_path: Path) -> None:
    import onnx

    model = onnx.load(str(shipped_model_path()))
    for prop in model.metadata_props:
        if prop.key == "feature_spec_version":
            prop.value = str(FEATURE_SPEC_VERSION + 1)
    onnx.save(model, str(tmp_path / "old.onnx"))
    with pytest.raises(ClassifierError, match="retrain"):
        ComplexityClassifier.load(tmp_path / "old.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a model")
    with pytest.raises(ClassifierError, match="cannot load"):
        ComplexityClassifier.load(tmp_path / "junk.onnx")


# -- training: labels and export ------------------------------------------------------


@pytest.fixture(scope="module")
def hf_dir(pair: ModelPair) -> Path:
    """The converted fp32 cloud weights of the default pair."""
    return prepare(pair)


@pytest.mark.slow
def test_teacher_forced_labels_match_real_greedy_decoding(
    vocab: Any, pair: ModelPair, hf_dir: Path
) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from router.training.labels import CloudJudge

    prompt = tokens(vocab, pair, [{"role": "user", "content": "Name three primary colors."}])
    model: Any = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32)
    out = model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, pad_token_id=0)
    greedy = out[0, len(prompt) :].tolist()
    judge = CloudJudge(hf_dir)
    assert judge.compare(prompt, greedy) == (len(greedy), 0)
    # Replace a token with one the cloud ranks far below: the answers part exactly there.
    wrong = list(greedy)
    wrong[5] = vocab.tokenize(b" zebra", add_bos=False)[0]
    prefix, mismatches = judge.compare(prompt, wrong)
    assert prefix == 5
    assert mismatches >= 1


@pytest.mark.slow
def test_exported_onnx_scores_like_the_torch_model(
    tmp_path: Path, real_prompts: list[Any], hf_dir: Path
) -> None:
    from router.training.fit import FitSettings, embedding_table, export_onnx, fit, predict
    from router.training.labels import Label

    rng = random.Random(7)
    labels = [
        Label(
            id=f"p{i}",
            source="test",
            prompt_sha256="",
            prompt_token_ids=ids,
            has_tools=t,
            n_messages=n,
            answer_tokens=8,
            matched_prefix=8,
            strict_mismatches=0,
            agrees=rng.random() < 0.5,
        )
        for i, (ids, t, n) in enumerate(real_prompts)
    ]
    settings = FitSettings(seed=3, epochs=40)
    table = embedding_table(hf_dir)
    net = fit(labels, table, settings, pca_dims=4, hidden=8, weight_decay=1e-2)
    path = tmp_path / "complexity.onnx"
    export_onnx(net, path, {"vocab_size": "49152", "pair": "test", "seed": "3"})
    classifier = ComplexityClassifier.load(path)
    onnx_scores = [
        classifier.score(lb.prompt_token_ids, has_tools=lb.has_tools, n_messages=lb.n_messages)
        for lb in labels
    ]
    np.testing.assert_allclose(onnx_scores, predict(net, labels), atol=1e-5)
    assert classifier.info.seed == 3
    # Same seed, same data: the same model, byte for byte.
    again = tmp_path / "again.onnx"
    export_onnx(
        fit(labels, table, settings, pca_dims=4, hidden=8, weight_decay=1e-2),
        again,
        {"vocab_size": "49152", "pair": "test", "seed": "3"},
    )
    assert path.read_bytes() == again.read_bytes()


# -- evaluation maths --------------------------------------------------------------------


def test_roc_auc_equals_the_pairwise_definition() -> None:
    rng = np.random.default_rng(0)
    y = rng.random(60) < 0.4
    s = np.round(rng.random(60) + 0.3 * y, 1)  # rounded: ties exercised
    pairs = list(itertools.product(s[y], s[~y]))
    expected = sum(1.0 if a > b else 0.5 if a == b else 0.0 for a, b in pairs) / len(pairs)
    assert roc_auc(y, s) == pytest.approx(expected)
    assert roc_auc([True, False], [0.9, 0.1]) == 1.0


def test_cost_quality_curves_run_from_all_edge_to_all_cloud() -> None:
    rng = random.Random(1)
    examples = [
        Example(rng.random() < 0.4, rng.randint(20, 900), rng.randint(10, 800), rng.random() < 0.2)
        for _ in range(50)
    ]
    base = 1 - sum(e.disagrees for e in examples) / len(examples)
    perfect = classifier_curve(examples, [float(e.disagrees) for e in examples])
    assert (perfect[0].cloud_token_share, perfect[0].agreement) == (0.0, pytest.approx(base))
    assert (perfect[-1].cloud_token_share, perfect[-1].agreement) == (1.0, 1.0)
    rules = rules_frontier(examples)
    assert max(p.agreement for p in rules) == 1.0
    short = short_first_curve(examples)
    assert (short[0].cloud_request_share, short[-1].cloud_request_share) == (0.0, 1.0)
    assert [p.cloud_token_share for p in short] == sorted(p.cloud_token_share for p in short)
    # A perfect classifier reaches full agreement sending only the disagreeing requests.
    saved = savings_at(perfect, rules, 1.0)
    assert saved is not None
    wrong_tokens = sum(e.cloud_tokens for e in examples if e.disagrees)
    total = sum(e.cloud_tokens for e in examples)
    assert saved.classifier.cloud_token_share == pytest.approx(wrong_tokens / total)
    assert saved.saved_share > 0


# -- CLI --------------------------------------------------------------------------------------


def test_router_score_prints_the_classifiers_probability(
    tmp_path: Path, vocab: Any, pair: ModelPair
) -> None:
    messages = [{"role": "user", "content": "Write a haiku about routers."}]
    request = tmp_path / "request.json"
    request.write_text(json.dumps({"model": "m", "messages": messages}), encoding="utf-8")
    result = CliRunner().invoke(app, ["router", "score", str(request)])
    assert result.exit_code == 0, result.output
    expected = ComplexityClassifier.load().score(
        tokens(vocab, pair, messages), has_tools=False, n_messages=1
    )
    # The last line is ours (llama.cpp may log above it).
    assert result.output.splitlines()[-1].startswith(f"{expected:.4f}  (")


@pytest.mark.parametrize(
    ("body", "message"),
    [("{not json", "invalid JSON"), ('{"model": "m"}', "not a chat completion request")],
)
def test_router_score_rejects_bad_requests_in_one_line(
    tmp_path: Path, body: str, message: str
) -> None:
    request = tmp_path / "request.json"
    request.write_text(body, encoding="utf-8")
    result = CliRunner().invoke(app, ["router", "score", str(request)])
    assert result.exit_code == 1
    assert message in result.output
    assert "Traceback" not in result.output
