"""Output constraints as llama.cpp grammars (GBNF), compiled once per distinct constraint.

``mesh.grammar`` fixes what a constraint means on every route; here it becomes
llama.cpp's dialect: a JSON schema through llama-cpp-python's own converter
(``json_schema_to_gbnf``), any JSON object through its ``JSON_GBNF``, and tool
calls wrapped by ``mesh.grammar.tool_call_grammar``. Greedy or sampled, the
grammar masks every token that would leave the language, and an end token is
allowed only once the answer is complete.
"""

from __future__ import annotations

import ctypes
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from typing import Any

import numpy as np

from edge.errors import InvalidRequestError
from mesh.grammar import TOOL_CALL_TRIGGER, tool_call_grammar
from mesh.protocol import OutputConstraint

_CACHED_GRAMMARS = 256
# llama.cpp matches the whole output so far; the grammar is fed from the group on.
_LAZY_TRIGGER_PATTERN = rf"[\s\S]*?({re.escape(TOOL_CALL_TRIGGER)}[\s\S]*)"


def llama_grammar(constraint: OutputConstraint) -> Any:
    """The ``LlamaGrammar`` enforcing ``constraint`` (parsed once, then cached)."""
    return _compiled(constraint.model_dump_json())


def gbnf(constraint: OutputConstraint) -> str:
    """The GBNF text of ``constraint``."""
    from llama_cpp.llama_grammar import JSON_GBNF, json_schema_to_gbnf

    schema = constraint.json_schema
    if schema is None:
        text = JSON_GBNF
    else:
        try:
            text = json_schema_to_gbnf(json.dumps(schema))
        except (AssertionError, ValueError, KeyError, TypeError, NotImplementedError) as exc:
            # The converter asserts on schemas it does not recognize.
            raise InvalidRequestError(
                f"the JSON schema cannot be enforced: {exc}", param="response_format"
            ) from exc
    return tool_call_grammar(text, constraint.tool_calls) if constraint.tool_calls else text


@lru_cache(maxsize=_CACHED_GRAMMARS)
def _compiled(key: str) -> Any:
    from llama_cpp import LlamaGrammar

    return LlamaGrammar.from_string(gbnf(OutputConstraint.model_validate_json(key)), verbose=False)


