"""The piece-by-piece prompt tokenizer gives llama.cpp's ids, on public conversations."""

from __future__ import annotations

from typing import Any

import pytest

from models import render_chat
from models.token_cache import CachedTokenizer, llama_special_token_texts
from tandem.bench.bfcl import function_docs, load_scenarios, to_openai_tool
from tandem.bench.mtbench import load_questions


def _whole(llama: Any):
    return lambda text: list(llama.tokenize(text.encode("utf-8"), add_bos=False, special=True))


def _growing_chats() -> list[tuple[list[dict[str, Any]], list[dict[str, Any]] | None]]:
    """Agent-like conversations, each resent with one more turn (as agents do)."""
    chats: list[tuple[list[dict[str, Any]], list[dict[str, Any]] | None]] = []
    for question in load_questions()[:20]:
        messages: list[dict[str, Any]] = []
        for turn in question.turns:
            messages.append({"role": "user", "content": turn})
            chats.append((list(messages), None))
            messages.append({"role": "assistant", "content": f"  An answer to: {turn[:60]}\n\n"})
    for scenario in load_scenarios()[:5]:
        docs = [d for c in scenario.involved_classes for d in function_docs(c)][:6]
        tools = [dict(to_openai_tool(d)) for d in docs]
        messages = []
        for turn, calls in zip(scenario.turns, scenario.ground_truth, strict=False):
            messages.extend(dict(m) for m in turn)
            chats.append((list(messages), tools))
            messages.append({"role": "assistant", "content": "; ".join(map(str, calls))})
            messages.append({"role": "tool", "content": '{"result": "ok"}\n  '})
    return chats


def test_special_tokens_include_the_chatml_markers(llama_vocab: Any) -> None:
    texts = llama_special_token_texts(llama_vocab)
    assert "<|im_start|>" in texts and "<|im_end|>" in texts
    assert all(t.strip() for t in texts)


def test_same_ids_as_one_call_on_mtbench_and_bfcl_conversations(
    llama_vocab: Any, template: str
) -> None:
    whole = _whole(llama_vocab)
    cached = CachedTokenizer(whole, llama_special_token_texts(llama_vocab), verify_calls=0)
    prompts = [render_chat(template, m, tools=t) for m, t in _growing_chats()]
    assert len(prompts) > 50
    for prompt in prompts:
        assert cached(prompt) == whole(prompt), prompt[:200]
    assert cached.enabled
    # The history repeats: most pieces come from the cache.
    assert cached.hits > 2 * cached.misses


def test_a_tokenizer_that_differs_piece_by_piece_turns_the_cache_off() -> None:
    # Drops the whitespace around its text: tokenizing "a <S> b" in pieces differs.
    def stripping(text: str) -> list[int]:
        return [ord(c) for c in text.strip()]

    cached = CachedTokenizer(stripping, ["<S>"], verify_calls=4)
    assert cached("a<S>b") == stripping("a<S>b")  # the same either way
    assert cached.enabled
    assert cached("a <S> b") == stripping("a <S> b")  # the whole-text answer
    assert not cached.enabled
    assert cached("c <S> d") == stripping("c <S> d")


def test_the_cache_stays_within_its_token_bound(llama_vocab: Any) -> None:
    whole = _whole(llama_vocab)
    cached = CachedTokenizer(whole, ["<|im_start|>", "<|im_end|>"], max_cached_tokens=50)
    for i in range(40):
        text = f"<|im_start|>user\nmessage number {i} about things<|im_end|>\n"
        assert cached(text) == whole(text)
    assert 0 < cached._cached_tokens <= 50


@pytest.mark.parametrize("specials", [[], ["<|im_start|>"]])
def test_with_few_or_no_special_tokens_the_ids_are_unchanged(
    llama_vocab: Any, specials: list[str]
) -> None:
    whole = _whole(llama_vocab)
    cached = CachedTokenizer(whole, specials)
    text = "<|im_start|>system\nYou are nice.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert cached(text) == whole(text)


def test_the_direct_tokenizer_matches_llama_cpp_python(llama_vocab: Any) -> None:
    from models.vocab import llama_tokenizer

    direct, whole = llama_tokenizer(llama_vocab), _whole(llama_vocab)
    texts = [
        "",
        "hi",
        "<|im_start|>user\nnaïve café 🚀 — ok<|im_end|>\n",
        "word " * 3000,  # longer than any fixed buffer
        "\n\n\t  spaces   and\ttabs  ",
    ]
    for text in texts:
        assert direct(text) == whole(text)
