"""The prompt token ids an edge sends with a generate request, reused when they check out.

An edge tokenizes every prompt to route it, with the pair's tokenizer and template;
the worker would render and tokenize the same conversation again (issue 19: 14% of
a worker's CPU in the scale run's profile, and vLLM's HF tokenizer has no cache).
So the edge sends its ids (``mesh.protocol.RenderedPrompt``) and the worker, which
renders the text anyway (the template is cheap, and it must know what it serves),
takes them when:

- its own text hashes to the edge's ``text_sha256`` (same template, same messages);
- every id is inside its vocabulary;
- and, for the first ``verify_requests`` requests and one in ``sample_every`` after,
  its own tokenizing of the text gives the same ids. The catalog says a pair shares
  one tokenizer; this checks it, as ``models.token_cache`` checks its own shortcut.
  A mismatch turns reuse off for good and logs why; the ids served are the worker's.

An edge that sends wrong ids can at worst turn reuse off (the answer served is
always the worker's own tokenizing of the text it rendered, or ids that matched it).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from mesh.protocol import RenderedPrompt

logger = logging.getLogger(__name__)

DEFAULT_VERIFY_REQUESTS = 64
DEFAULT_SAMPLE_EVERY = 64


class PromptReuse:
    """``token_ids(text, sent)``: the edge's ids when they check out, else the worker's.

    ``vocab_size`` is read per request (an engine knows it once it has loaded)."""

    def __init__(
        self,
        tokenize: Callable[[str], list[int]],
        vocab_size: Callable[[], int],
        *,
        verify_requests: int = DEFAULT_VERIFY_REQUESTS,
        sample_every: int = DEFAULT_SAMPLE_EVERY,
    ) -> None:
        self._tokenize = tokenize
        self._vocab_size = vocab_size
        self._verify_left = verify_requests
        self._sample_every = max(1, sample_every)
        self._checked = 0
        self.enabled = True
        self.reused = 0  # requests whose ids came from the edge
        self.tokenized = 0  # requests that came without ids (or after reuse turned off)
        self.refused = 0  # ids sent but not used (digest, range or a verify mismatch)

    def token_ids(self, text: str, sent: RenderedPrompt | None) -> list[int]:
        """Prompt token ids for ``text``, the rendered prompt of this request."""
        if sent is None or not self.enabled:
            return self._tokenized(text)
        if RenderedPrompt.digest(text) != sent.text_sha256:
            # A different template or messages than the edge rendered: not an error.
            logger.debug("prompt rendered differently from the edge's; tokenizing it")
            return self._refused(text)
        ids = sent.token_ids
        if min(ids) < 0 or max(ids) >= self._vocab_size():
            logger.warning("an edge sent prompt ids outside the vocabulary; tokenizing")
            return self._refused(text)
        self._checked += 1
        if self._verify_left > 0 or self._checked % self._sample_every == 0:
            self._verify_left = max(0, self._verify_left - 1)
            own = self._tokenize(text)
            if own != ids:
                self._disable(own, ids)
                self.refused += 1
                return own
        self.reused += 1
        return ids

    def _tokenized(self, text: str) -> list[int]:
        self.tokenized += 1
        return self._tokenize(text)

    def _refused(self, text: str) -> list[int]:
        self.refused += 1
        return self._tokenize(text)

    def _disable(self, own: list[int], sent: list[int]) -> None:
        pairs = enumerate(zip(own, sent, strict=False))
        at = next((i for i, (a, b) in pairs if a != b), min(len(own), len(sent)))
        logger.warning(
            "an edge's prompt token ids differ from this worker's tokenizing of the same "
            "text (first difference at token %d of %d): the edge and cloud models do not "
            "share a tokenizer, as the catalog pair says they do; edge ids are not reused",
            at,
            len(own),
        )
        self.enabled = False