class GrammarFirstSampler:
    """Constrained sampling in llama.cpp server's order: sample first, check one token.

    Masking the whole vocabulary with the grammar at every step (what
    ``Llama.generate(grammar=...)`` does) costs a grammar walk per candidate token,
    49k of them for the default model. Like llama.cpp's ``common_sampler_sample``,
    this samples from the unconstrained chain and asks the grammar about that one
    token. When the grammar refuses it:

    - greedy: the grammar judges the most probable tokens, ``SHORTLISTS`` of them at a
      time, and the best allowed one is the answer (the masked argmax);
    - sampled: up to ``REDRAWS`` fresh draws from the chain, the first allowed one kept
      (rejection sampling: each kept token has the masked distribution p(y) / P(allowed));

    and only if that finds nothing does the grammar mask the full vocabulary. Either
    way the token follows the constrained distribution exactly.

    ``chain`` is llama-cpp-python's sampler chain without a grammar (it applies and
    accepts); its repetition penalties see refused tokens too, which is harmless
    because the edge never sets them (OpenAI semantics: no penalties). Slot thread only.
    """

    SHORTLISTS = (64, 4096)
    REDRAWS = 4

    def __init__(
        self, llama: Any, chain: Any, grammar: Any, *, greedy: bool, lazy: bool = False
    ) -> None:
        import llama_cpp

        self._lib = llama_cpp
        self._chain = chain
        self._greedy = greedy
        vocab, text, root = llama._model.vocab, grammar._grammar.encode(), grammar._root.encode()
        if lazy:  # free until the trigger; from it on the grammar holds (llama.cpp's own)
            patterns = (ctypes.c_char_p * 1)(_LAZY_TRIGGER_PATTERN.encode())
            no_tokens = (llama_cpp.llama_token * 1)()
            self._grammar = llama_cpp.llama_sampler_init_grammar_lazy_patterns(
                vocab, text, root, patterns, 1, no_tokens, 0
            )
        else:
            self._grammar = llama_cpp.llama_sampler_init_grammar(vocab, text, root)
        self._n_vocab = llama.n_vocab()
        self._candidates = (llama_cpp.llama_token_data * self._n_vocab)()
        self._view = np.ctypeslib.as_array(self._candidates)
        self.refused = 0  # sampled tokens the grammar refused
        self.full_masks = 0  # ... of which needed the whole vocabulary masked

    def sample(self, ctx: Any, idx: int) -> int:
        """The next token at output position ``idx`` (as ``LlamaSampler.sample``)."""
        token = int(self._chain.sample(ctx, idx))
        if not self._judge(np.array([token]))[0]:
            self.refused += 1
            token = self._replacement(ctx, idx)
        self._lib.llama_sampler_accept(self._grammar, token)
        return token

    def _replacement(self, ctx: Any, idx: int) -> int:
        """A token the grammar allows, after it refused the sampled one."""
        logits = np.ctypeslib.as_array(
            self._lib.llama_get_logits_ith(ctx.ctx, idx), shape=(self._n_vocab,)
        )
        if self._greedy:
            for size in self.SHORTLISTS:
                top = np.argpartition(-logits, size)[:size]
                top = top[np.argsort(-logits[top], kind="stable")]
                allowed = np.flatnonzero(self._judge(top))
                if len(allowed):
                    return int(top[allowed[0]])
        else:
            for _ in range(self.REDRAWS):
                token = int(self._chain.sample(ctx, idx))
                if self._judge(np.array([token]))[0]:
                    return token
        self.full_masks += 1
        return self._masked_sample(logits)

    def _judge(self, tokens: np.ndarray) -> np.ndarray:
        """Which of ``tokens`` the grammar allows next (one grammar pass over them)."""
        n = len(tokens)
        self._view["id"][:n] = tokens
        self._view["logit"][:n] = 0.0
        self._apply(self._grammar, n)
        return np.isfinite(self._view["logit"][:n])

    def _masked_sample(self, logits: np.ndarray) -> int:
        """Mask the whole vocabulary with the grammar, then sample with the chain."""
        self._view["id"] = np.arange(self._n_vocab, dtype=np.int32)
        self._view["logit"] = logits
        self._view["p"] = 0.0
        self._apply(self._grammar, self._n_vocab)
        selected = self._apply(self._chain.sampler, self._n_vocab)
        return int(self._view["id"][selected])

    def _apply(self, sampler: Any, size: int) -> int:
        """Run ``sampler`` over the first ``size`` candidates; the index it selected."""
        candidates = self._lib.llama_token_data_array(
            data=self._candidates, size=size, selected=-1, sorted=False
        )
        self._lib.llama_sampler_apply(sampler, ctypes.byref(candidates))
        return int(candidates.selected)

    def close(self) -> None:
        """Free the grammar sampler and the chain."""
        if self._grammar is not None:
            self._lib.llama_sampler_free(self._grammar)
            self._grammar = None
        self._chain.close()

    def __del__(self) -> None:
        self.close()


@contextmanager
def grammar_first(llama: Any, grammar: Any, *, lazy: bool = False) -> Iterator[None]:
    """While open, ``llama.generate`` samples through a ``GrammarFirstSampler`` of
    ``grammar`` (call it with ``grammar=None``).
    ``lazy``: the grammar holds from the first ``<tool_call>`` the model writes.

    ``Llama.generate`` builds its sampler with ``_init_sampler``; shadowing that one
    method on the instance is the seam llama-cpp-python leaves (its lazy-grammar and
    sampler APIs are otherwise only reachable below ``generate``)."""
    plain = llama._init_sampler

    def init_sampler(**kwargs: Any) -> GrammarFirstSampler:
        chain = plain(**{**kwargs, "grammar": None})
        greedy = kwargs.get("temp") == 0.0
        return GrammarFirstSampler(llama, chain, grammar, greedy=greedy, lazy=lazy)

    llama._init_sampler = init_sampler
    try:
        yield
    finally:
        del llama._init_sampler
