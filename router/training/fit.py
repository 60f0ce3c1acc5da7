"""Fit the complexity classifier with torch and export it to ONNX.

The model (`ComplexityNet`) is what the edge runs, end to end:

    token ids -> rows of the projected embedding table (float16) -> mean -> |
    structural features -> standardized ------------------------------------+-> MLP -> sigmoid

The table is the edge model's input embedding matrix, centred and projected on
the top principal components of pooled *training* prompts, each scaled to unit
variance. Pooled features for fitting are computed by the same module that is
exported, so training and serving see the same numbers.

Splits are by a hash of the prompt id and the seed, so a prompt stays in its
split as the label set grows. Hyperparameters are chosen on the validation
split from a small grid; the chosen configuration is refitted on train +
validation and evaluated once on the held-out test split.
"""

from __future__ import annotations

import hashlib
import itertools
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from router.classifier import PROBABILITY_OUTPUT, STRUCTURAL_INPUT, TOKEN_IDS_INPUT
from router.features import FEATURE_SPEC_VERSION, STRUCTURAL_FEATURES, structural_features
from router.training.evaluation import roc_auc
from router.training.labels import Label

Split = Literal["train", "val", "test"]


@dataclass(frozen=True)
class FitSettings:
    """Everything that decides the fitted model besides the labels."""

    seed: int = 0
    test_share: float = 0.25
    val_share: float = 0.2
    epochs: int = 300
    learning_rate: float = 0.01
    # The validation grid. pca_dims: width of the pooled embedding (0: structural only).
    pca_dims: tuple[int, ...] = (8, 16, 32)
    hidden_sizes: tuple[int, ...] = (0, 16)  # 0: logistic regression
    weight_decays: tuple[float, ...] = (1e-2, 1e-1)


@dataclass(frozen=True)
class Candidate:
    """One hyperparameter configuration and its validation ROC-AUC."""

    pca_dims: int
    hidden: int
    weight_decay: float
    val_auc: float


