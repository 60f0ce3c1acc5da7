"""The edge's half of speculative decoding: draft greedily on llama.cpp, let the cloud verify.

Runs in an engine slot's thread (it owns the llama.cpp context):

1. bring the KV cache to the prompt (reusing the longest cached prefix);
2. draft up to ``k`` tokens greedily, evaluating each so the next can be drafted;
3. send context + drafts to a cloud worker (``verify``), which keeps the drafts
   its target model agrees with and adds its own next token;
4. roll the KV cache back to the accepted drafts (llama.cpp drops the rest) and
   evaluate the target's token, so the next draft continues from the target's
   sequence. The output is therefore the cloud model's greedy output.

The draft length adapts: it grows while whole drafts are accepted and shrinks
to just past the accepted run when they are not, between ``min_k`` and ``max_k``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from edge.sessions import common_prefix_len

# context token ids, draft token ids -> (accepted drafts, the target's next token, margins)
Verifier = Callable[[list[int], list[int]], tuple[int, int]]


@dataclass
class DraftLength:
    """Adaptive number of tokens to draft per verification round."""

    k: int = 4
    min_k: int = 1
    max_k: int = 16

    def update(self, drafted: int, accepted: int) -> None:
        """All accepted: draft more next time; otherwise aim just past the accepted run."""
        if accepted == drafted:
            self.k = min(self.max_k, self.k + 2)
        else:
            self.k = max(self.min_k, min(self.k, accepted + 1))


def prefill(llama: Any, prompt: list[int]) -> int:
    """Evaluate the prompt, reusing the KV cache's common prefix; returns the tokens reused."""
    keep = min(common_prefix_len(np.asarray(llama._input_ids), prompt), len(prompt) - 1)
    llama.n_tokens = keep  # eval() drops KV past n_tokens before it evaluates
    llama.eval(prompt[keep:])
    return keep


def draft_greedy(llama: Any, k: int, is_eog: Callable[[int], bool]) -> list[int]:
    """Up to ``k`` argmax tokens from the current logits on; stops after an end token."""
    import llama_cpp

    n_vocab = llama.n_vocab()
    draft: list[int] = []
    for _ in range(k):
        logits = np.ctypeslib.as_array(
            llama_cpp.llama_get_logits_ith(llama._ctx.ctx, -1), shape=(n_vocab,)
        )
        token = int(logits.argmax())
        draft.append(token)
        if is_eog(token):
            break  # nothing follows an end token; it is not evaluated
        llama.eval([token])
    return draft


def rollback(llama: Any, context_len: int, accepted: int) -> None:
    """Keep the KV of the context and the accepted drafts; the next eval overwrites the rest."""
    llama.n_tokens = context_len + accepted
