"""Tokenize a chat prompt piece by piece, caching the pieces.

An agent resends its whole conversation on every call, so the edge (and the
simulated cloud worker) would tokenize the same system prompt, tool list and old
turns again and again: at a few thousand tokens a call that was the largest
single CPU cost per call in the scale run. llama.cpp's tokenizer first cuts the
text at special tokens (``<|im_start|>``, ``<|im_end|>``, ...) and then tokenizes
each piece between them on its own, so tokenizing piece by piece and joining the
ids gives the same ids as one call on the whole text; a piece seen before (one
message of the history) comes from the cache.

That equivalence is a property of llama.cpp's tokenizer, so it is not taken on
faith: the first ``verify_calls`` calls also tokenize the whole text and compare.
A mismatch (a model whose special tokens strip the whitespace around them, say)
turns the cache off for good and logs why; the answer returned is always the
whole-text one.
"""

from __future__ import annotations

import logging
import re
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_MAX_CACHED_TOKENS = 2_000_000  # ids are kept as 4-byte ints: ~8 MB
DEFAULT_VERIFY_CALLS = 64


class CachedTokenizer:
    """``tokenize(text)`` equal to the wrapped one, faster on text it has seen in parts."""

    def __init__(
        self,
        tokenize: Callable[[str], list[int]],
        special_tokens: Iterable[str],
        *,
        max_cached_tokens: int = DEFAULT_MAX_CACHED_TOKENS,
        verify_calls: int = DEFAULT_VERIFY_CALLS,
    ) -> None:
        self._tokenize = tokenize
        specials = sorted({s for s in special_tokens if s}, key=len, reverse=True)
        # Longest first, so a special token that contains another is cut whole.
        self._split = (
            re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None
        )
        self._max_cached_tokens = max_cached_tokens
        self._verify_left = verify_calls
        self._pieces: OrderedDict[str, array] = OrderedDict()
        self._cached_tokens = 0
        self._lock = threading.Lock()  # the edge tokenizes from a thread pool
        self.enabled = self._split is not None
        self.hits = 0
        self.misses = 0

    def __call__(self, text: str) -> list[int]:
        """Token ids of ``text``."""
        if not self.enabled:
            return self._tokenize(text)
        ids = self._by_pieces(text)
        if self._verify_left > 0:
            self._verify_left -= 1
            whole = self._tokenize(text)
            if whole != ids:
                self._disable(text, whole, ids)
                return whole
        return ids

    def _by_pieces(self, text: str) -> list[int]:
        assert self._split is not None
        ids: list[int] = []
        for piece in self._split.split(text):
            if piece:
                ids.extend(self._piece(piece))
        return ids

    def _piece(self, piece: str) -> array:
        with self._lock:
            found = self._pieces.get(piece)
            if found is not None:
                self._pieces.move_to_end(piece)
                self.hits += 1
                return found
        ids = array("i", self._tokenize(piece))
        with self._lock:
            self.misses += 1
            if piece not in self._pieces and len(ids) <= self._max_cached_tokens:
                self._pieces[piece] = ids
                self._cached_tokens += len(ids)
                while self._cached_tokens > self._max_cached_tokens:
                    _, old = self._pieces.popitem(last=False)
                    self._cached_tokens -= len(old)
        return ids

    def _disable(self, text: str, whole: list[int], ids: list[int]) -> None:
        pairs = enumerate(zip(whole, ids, strict=False))
        at = next((i for i, (a, b) in pairs if a != b), min(len(whole), len(ids)))
        logger.warning(
            "this tokenizer does not tokenize piece by piece between special tokens "
            "(first difference at token %d of %d, in %r); prompt tokenization is not cached",
            at,
            len(whole),
            text[:80],
        )
        with self._lock:
            self.enabled = False
            self._pieces.clear()
            self._cached_tokens = 0


def llama_special_token_texts(llama: Any) -> list[str]:
    """The texts of a llama.cpp model's special tokens that are safe to cut at.

    Control and user-defined tokens are the ones llama.cpp cuts out before
    tokenizing; those that strip the whitespace beside them (``lstrip``/``rstrip``)
    are left inside their piece, where llama.cpp still handles them.
    """
    import llama_cpp

    from models.vocab import llama_token_bytes

    vocab = llama_cpp.llama_model_get_vocab(llama.model)
    token_bytes = llama_token_bytes(llama)
    cut = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
    strips = llama_cpp.LLAMA_TOKEN_ATTR_LSTRIP | llama_cpp.LLAMA_TOKEN_ATTR_RSTRIP
    texts = []
    for token_id in range(llama_cpp.llama_vocab_n_tokens(vocab)):
        attr = llama_cpp.llama_vocab_get_attr(vocab, token_id)
        if attr & cut and not attr & strips:
            text = token_bytes(token_id).decode("utf-8", errors="replace")
            if text.strip():
                texts.append(text)
    return texts
