"""``GrammarFirstSampler`` gives what masking the whole vocabulary gives, cheaper.

Against llama-cpp-python's own grammar sampling (``generate(grammar=...)``, which
masks every candidate at every step) on the default model: greedy answers are
token for token the same; sampled first tokens follow the same distribution
(fixed seeds, so the test is deterministic).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterator
from typing import Any

import pytest

from edge.constraints import GrammarFirstSampler, grammar_first, llama_grammar
from mesh.protocol import OutputConstraint
from models.bundled import locate_bundled_gguf
from models.llama_loader import load_llama

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
}
PROMPTS = [
    "<|im_start|>user\nDescribe a person.<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nWrite a poem about the sea.<|im_end|>\n<|im_start|>assistant\n",
]
FREE = dict(top_k=0, min_p=0.0, top_p=1.0, repeat_penalty=1.0)


@pytest.fixture(scope="module")
def llama() -> Iterator[Any]:
    model = load_llama(locate_bundled_gguf(), n_ctx=512, n_threads=1, verbose=False)
    yield model
    model.close()


def _greedy(llama: Any, prompt: list[int], grammar: Any, ours: bool, n: int = 24) -> list[int]:
    llama.reset()  # a fresh evaluation: both paths see bit-identical logits
    out: list[int] = []
    if ours:
        with grammar_first(llama, grammar):
            tokens = llama.generate(prompt, temp=0.0, grammar=None, **FREE)
            out = [t for _, t in zip(range(n), tokens, strict=False)]
            tokens.close()
        return out
    tokens = llama.generate(prompt, temp=0.0, grammar=grammar, **FREE)
    out = [t for _, t in zip(range(n), tokens, strict=False)]
    tokens.close()
    return out


@pytest.mark.parametrize(
    ("schema", "prompt"), [(PERSON, PROMPTS[0]), (None, PROMPTS[1])], ids=["schema", "object"]
)
def test_greedy_equals_masking_every_token(llama: Any, schema: Any, prompt: str) -> None:
    grammar = llama_grammar(OutputConstraint(json_schema=schema))
    ids = llama.tokenize(prompt.encode(), add_bos=False, special=True)
    assert _greedy(llama, ids, grammar, ours=True) == _greedy(llama, ids, grammar, ours=False)


def _first_tokens(llama: Any, grammar: Any, ours: bool, draws: int) -> Counter[int]:
    """The first constrained token of ``draws`` seeded samples after the poem prompt."""
    ids = llama.tokenize(PROMPTS[1].encode(), add_bos=False, special=True)
    llama.reset()
    llama.eval(ids)
    counts: Counter[int] = Counter()
    refused = 0
    for seed in range(draws):
        llama.set_seed(seed + (0 if ours else 100_000))
        if ours:
            chain = llama._init_sampler(temp=1.0, grammar=None, **FREE)
            sampler: Any = GrammarFirstSampler(llama, chain, grammar, greedy=False)
        else:
            sampler = llama._init_sampler(temp=1.0, grammar=grammar, **FREE)
        counts[int(sampler.sample(llama._ctx, -1))] += 1
        refused += getattr(sampler, "refused", 0)
        sampler.close()
    if ours:
        assert refused > draws // 4, "the prompt must make the grammar refuse often"
    return counts


def test_sampled_tokens_follow_the_masked_distribution(llama: Any) -> None:
    """Two-sample chi-square over the first token of a JSON answer to a poem request
    (the model wants prose; the grammar allows '{', '{}' and whitespace: here '{' about
    88% and '{}' 12%, so a sampler that took the masked argmax would fail with chi2 ~ 24)."""
    grammar = llama_grammar(OutputConstraint())
    draws = 200
    ours = _first_tokens(llama, grammar, ours=True, draws=draws)
    theirs = _first_tokens(llama, grammar, ours=False, draws=draws)
    tokens = sorted(set(ours) | set(theirs))
    # Pool rare tokens so each cell expects at least 5.
    common = [t for t in tokens if ours[t] + theirs[t] >= 10]
    cells = [(ours[t], theirs[t]) for t in common]
    cells.append((sum(ours[t] for t in tokens if t not in common),
                  sum(theirs[t] for t in tokens if t not in common)))  # fmt: skip
    cells = [c for c in cells if sum(c) > 0]
    chi2 = sum((a - b) ** 2 / (a + b) for a, b in cells)
    dof = len(cells) - 1
    # p < 0.001 rejects; the seeds are fixed, so this is a fixed verdict, not a chance one.
    critical = {0: math.inf, 1: 10.83, 2: 13.82, 3: 16.27, 4: 18.47, 5: 20.52, 6: 22.46}
    assert chi2 < critical.get(dof, 3 * dof), (chi2, dof, cells)
    assert llama.detokenize([ours.most_common(1)[0][0]]).strip() in (b"{", b"")
