"""The real tokenizer and a deterministic filler answer, for the simulated engines.

A simulated engine has no weights to run, but its prompts should cost what real
prompts cost (token counts, prefix-cache hits) and its answers should be real
token ids that detokenize. So it loads only the vocabulary of the pair's GGUF
(llama.cpp's vocab-only load: no weights, no KV, a few MB) and answers with
``FILLER_TEXT``'s tokens, cycled: text that says it is simulated.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from models.errors import MissingDependencyError
from models.token_cache import CachedTokenizer, cached_llama_tokenizer
from models.vocab import llama_token_bytes

FILLER_TEXT = (
    " This answer was produced by Tandem's simulated engine; no model ran, only a"
    " latency model calibrated on the real engines."
)


class SimVocab:
    """A vocab-only llama.cpp model: tokenize, detokenize, and the filler tokens."""

    def __init__(self, gguf: Path) -> None:
        self._llama = _load_vocab_only(gguf)
        self.token_bytes: Callable[[int], bytes] = llama_token_bytes(self._llama)
        self._tokenize_cached = cached_llama_tokenizer(self._llama)
        self.filler = self.tokenize(FILLER_TEXT)

    @property
    def n_vocab(self) -> int:
        """Vocabulary size."""
        return int(self._llama.n_vocab())

    @property
    def token_cache(self) -> CachedTokenizer:
        """The prompt-piece cache ``tokenize`` goes through (hits, misses, size)."""
        return self._tokenize_cached

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` (ChatML markers parsed as special tokens, no BOS)."""
        return self._tokenize_cached(text)

    def filler_token(self, index: int) -> int:
        """The ``index``-th token of the simulated answer (the filler, repeated)."""
        return self.filler[index % len(self.filler)]

    def close(self) -> None:
        """Free the vocabulary."""
        self._llama.close()


def _load_vocab_only(gguf: Path) -> Any:
    try:
        from llama_cpp import Llama
    except ImportError as exc:
        raise MissingDependencyError(
            "the simulated engine's tokenizer", ["llama-cpp-python"], extra="edge"
        ) from exc
    return Llama(model_path=str(gguf), vocab_only=True, verbose=False)
