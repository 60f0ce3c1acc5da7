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

from models.vocab import llama_token_bytes, llama_tokenizer

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
        # Longest first, so a special token that contains another is cut whole.
        specials = sorted({s for s in special_tokens if s}, key=len, reverse=True)
        self._split = (
            re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None
        )
        # Special token -> its id, and one of them to join the unseen pieces of a prompt
        # with: a single tokenizer call then covers them all (a call has a fixed cost of
        # tens of microseconds, more than a short piece's own work).
        self._special_ids: dict[str, int] = {}
        for text in specials:
            ids = tokenize(text)
            if len(ids) == 1:
                self._special_ids[text] = ids[0]
        self._joiner = next(iter(self._special_ids), None)
        self._max_cached_tokens = max_cached_tokens
        self._verify_left = verify_calls
        self._pieces: OrderedDict[str, array] = OrderedDict()
        self._cached_tokens = 0
        self._lock = threading.Lock()  # the edge tokenizes from a thread pool
        self.enabled = self._split is not None
        self.hits = 0
        self.misses = 0

    @property
    def cached_tokens(self) -> int:
        """Token ids held in the cache now."""
        return self._cached_tokens

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
        pieces = [p for p in self._split.split(text) if p]
        found: dict[str, array | int] = {}  # a special token's id, or a piece's ids
        unseen: dict[str, None] = {}  # in order, once each (a piece may come twice)
        with self._lock:
            for piece in pieces:
                special = self._special_ids.get(piece)
                if special is not None:
                    found[piece] = special
                    continue
                cached = self._pieces.get(piece)
                if cached is not None:
                    self._pieces.move_to_end(piece)
                    found[piece] = cached
                    self.hits += 1
                else:
                    unseen[piece] = None
            self.misses += len(unseen)
        if unseen:
            fresh = dict(zip(unseen, self._tokenize_unseen(list(unseen)), strict=True))
            found.update(fresh)
            self._remember(fresh)
        out: list[int] = []
        for piece in pieces:
            ids = found[piece]
            if isinstance(ids, int):
                out.append(ids)
            else:
                out.extend(ids)
        return out

    def _tokenize_unseen(self, unseen: list[str]) -> list[array]:
        """Each piece's ids, from one tokenizer call when a joiner token is known."""
        if self._joiner is None or len(unseen) == 1:
            return [array("i", self._tokenize(piece)) for piece in unseen]
        joiner_id = self._special_ids[self._joiner]
        ids = self._tokenize(self._joiner.join(unseen))
        out: list[array] = []
        start = 0
        for i, token in enumerate(ids):
            if token == joiner_id:
                out.append(array("i", ids[start:i]))
                start = i + 1
        out.append(array("i", ids[start:]))
        if len(out) != len(unseen):  # cannot happen when the cut is exact; verify catches it
            return [array("i", self._tokenize(piece)) for piece in unseen]
        return out

    def _remember(self, fresh: dict[str, array]) -> None:
        with self._lock:
            for piece, ids in fresh.items():
                if piece in self._pieces or len(ids) > self._max_cached_tokens:
                    continue
                self._pieces[piece] = ids
                self._cached_tokens += len(ids)
            while self._cached_tokens > self._max_cached_tokens:
                _, old = self._pieces.popitem(last=False)
                self._cached_tokens -= len(old)

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


def cached_llama_tokenizer(llama: Any) -> CachedTokenizer:
    """The piece-caching tokenizer of a (vocab-only) llama.cpp model."""
    return CachedTokenizer(llama_tokenizer(llama), llama_special_token_texts(llama))