def split_of(label_id: str, settings: FitSettings) -> Split:
    """The split of a prompt: a hash of its id and the seed, stable as data grows."""
    digest = hashlib.sha256(f"{settings.seed}:{label_id}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < settings.test_share:
        return "test"
    return "val" if u < settings.test_share + settings.val_share else "train"


def embedding_table(hf_dir: Path) -> np.ndarray:
    """The model's input token embeddings (vocab x hidden, float32) from safetensors."""
    from safetensors import safe_open

    with safe_open(str(hf_dir / "model.safetensors"), "np") as weights:
        return np.asarray(weights.get_tensor("model.embed_tokens.weight"), dtype=np.float32)


def project_table(table: np.ndarray, labels: Sequence[Label], dims: int) -> np.ndarray:
    """The table centred and projected on the pooled prompts' principal components (float16)."""
    pooled = np.stack([table[label.prompt_token_ids].mean(axis=0) for label in labels])
    mean = pooled.mean(axis=0)
    _, _, components = np.linalg.svd(pooled - mean, full_matrices=False)
    basis = components[:dims].T  # hidden x dims
    scale = ((pooled - mean) @ basis).std(axis=0) + 1e-6
    projected = ((table - mean) @ basis) / scale
    # float16 halves the shipped file; pooled features move by < 1e-3 of their scale.
    # Rows of tokens no training prompt used can land far out on a weak component:
    # clip them into float16's range rather than let them become inf.
    limit = float(np.finfo(np.float16).max) / 2
    return np.clip(projected, -limit, limit).astype(np.float16)


def structural_matrix(labels: Sequence[Label]) -> np.ndarray:
    """Structural features of each label's prompt, as the edge computes them."""
    return np.stack(
        [
            structural_features(
                np.asarray(label.prompt_token_ids),
                has_tools=label.has_tools,
                n_messages=label.n_messages,
            )
            for label in labels
        ]
    )


def build_net(projected: np.ndarray, structural: np.ndarray, hidden: int) -> Any:
    """A ComplexityNet around `projected`, standardizing structural features as in `structural`."""
    import torch

    class ComplexityNet(torch.nn.Module):
        """Pooled projected embeddings + standardized structural features -> P(disagree)."""

        table: torch.Tensor
        struct_mean: torch.Tensor
        struct_std: torch.Tensor

        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("table", torch.from_numpy(projected))
            mean, std = structural.mean(axis=0), structural.std(axis=0) + 1e-6
            self.register_buffer("struct_mean", torch.from_numpy(mean.astype(np.float32)))
            self.register_buffer("struct_std", torch.from_numpy(std.astype(np.float32)))
            width = projected.shape[1] + structural.shape[1]
            if hidden:
                self.head: torch.nn.Module = torch.nn.Sequential(
                    torch.nn.Linear(width, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1)
                )
            else:
                self.head = torch.nn.Linear(width, 1)

        def features(self, token_ids: torch.Tensor, structural: torch.Tensor) -> torch.Tensor:
            pooled = self.table[token_ids].float().mean(dim=0)
            return torch.cat([pooled, (structural - self.struct_mean) / self.struct_std])

        def forward(self, token_ids: torch.Tensor, structural: torch.Tensor) -> torch.Tensor:
            return torch.sigmoid(self.head(self.features(token_ids, structural)))

    return ComplexityNet()


def fit(
    labels: Sequence[Label],
    table: np.ndarray,
    settings: FitSettings,
    *,
    pca_dims: int,
    hidden: int,
    weight_decay: float,
) -> Any:
    """Fit a ComplexityNet on `labels` (full-batch Adam, seeded, one thread)."""
    import torch

    torch.manual_seed(settings.seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    structural = structural_matrix(labels)
    net = build_net(project_table(table, labels, pca_dims), structural, hidden)
    x = feature_matrix(net, labels, structural)
    y = torch.tensor([0.0 if label.agrees else 1.0 for label in labels])
    optimizer = torch.optim.Adam(
        net.head.parameters(), lr=settings.learning_rate, weight_decay=weight_decay
    )
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for _ in range(settings.epochs):
        optimizer.zero_grad()
        loss = loss_fn(net.head(x)[:, 0], y)
        loss.backward()
        optimizer.step()
    net.eval()
    return net


def feature_matrix(net: Any, labels: Sequence[Label], structural: np.ndarray | None = None) -> Any:
    """The net's input features for each label (the exported module's own pooling)."""
    import torch

    structural = structural_matrix(labels) if structural is None else structural
    with torch.no_grad():
        return torch.stack(
            [
                net.features(torch.tensor(label.prompt_token_ids), torch.from_numpy(row))
                for label, row in zip(labels, structural, strict=True)
            ]
        )


def predict(net: Any, labels: Sequence[Label]) -> np.ndarray:
    """P(disagree) for each label, with torch (the reference the ONNX export must match)."""
    import torch

    with torch.no_grad():
        return torch.sigmoid(net.head(feature_matrix(net, labels)))[:, 0].numpy()


def select(
    train: Sequence[Label], val: Sequence[Label], table: np.ndarray, settings: FitSettings
) -> list[Candidate]:
    """Every grid configuration fitted on `train`, scored on `val`, best first."""
    disagrees = [not label.agrees for label in val]
    candidates = []
    for dims, hidden, decay in itertools.product(
        settings.pca_dims, settings.hidden_sizes, settings.weight_decays
    ):
        net = fit(train, table, settings, pca_dims=dims, hidden=hidden, weight_decay=decay)
        candidates.append(Candidate(dims, hidden, decay, roc_auc(disagrees, predict(net, val))))
    # Ties go to the simpler model: fewer dimensions, no hidden layer, more decay.
    return sorted(candidates, key=lambda c: (-c.val_auc, c.pca_dims, c.hidden, -c.weight_decay))


def export_onnx(net: Any, path: Path, metadata: dict[str, str]) -> None:
    """Write `net` as ONNX (variable prompt length) with `metadata` in the model's properties."""
    import onnx
    import torch

    ids = torch.tensor([1, 2, 3], dtype=torch.int64)
    structural = torch.zeros(len(STRUCTURAL_FEATURES), dtype=torch.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        # torch.export warns about its own internals' deprecations; nothing of ours.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            net,
            (ids, structural),
            str(path),
            input_names=[TOKEN_IDS_INPUT, STRUCTURAL_INPUT],
            output_names=[PROBABILITY_OUTPUT],
            dynamic_shapes=({0: torch.export.Dim("prompt_tokens", min=1)}, None),
            dynamo=True,
            external_data=False,  # one file: the 3 MB table stays inside the model
            verbose=False,
        )
    model = onnx.load(str(path))
    for key, value in {"feature_spec_version": str(FEATURE_SPEC_VERSION), **metadata}.items():
        entry = model.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
