"""The complexity classifier's inputs, computed the same way at training and on the edge.

Two kinds of feature, both from what the edge already has when it routes:

- **The edge model's own token embeddings, mean-pooled over the prompt.** The
  pooling runs inside the ONNX model: it holds the edge model's input
  embedding table (`token_embd`), projected at training time to a few
  principal components of pooled prompts and stored as float16, and takes the
  prompt's token ids. Pooling is linear, so projecting the table first gives
  exactly the projection of the pooled 576-wide vector, at 1/18 of the size.
  A full llama.cpp forward pass would give richer embeddings but costs tens
  of milliseconds per prompt on a CPU edge; the routing budget is 1 ms.
- **Structural features**, below: cheap numbers about the request's shape.

Bump `FEATURE_SPEC_VERSION` whenever either changes; a model trained on
another version refuses to load.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

FEATURE_SPEC_VERSION = 1
STRUCTURAL_FEATURES = (
    "log_prompt_tokens",  # longer prompts leave more room for the models to part
    "has_tools",  # a tool-calling turn: the edge model often emits malformed calls
    "log_messages",  # later turns of a conversation
    "distinct_token_share",  # repetitive prompts (tables, lists) vs varied prose
)


def token_ids_array(prompt_token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """The prompt's token ids as the int64 vector the ONNX model takes."""
    return np.asarray(prompt_token_ids, dtype=np.int64).reshape(-1)


def structural_features(token_ids: np.ndarray, *, has_tools: bool, n_messages: int) -> np.ndarray:
    """The structural feature vector (float32, in `STRUCTURAL_FEATURES` order)."""
    n = len(token_ids)
    distinct = len(np.unique(token_ids)) / n if n else 0.0
    return np.array(
        [math.log1p(n), float(has_tools), math.log1p(n_messages), distinct], dtype=np.float32
    )
