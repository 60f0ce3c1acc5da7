"""The learned complexity classifier: would the edge's answer differ from the cloud's?

It runs on the edge, in the request path, with onnxruntime only (no torch):
one session per process, one thread, created at load. `score` returns the
probability that the edge model's greedy answer would NOT equal the cloud
model's (higher = send to the cloud); a policy compares it with a threshold.

Example::

    from router.classifier import ComplexityClassifier

    classifier = ComplexityClassifier.load()  # the model shipped in router/data
    p = classifier.score(prompt_token_ids, has_tools=False, n_messages=1)
    route = "cloud" if p > 0.6 else "edge"

The shipped model was trained for the default pair (SmolLM2-135M Q4_1 edge,
fp32 cloud) by `tandem router train`; its report, with held-out ROC-AUC and
the cost/quality curve, is `router/data/complexity_report.json`. Token ids
must come from the pair's tokenizer; a model for another pair is trained
with `tandem router train --pair <name>`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from router.errors import ClassifierError, ClassifierInputError
from router.features import FEATURE_SPEC_VERSION, structural_features, token_ids_array

MODEL_FILE = "complexity.onnx"
REPORT_FILE = "complexity_report.json"
# Names of the ONNX graph's inputs and output, shared with the exporter.
TOKEN_IDS_INPUT = "token_ids"
STRUCTURAL_INPUT = "structural"
PROBABILITY_OUTPUT = "p_disagree"


@dataclass(frozen=True)
class ClassifierInfo:
    """What a classifier was trained for, read from the ONNX model's metadata."""

    feature_spec_version: int
    vocab_size: int
    pair: str
    seed: int


def shipped_model_path() -> Path:
    """The classifier shipped with Tandem (router/data/complexity.onnx)."""
    return Path(str(resources.files("router") / "data" / MODEL_FILE))


class ComplexityClassifier:
    """An ONNX complexity classifier with its onnxruntime session (load it once)."""

    def __init__(self, session: object, info: ClassifierInfo) -> None:
        self._session = session
        self.info = info

    @classmethod
    def load(cls, path: Path | None = None) -> ComplexityClassifier:
        """Load a classifier (default: the shipped one) into a one-thread session."""
        path = path or shipped_model_path()
        try:
            import onnxruntime
        except ImportError as exc:
            raise ClassifierError(
                "onnxruntime is missing: pip install 'tandem-mesh[edge]'"
            ) from exc
        options = onnxruntime.SessionOptions()
        # The edge serves requests on its other threads: scoring takes one, briefly.
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
        try:
            session = onnxruntime.InferenceSession(
                str(path), options, providers=["CPUExecutionProvider"]
            )
        except Exception as exc:  # onnxruntime raises its own untyped errors
            raise ClassifierError(f"cannot load the classifier {path}: {exc}") from exc
        return cls(session, _read_info(session, path))

    def score(
        self, prompt_token_ids: Sequence[int] | np.ndarray, *, has_tools: bool, n_messages: int
    ) -> float:
        """Probability in [0, 1] that the edge's answer would differ from the cloud's."""
        ids = token_ids_array(prompt_token_ids)
        if ids.size == 0:
            raise ClassifierInputError("the prompt has no tokens")
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.info.vocab_size:
            bad = low if low < 0 else high
            raise ClassifierInputError(
                f"token id {bad} is outside the classifier's vocabulary "
                f"(0..{self.info.vocab_size - 1}); was it trained for this model?"
            )
        structural = structural_features(ids, has_tools=has_tools, n_messages=n_messages)
        (p,) = self._session.run(  # type: ignore[attr-defined]
            [PROBABILITY_OUTPUT], {TOKEN_IDS_INPUT: ids, STRUCTURAL_INPUT: structural}
        )
        return float(p.reshape(-1)[0])


def _read_info(session: object, path: Path) -> ClassifierInfo:
    meta = session.get_modelmeta().custom_metadata_map  # type: ignore[attr-defined]
    try:
        info = ClassifierInfo(
            feature_spec_version=int(meta["feature_spec_version"]),
            vocab_size=int(meta["vocab_size"]),
            pair=meta["pair"],
            seed=int(meta["seed"]),
        )
    except (KeyError, ValueError) as exc:
        raise ClassifierError(f"{path} is not a Tandem complexity classifier ({exc})") from exc
    if info.feature_spec_version != FEATURE_SPEC_VERSION:
        raise ClassifierError(
            f"{path} was trained on feature spec v{info.feature_spec_version}, this Tandem "
            f"computes v{FEATURE_SPEC_VERSION}: retrain it with `tandem router train`"
        )
    return info
